"""Fixtures of the quantization tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from tests.quant.tiny_unets import pixel_unet, text_unet


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    # These models are far too small to gain from threads, and on a busy machine two threads
    # contending for cores make every tiny op wait (measured: 20x slower wrapping).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["pixel", "text"])
def unet(request: pytest.FixtureRequest) -> UNet2DModel | UNet2DConditionModel:
    return pixel_unet() if request.param == "pixel" else text_unet()
