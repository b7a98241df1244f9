"""Shared fixtures: tiny random diffusers models built here, never downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers import DDPMPipeline, UNet2DModel

from tfmq.data import DEFAULT_FASHION_MNIST_DIR
from tfmq.models.architectures import fashion_ddpm_scheduler
from tests.quant.tiny_unets import pixel_unet



def tiny_unet(seed: int = 0) -> UNet2DModel:
    """The tiny test UNet with one channel, like the shipped fashion-ddpm."""
    return pixel_unet(seed, channels=1)


@pytest.fixture
def tiny_model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-ddpm"
    DDPMPipeline(unet=tiny_unet(), scheduler=fashion_ddpm_scheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    if not (DEFAULT_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (.ci/run installs it)")
    return DEFAULT_FASHION_MNIST_DIR
