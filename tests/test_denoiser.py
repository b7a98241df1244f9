"""One call convention for every denoiser: tfmq's recorded inputs reach UNets and transformers by keyword."""

from __future__ import annotations

import pytest
import torch
from tests.quant.tiny_unets import pixel_unet, tiny_dit, tiny_pixart
from torch import nn

from tfmq.denoiser import denoiser_call, denoiser_inputs, predicted_noise, sample_argument


def test_the_sample_argument_of_each_kind() -> None:
    assert sample_argument(pixel_unet(channels=1)) == "sample"
    assert sample_argument(tiny_dit()) == "hidden_states"
    with pytest.raises(ValueError, match="Linear takes neither `sample` nor `hidden_states`"):
        sample_argument(nn.Linear(2, 2))


def test_pixart_gets_its_inputs_by_keyword_whatever_its_argument_order() -> None:
    model = tiny_pixart()
    generator = torch.Generator().manual_seed(0)
    x, captions = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 3, 8, generator=generator)
    timestep = torch.tensor([10, 900])
    inputs = {"sample": x, "timestep": timestep, "encoder_hidden_states": captions}
    assert set(denoiser_inputs(model, inputs)) == {"hidden_states", "timestep", "encoder_hidden_states"}
    with torch.no_grad():
        expected = model(x, captions, timestep).sample  # PixArt's order: encoder states before the timestep
        assert torch.equal(denoiser_call(model, inputs), expected)


def test_inputs_without_a_sample_pass_unchanged() -> None:
    inputs = {"timesteps": torch.tensor([1])}
    assert denoiser_inputs(nn.Linear(2, 2), inputs) is inputs


def test_predicted_noise_drops_a_learned_variance() -> None:
    learned = tiny_pixart()  # 4 input channels, 8 output channels
    output = torch.randn(2, 8, 8, 8)
    assert torch.equal(predicted_noise(learned, output), output[:, :4])
    plain = tiny_dit()
    same = torch.randn(2, 4, 8, 8)
    assert predicted_noise(plain, same) is same
