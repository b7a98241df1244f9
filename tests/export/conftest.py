"""Fixtures of the export tests: tiny quantized UNets and their exported graphs, built once per module."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from tests.quant.conftest import single_thread  # noqa: F401  (autouse: tiny models run faster on one thread)
from tests.quant.tiny_unets import pixel_unet, text_unet, unet_inputs
from tfmq.models.architectures import fashion_ddpm_scheduler
from tfmq.quant.api import quantize
from tfmq.quant.calibration import collect_calibration
from tfmq.quant.config import RTNConfig
from tfmq.quant.wrap import observe_activations, quantize_model
from tfmq.quant.provenance import Provenance
from tfmq.sampling import SamplerConfig, sampling_timesteps

SAMPLER = SamplerConfig(steps=6)


def assert_exact_but_for_flips(errors: list[float], exact: float, flip: float) -> None:
    """Relative errors of engine calls: most exact to float rounding, and none past what a code moved across a
    rounding boundary (the float summation order differs between the engine and torch) gives."""
    agreeing = sum(error < exact for error in errors)
    assert agreeing > len(errors) / 2 and max(errors) < flip, errors


@pytest.fixture(scope="session")
def scheduler() -> DDPMScheduler:
    return fashion_ddpm_scheduler()


@pytest.fixture(scope="session")
def schedule(scheduler) -> list[int]:
    return sampling_timesteps(scheduler, SAMPLER).tolist()


@pytest.fixture(scope="session")
def calibration(scheduler):
    return collect_calibration(pixel_unet(), scheduler, 4, SAMPLER, 2, progress=False)


@pytest.fixture(scope="session")
def pixel_w4a8(calibration):
    """W4A8 RTN of the tiny pixel UNet, with FSC tables on the TIB (so the graph's schedule is the model's)."""
    return quantize(pixel_unet(), RTNConfig(w_bits=4, a_bits=8, fsc_scope="temporal"), calibration,
                    progress=False)


@pytest.fixture(scope="session")
def text_w8a8(schedule):
    """W8A8 of the tiny text UNet, activation ranges from random conditioned inputs at scheduled timesteps."""
    unet = text_unet()
    config = RTNConfig(w_bits=8, a_bits=8)
    model = quantize_model(unet, config)
    with torch.no_grad(), observe_activations(model):
        for seed, timestep in enumerate(schedule):
            inputs = unet_inputs(unet, 4, seed)
            model(**{**inputs, "timestep": torch.full((4,), timestep)})
    model.tfmq_info = Provenance.of(config, unet)
    return model.eval()
