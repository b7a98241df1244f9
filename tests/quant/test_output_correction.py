"""Measuring the output correction: each step's mean output error per channel, on denoisers whose error is
known, and on a quantized model through `quantize`, saved and loaded."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.quant.tiny_unets import one_thread, pixel_unet
from tfmq.denoiser import denoiser_call
from tfmq.models.architectures import fashion_ddpm_scheduler
from tfmq.quant.api import quantize
from tfmq.quant.calibration import collect_calibration
from tfmq.quant.checkpoint import load_quantized, save_quantized
from tfmq.quant.config import RTNConfig
from tfmq.quant.manifest import ModelManifest
from tfmq.quant.nn import attach_timestep_schedule, training_schedule
from tfmq.quant.output_correction import calibrate_output_correction
from tfmq.sampling import SamplerConfig


@pytest.fixture(scope="module")
def calibration():
    with one_thread():
        return collect_calibration(pixel_unet(), fashion_ddpm_scheduler(), 3, SamplerConfig(steps=6), 2, progress=False)


def biased(full_precision: torch.nn.Module, bias: dict[int, torch.Tensor]) -> torch.nn.Module:
    """A copy of `full_precision` whose output at timestep t is off by `bias[t]` (one value per channel),
    plus noise that differs from sample to sample and averages out only roughly."""
    model = copy.deepcopy(full_precision)
    seen = []

    def hook(module, args, kwargs, output):
        timestep = int(kwargs["timestep"].reshape(-1)[0])
        seen.append(len(kwargs["sample"]))
        output.sample = output.sample + bias[timestep].view(1, -1, 1, 1)
        return output

    model.register_forward_hook(hook, with_kwargs=True)
    model.seen_batches = seen
    return model


def step_bias(schedule: torch.Tensor) -> dict[int, torch.Tensor]:
    return {int(t): torch.tensor([0.001 * int(t), -0.5, 0.25 * row]) for row, t in enumerate(schedule)}


@torch.no_grad()
def test_it_measures_a_known_per_step_error_and_the_model_then_returns_full_precision(calibration) -> None:
    full_precision = pixel_unet()
    bias = step_bias(calibration.schedule)
    model = biased(full_precision, bias)
    correction = calibrate_output_correction(model, full_precision, calibration, progress=False)
    expected = torch.stack([bias[int(t)] for t in calibration.schedule])
    assert torch.allclose(correction.offsets, expected, atol=1e-5)
    for inputs in calibration.timestep_groups():
        assert torch.allclose(denoiser_call(model, inputs), denoiser_call(full_precision, inputs), atol=1e-5)


@torch.no_grad()
def test_a_schedule_free_table_fills_the_rows_between_calibrated_timesteps(calibration) -> None:
    full_precision = pixel_unet()
    bias = step_bias(calibration.schedule)
    schedule = training_schedule(1000)
    corrections = {}
    for fill in ("linear", "nearest"):
        model = biased(full_precision, bias)
        corrections[fill] = calibrate_output_correction(model, full_precision, calibration, table_schedule=schedule,
                                                        fill=fill, progress=False).offsets
    offsets = corrections["linear"]
    calibrated = sorted(int(t) for t in calibration.schedule)
    for t in calibrated:
        assert torch.allclose(offsets[t], bias[t], atol=1e-5)
    low, high = calibrated[1], calibrated[2]
    middle = (low + high) // 2
    weight = (middle - low) / (high - low)
    assert torch.allclose(offsets[middle], torch.lerp(bias[low], bias[high], weight), atol=1e-5)
    assert torch.allclose(corrections["nearest"][middle], bias[low if weight <= 0.5 else high], atol=1e-5)
    assert torch.allclose(offsets[999], bias[calibrated[-1]], atol=1e-5)  # past the last: the edge row


@torch.no_grad()
def test_it_reads_the_samples_asked_for_and_refuses_bad_input(calibration) -> None:
    full_precision = pixel_unet()
    model = biased(full_precision, step_bias(calibration.schedule))
    calibrate_output_correction(model, full_precision, calibration, samples_per_step=2, batch_size=1, progress=False)
    steps = len(calibration.schedule)
    assert len(calibration) > 2 * steps and model.seen_batches == [1] * (2 * steps)
    with pytest.raises(ValueError, match="already carries an output correction"):
        calibrate_output_correction(model, full_precision, calibration, progress=False)
    with pytest.raises(ValueError, match="samples_per_step must be a positive int"):
        calibrate_output_correction(pixel_unet(), full_precision, calibration, samples_per_step=0)
    other = pixel_unet()
    attach_timestep_schedule(other, calibration.schedule[:3])
    with pytest.raises(ValueError, match="another schedule"):
        calibrate_output_correction(other, full_precision, calibration, progress=False)


@torch.no_grad()
def test_quantize_corrects_a_quantized_model_that_saves_and_loads(calibration, tmp_path) -> None:
    base = pixel_unet()
    with one_thread():
        plain = quantize(base, RTNConfig(w_bits=4, a_bits=8), calibration, progress=False)
        corrected = quantize(base, RTNConfig(w_bits=4, a_bits=8, output_correction=True), calibration, progress=False)
    results = corrected.tfmq_info.method_results["output_correction"]
    assert results["steps"] == len(calibration.schedule) and results["channels"] == 3
    for inputs in calibration.timestep_groups():
        reference = denoiser_call(base, inputs)
        before = (denoiser_call(plain, inputs) - reference).mean(dim=(0, 2, 3))
        after = (denoiser_call(corrected, inputs) - reference).mean(dim=(0, 2, 3))
        assert after.abs().max() < 1e-5 < before.abs().max()  # what every sample of the step shared is gone
    assert ModelManifest.of(corrected).output_correction.channels == 3
    assert ModelManifest.of(plain).output_correction is None
    save_quantized(corrected, tmp_path / "corrected")
    loaded = load_quantized(tmp_path / "corrected", pixel_unet())
    inputs = next(iter(calibration.timestep_groups()))
    assert torch.equal(denoiser_call(loaded, inputs), denoiser_call(corrected, inputs))
