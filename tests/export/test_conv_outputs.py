import pytest
import torch
from torch import nn

from tests.quant.nn.test_layers import calibrate_input, quant_conv
from tfmq.export.conv_outputs import conv_output_grids, exact_conv_names, runs_on_integer_kernels, split_conv_parts
from tfmq.export.layers import IntegerConv2d


class _Wrapper(nn.Module):
    """One conv as a model called with keyword inputs, as conv_output_grids calls a UNet."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.conv(sample)


def split_conv() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layer = quant_conv(nn.Conv2d(6, 5, 1), 8, split=4)
    # the two parts on very different scales, as an up-block's upsampled features and skip
    inputs = torch.cat([torch.randn(3, 4, 5, 5), 20 * torch.randn(3, 2, 5, 5)], dim=1)
    calibrate_input(layer, inputs)
    return layer, inputs


@torch.no_grad()
def test_a_split_conv_is_the_sum_of_its_parts_and_runs_on_integer_kernels() -> None:
    layer, inputs = split_conv()
    parts = split_conv_parts(layer, inputs)
    assert len(parts) == 2 and runs_on_integer_kernels(layer)
    torch.testing.assert_close(parts[0] + parts[1], layer(inputs), rtol=1e-5, atol=1e-5)
    assert parts[1].abs().mean() > 5 * parts[0].abs().mean()  # two ranges: one output grid each is worth it


@torch.no_grad()
def test_the_split_integer_conv_matches_the_fake_quant_conv_within_its_output_grids() -> None:
    layer, inputs = split_conv()
    model = _Wrapper(layer)
    grids = conv_output_grids(model, ["conv"], [{"sample": inputs, "timestep": torch.zeros(3)}])["conv"]
    assert len(grids) == 2 and grids[1].scale > 5 * grids[0].scale
    twin = IntegerConv2d(layer, grids)
    reference = layer(inputs)
    # each part's output off by at most half its grid step
    assert float((twin(inputs) - reference).abs().max()) <= (grids[0].scale + grids[1].scale) / 2 + 1e-4
    exact = IntegerConv2d(layer, None)  # no output grid: float convs on dequantized operands
    torch.testing.assert_close(exact(inputs), reference, rtol=1e-5, atol=1e-4)


def test_a_split_conv_given_one_output_grid_is_refused() -> None:
    layer, inputs = split_conv()
    grids = conv_output_grids(_Wrapper(layer), ["conv"], [{"sample": inputs, "timestep": torch.zeros(3)}])
    with pytest.raises(ValueError, match="2 output grid"):
        IntegerConv2d(layer, grids["conv"][:1])


def test_exact_conv_names_take_all_none_or_the_matching_ones() -> None:
    names = ["down.conv1", "down.conv_shortcut", "up.conv1", "up.conv_shortcut"]
    assert exact_conv_names(names, True) == names and exact_conv_names(names, False) == []
    assert exact_conv_names(names, "*conv_shortcut") == ["down.conv_shortcut", "up.conv_shortcut"]
    assert exact_conv_names(names, ["up.*", "*shortcut"]) == ["down.conv_shortcut", "up.conv1", "up.conv_shortcut"]
    assert exact_conv_names(names, []) == []
    with pytest.raises(ValueError, match="'mid.\\*' matches none of the 4 convs"):
        exact_conv_names(names, ["up.*", "mid.*"])
