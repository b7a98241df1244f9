"""The output correction in a model: each call's output less its row of offsets, at the row of its timestep."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.unets.unet_2d import UNet2DOutput

from tests.quant.tiny_unets import pixel_unet, unet_inputs
from tfmq.quant.nn import (
    OutputCorrection,
    StepRows,
    attach_output_correction,
    attach_timestep_schedule,
    output_correction,
    timestep_tables,
)

SCHEDULE = torch.tensor([900, 500, 100, 7])


def offsets(channels: int = 3) -> torch.Tensor:
    """Row i holds i + channel / 10: every row and channel distinguishable."""
    return torch.arange(len(SCHEDULE))[:, None] + torch.arange(channels)[None, :] / 10


def test_a_row_is_taken_off_every_sample_per_channel_and_rows_may_differ_per_sample() -> None:
    correction = OutputCorrection(offsets())
    output = torch.randn(2, 3, 4, 4)
    corrected = correction(output, torch.tensor(2))
    assert torch.allclose(output - corrected, (2 + torch.arange(3) / 10).view(1, 3, 1, 1).expand_as(output))
    per_sample = correction(output, torch.tensor([0, 3]))
    assert torch.allclose(output[1] - per_sample[1], (3 + torch.arange(3) / 10).view(3, 1, 1).expand(3, 4, 4))
    assert correction(output.half(), torch.tensor(1)).dtype == torch.float16


def test_it_refuses_another_width_and_a_call_without_a_row() -> None:
    correction = OutputCorrection(offsets(), StepRows())
    with pytest.raises(ValueError, match="3 channels, the model returned 4"):
        correction(torch.zeros(1, 4, 2, 2), torch.tensor(0))
    with pytest.raises(RuntimeError, match="no timestep selected"):
        correction(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\(steps, channels\)"):
        OutputCorrection(torch.zeros(4))


@torch.no_grad()
def test_a_model_returns_its_output_less_the_row_of_its_timestep_in_every_return_form() -> None:
    plain = pixel_unet()
    model = copy.deepcopy(plain)
    attach_output_correction(model, SCHEDULE, offsets())
    inputs = unet_inputs(plain, 2, seed=0)
    for row, timestep in enumerate(SCHEDULE.tolist()):
        expected = plain(inputs["sample"], timestep).sample - offsets()[row].view(1, 3, 1, 1)
        output = model(inputs["sample"], timestep)
        assert isinstance(output, UNet2DOutput) and torch.allclose(output.sample, expected, atol=1e-6)
        assert torch.allclose(output["sample"], expected, atol=1e-6)  # the dict view agrees
        assert torch.allclose(model(inputs["sample"], timestep, return_dict=False)[0], expected, atol=1e-6)
    assert timestep_tables(model).step_rows.rows is None  # nothing left selected after the calls
    assert output_correction(plain) is None and output_correction(model).channels == 3


@torch.no_grad()
def test_a_deep_copy_corrects_by_its_own_table() -> None:
    model = pixel_unet()
    attach_output_correction(model, SCHEDULE, offsets())
    twin = copy.deepcopy(model)
    twin.output_correction.offsets.zero_()
    inputs = unet_inputs(model, 1, seed=3)
    difference = twin(inputs["sample"], 500).sample - model(inputs["sample"], 500).sample
    assert torch.allclose(difference, offsets()[1].view(1, 3, 1, 1).expand_as(difference), atol=1e-6)


def test_it_joins_the_tables_a_model_has_and_refuses_what_does_not_fit() -> None:
    model = pixel_unet()
    tables = attach_timestep_schedule(model, SCHEDULE)
    correction = attach_output_correction(model, SCHEDULE, offsets())
    assert correction.step_rows is tables.step_rows
    with pytest.raises(ValueError, match="already carries an output correction"):
        attach_output_correction(model, SCHEDULE, offsets())
    other = pixel_unet()
    attach_timestep_schedule(other, SCHEDULE)
    with pytest.raises(ValueError, match="another schedule"):
        attach_output_correction(other, SCHEDULE[:3], offsets()[:3])
    with pytest.raises(ValueError, match=r"\(4 steps, channels\)"):
        attach_output_correction(pixel_unet(), SCHEDULE, offsets()[:3])
