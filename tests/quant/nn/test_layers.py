from __future__ import annotations

import pytest
import torch
from torch import nn

from tfmq.quant.nn.layers import QuantConv2d, QuantLinear
from tfmq.quant.nn.quantizer import UniformQuantizer


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output - reference).norm() / reference.norm()).item()


def calibrate_input(layer: QuantConv2d | QuantLinear, inputs: torch.Tensor) -> None:
    quantizers = [layer.input_quantizer] + ([layer.split_input_quantizer] if layer.split is not None else [])
    for quantizer in quantizers:
        quantizer.start_observing()
    layer(inputs)
    for quantizer in quantizers:
        quantizer.finalize_range()


def quant_conv(conv: nn.Conv2d, bits: int | None, **kwargs) -> QuantConv2d:
    layer = QuantConv2d(conv, w_bits=bits, a_bits=bits, weight_init="minmax", act_init="minmax", **kwargs)
    layer.weight_quantizer.init_range(layer.weight)
    return layer


@pytest.fixture
def conv() -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(6, 5, 3, padding=1, stride=2)


def test_conv_shares_parameters_and_keeps_its_attributes(conv: nn.Conv2d) -> None:
    layer = quant_conv(conv, 8)
    assert layer.weight is conv.weight and layer.bias is conv.bias
    assert isinstance(layer, nn.Conv2d)
    assert (layer.in_channels, layer.out_channels, layer.stride, layer.padding) == (6, 5, (2, 2), (1, 1))
    assert set(dict(layer.named_parameters())) == {"weight", "bias", "weight_quantizer.scale",
                                                   "input_quantizer.scale"}


def test_conv_without_quantization_is_the_conv(conv: nn.Conv2d) -> None:
    inputs = torch.randn(2, 6, 9, 9)
    assert torch.equal(QuantConv2d(conv, w_bits=None, a_bits=None)(inputs), conv(inputs))
    layer = quant_conv(conv, 4)
    calibrate_input(layer, inputs)
    for quantizer in (layer.weight_quantizer, layer.input_quantizer):
        quantizer.enabled = False
    assert torch.equal(layer(inputs), conv(inputs))


def test_conv_16_bit_is_within_1e_4_of_full_precision(conv: nn.Conv2d) -> None:
    inputs = torch.randn(2, 6, 9, 9)
    layer = quant_conv(conv, 16)
    calibrate_input(layer, inputs)
    assert relative_error(layer(inputs), conv(inputs)) < 1e-4


def test_conv_computes_with_both_fake_quantized_operands(conv: nn.Conv2d) -> None:
    inputs = torch.randn(2, 6, 9, 9)
    layer = quant_conv(conv, 4)
    calibrate_input(layer, inputs)
    expected = nn.functional.conv2d(layer.input_quantizer(inputs), layer.weight_quantizer(conv.weight), conv.bias,
                                    stride=2, padding=1)
    assert torch.equal(layer(inputs), expected)
    assert relative_error(layer(inputs), conv(inputs)) > 1e-3  # 4 bits do change the result


def test_conv_sees_weight_changes_at_once(conv: nn.Conv2d) -> None:
    inputs = torch.randn(1, 6, 9, 9)
    layer = quant_conv(conv, 8)
    calibrate_input(layer, inputs)
    before = layer(inputs)
    with torch.no_grad():
        conv.weight.mul_(0.5)
    assert not torch.allclose(layer(inputs), before)
    expected = nn.functional.conv2d(layer.input_quantizer(inputs), layer.weight_quantizer(conv.weight), conv.bias,
                                    stride=2, padding=1)
    assert torch.equal(layer(inputs), expected)


def test_split_gives_each_part_of_the_input_its_own_grid(conv: nn.Conv2d) -> None:
    generator = torch.Generator().manual_seed(0)
    upsampled = torch.randn(2, 4, 9, 9, generator=generator) * 0.05
    skip = torch.randn(2, 2, 9, 9, generator=generator) * 20.0
    inputs = torch.cat([upsampled, skip], dim=1)
    split = quant_conv(conv, 6, split=4)
    whole = quant_conv(conv, 6)
    calibrate_input(split, inputs)
    calibrate_input(whole, inputs)
    quantized_input = split.quantize_input(inputs)
    assert torch.equal(quantized_input[:, :4], split.input_quantizer(upsampled))
    assert torch.equal(quantized_input[:, 4:], split.split_input_quantizer(skip))
    assert split.input_quantizer.scale < split.split_input_quantizer.scale / 100
    # The small half survives a split grid; one shared grid of 64 levels flattens it.
    assert relative_error(quantized_input[:, :4], upsampled) < 0.05
    assert relative_error(whole.quantize_input(inputs)[:, :4], upsampled) > 0.5


@pytest.mark.parametrize("split", [0, 6, 7])
def test_split_must_cut_inside_the_channels(conv: nn.Conv2d, split: int) -> None:
    with pytest.raises(ValueError, match="split"):
        QuantConv2d(conv, w_bits=8, a_bits=8, split=split)


def test_linear_quantizes_per_output_row_and_matches_when_disabled() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(12, 7)
    inputs = torch.randn(3, 5, 12)
    layer = QuantLinear(linear, w_bits=8, a_bits=8)
    layer.weight_quantizer.init_range(layer.weight)
    calibrate_input(layer, inputs)
    assert layer.weight is linear.weight and layer.weight_quantizer.scale.shape == (7,)
    expected = nn.functional.linear(layer.input_quantizer(inputs), layer.weight_quantizer(linear.weight), linear.bias)
    assert torch.equal(layer(inputs), expected)
    assert relative_error(layer(inputs), linear(inputs)) < 0.02
    for quantizer in (layer.weight_quantizer, layer.input_quantizer):
        quantizer.enabled = False
    assert torch.equal(layer(inputs), linear(inputs))


def test_linear_split_cuts_the_last_dimension() -> None:
    layer = QuantLinear(nn.Linear(6, 2), w_bits=None, a_bits=8, split=4)
    inputs = torch.cat([torch.rand(3, 4), 100 + torch.rand(3, 2)], dim=-1)
    calibrate_input(layer, inputs)
    assert layer.input_quantizer.scale < 0.01 < layer.split_input_quantizer.scale


def test_quantizer_shapes_match_the_layer() -> None:
    layer = QuantConv2d(nn.Conv2d(3, 9, 1), w_bits=4, a_bits=8)
    assert isinstance(layer.weight_quantizer, UniformQuantizer)
    assert layer.weight_quantizer.scale.shape == (9,) and layer.input_quantizer.scale.shape == (1,)
    assert layer.split_input_quantizer is None
