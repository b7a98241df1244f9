"""Shared fixtures: tiny random diffusers models built here, never downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel

from tfmq.data import DEFAULT_FASHION_MNIST_DIR
from tfmq.models.architectures import fashion_ddpm_scheduler



def tiny_unet(seed: int = 0) -> UNet2DModel:
    """8x8 one-channel UNet with attention: a few thousand parameters, milliseconds per call."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


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
