"""temporal_error.py's shared-error share and output_bias.py's per-element correction, on models whose errors are known."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))
import output_bias  # noqa: E402  (a script folder, not a package)
import temporal_error  # noqa: E402

SCHEDULE = torch.tensor([900, 500, 100])
PER_STEP = 32


class Denoiser(nn.Module):
    """Returns x, plus `offset(t)` and noise of size `noise`: a model whose error against `Denoiser()` is known."""

    def __init__(self, offset: float = 0.0, noise: float = 0.0) -> None:
        super().__init__()
        self.offset, self.noise = offset, noise
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> types.SimpleNamespace:
        shift = self.offset * timestep.float().view(-1, 1, 1, 1) / 1000
        noise = self.noise * torch.randn(sample.shape, generator=self.generator)
        return types.SimpleNamespace(sample=sample + shift + noise)


def _calibration():
    from tfmq.quant.calibration import CalibrationSet

    steps = torch.arange(len(SCHEDULE)).repeat_interleave(PER_STEP)
    samples = torch.randn(len(steps), 2, 8, 8, generator=torch.Generator().manual_seed(1))
    return CalibrationSet(samples, SCHEDULE[steps], steps, SCHEDULE)


@pytest.mark.parametrize(("model", "low", "high"), [
    (Denoiser(offset=0.5), 0.999, 1.001),  # every sample errs alike
    (Denoiser(noise=0.1), 0.5 / PER_STEP, 2.0 / PER_STEP),  # independent errors: about 1/n
])
def test_the_shared_share_is_one_for_a_common_error_and_about_one_over_n_for_independent_ones(
        model: nn.Module, low: float, high: float) -> None:
    errors, shared = temporal_error.output_errors(model, Denoiser(), _calibration(), SCHEDULE)
    assert bool((errors > 0).all())
    assert bool(((shared > low) & (shared < high)).all()), shared.tolist()


def test_subtracting_each_steps_element_means_removes_a_per_step_offset() -> None:
    calibration, reference = _calibration(), Denoiser()
    model = Denoiser(offset=0.5, noise=0.01)
    errors = output_bias.element_errors(model, reference, calibration)
    assert sorted(errors) == sorted(SCHEDULE.tolist()) and errors[500].shape == (1, 2, 8, 8)
    assert errors[900].flatten() == pytest.approx(torch.full((128,), 0.45), abs=0.01)
    output_bias.subtract_step_errors(model, errors)  # registers a forward hook: needs the model's own call
    inputs = calibration.inputs(torch.arange(PER_STEP))
    with torch.no_grad():
        left = model(**inputs).sample - reference(**inputs).sample
    assert left.mean().abs() < 0.005 and left.abs().max() < 0.1
    assert output_bias.correct(Denoiser(), reference, calibration, "none") == 0
