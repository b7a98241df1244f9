from __future__ import annotations

import pytest
import torch
from torch import nn

from tfmq.quant.nn.layers import QuantConv2d, QuantLinear
from tfmq.quant.nn.quantizer import UniformQuantizer
from tfmq.quant.methods.adaround import (
    AdaRoundQuantizer,
    RoundingRegularizer,
    adaptive_rounding,
    attach,
    harden,
    rectified_sigmoid,
    rounding_penalty,
)


def quant_linear(bits: int = 4, init: str = "mse") -> QuantLinear:
    torch.manual_seed(0)
    layer = QuantLinear(nn.Linear(24, 6), w_bits=bits, a_bits=None, weight_init=init)
    layer.weight_quantizer.init_range(layer.weight)
    return layer


def grid(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor, int]:
    quantizer = layer.weight_quantizer
    return quantizer.scale.detach()[:, None], quantizer.zero_point[:, None], 2**quantizer.bits - 1


def test_initial_soft_rounding_reproduces_the_weight_inside_the_grid() -> None:
    layer = quant_linear(bits=4, init="mse")  # the MSE range clips some weights: both cases occur
    weight = layer.weight.detach().clone()
    scale, zero_point, top = grid(layer)
    inside = (weight / scale + zero_point >= 0) & (weight / scale + zero_point <= top)
    assert 0 < inside.sum() < weight.numel()
    assert not torch.allclose(layer.weight_quantizer(weight), weight, atol=1e-3)  # rounding to nearest moves W

    rounding = attach(layer)
    soft = rounding(layer.weight).detach()
    assert torch.allclose(soft[inside], weight[inside], atol=1e-6, rtol=0)
    # Outside the grid the weight is clipped to its ends, exactly as round-to-nearest clips it.
    assert torch.equal(soft[~inside], layer.weight_quantizer.base[0](weight)[~inside])


def test_soft_rounding_is_a_switch_on_the_layer_and_undone_by_an_error() -> None:
    layer = quant_linear()
    original, weight = layer.weight_quantizer, layer.weight.detach().clone()
    inputs = torch.randn(5, 24)
    with pytest.raises(KeyError):
        with adaptive_rounding([layer]) as roundings:
            assert layer.weight_quantizer is roundings[0] and isinstance(roundings[0], AdaRoundQuantizer)
            assert roundings[0].scale is original.scale  # the same grid, not a copy
            soft_weight = roundings[0](layer.weight)
            assert torch.equal(layer(inputs), nn.functional.linear(inputs, soft_weight, layer.bias))
            assert not torch.equal(soft_weight, original(layer.weight))
            raise KeyError("stop")
    assert layer.weight_quantizer is original
    assert torch.equal(layer.weight, weight)


def test_hard_rounding_is_written_into_the_weight_on_the_grid() -> None:
    layer = quant_linear(bits=3, init="minmax")
    weight = layer.weight.detach().clone()
    scale, zero_point, top = grid(layer)
    nearest = layer.weight_quantizer.integer_values(weight).float()
    generator = torch.Generator().manual_seed(1)
    with adaptive_rounding([layer]) as (rounding,):
        with torch.no_grad():  # stands in for training: arbitrary learnt decisions
            rounding.rounding.copy_(3 * torch.randn(rounding.rounding.shape, generator=generator))
        rounding.soft = False
        learnt_output = layer(torch.eye(24)).detach()
        up = rectified_sigmoid(rounding.rounding) >= 0.5

    expected = torch.clamp(torch.floor(weight / scale) + up + zero_point, 0, top)
    codes = layer.weight_quantizer.integer_values(layer.weight).float()
    assert torch.equal(codes, expected)
    assert not torch.equal(codes, nearest)  # the learnt decisions, not round-to-nearest
    assert (codes - nearest).abs().max() <= 1
    assert torch.allclose(layer.weight / scale + zero_point, codes, atol=1e-4)  # every weight on the grid
    assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight)  # round-to-nearest keeps it
    assert torch.equal(layer(torch.eye(24)), learnt_output)


def test_hardening_a_conv_keeps_its_forward() -> None:
    torch.manual_seed(0)
    layer = QuantConv2d(nn.Conv2d(3, 4, 3), w_bits=4, a_bits=None)
    layer.weight_quantizer.init_range(layer.weight)
    inputs = torch.randn(2, 3, 5, 5)
    rounding = attach(layer)
    rounding.soft = False
    hard_output = layer(inputs).detach()
    harden(layer)
    assert isinstance(layer.weight_quantizer, UniformQuantizer)
    assert not isinstance(layer.weight_quantizer, AdaRoundQuantizer)
    assert torch.equal(layer(inputs), hard_output)


def test_layers_without_weight_bits_are_left_alone() -> None:
    torch.manual_seed(0)
    layer = QuantLinear(nn.Linear(4, 4), w_bits=None, a_bits=8)
    with adaptive_rounding([layer]) as roundings:
        assert roundings == []
    assert not isinstance(layer.weight_quantizer, AdaRoundQuantizer)


def test_regulariser_is_off_in_warmup_then_anneals_beta_from_20_to_2() -> None:
    regularizer = RoundingRegularizer(iterations=100)
    assert (regularizer.weight, regularizer.warmup_iterations) == (0.01, 20)
    assert regularizer.beta(20) == 20.0
    assert regularizer.beta(60) == pytest.approx(11.0)
    assert regularizer.beta(100) == 2.0

    rounding = attach(quant_linear())
    count = rounding.rounding.numel()
    with torch.no_grad():
        rounding.rounding.zero_()  # h(V) = 0.5: the largest penalty, 1 per weight
    assert regularizer([rounding], 19).item() == 0.0
    assert regularizer([rounding], 20).item() == pytest.approx(0.01 * count)
    with torch.no_grad():
        rounding.rounding.fill_(0.4)
    h = rectified_sigmoid(torch.tensor(0.4)).item()
    assert regularizer([rounding], 100).item() == pytest.approx(0.01 * count * (1 - abs(2 * h - 1) ** 2), rel=1e-5)
    assert regularizer([rounding], 20).item() == pytest.approx(0.01 * count * (1 - abs(2 * h - 1) ** 20), rel=1e-5)
    with torch.no_grad():
        rounding.rounding.fill_(10.0)  # h(V) = 1: decided, no penalty
    assert regularizer([rounding], 50).item() == 0.0


def test_hardening_writes_the_decisions_even_with_weight_quantization_switched_off() -> None:
    layer = quant_linear()
    rounding = attach(layer)
    rounding.enabled = False  # e.g. set_quant_state(model, weight=False, ...) during reconstruction
    rounding.soft = False
    expected = rounding.dequantized(layer.weight).detach()
    harden(layer)
    assert torch.equal(layer.weight.detach(), expected)
    assert layer.weight_quantizer.enabled is False  # the switch carries over to the original quantizer


def _formula(rounding: AdaRoundQuantizer, weight: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W^ and the penalty written out as plain autograd formulas: what the fused passes must equal."""
    scale, zero_point, top = grid_of(rounding, weight)
    offsets = rectified_sigmoid(rounding.rounding)
    soft = (torch.clamp(torch.floor(weight / scale) + offsets + zero_point, 0, top) - zero_point) * scale
    return soft, (1 - (2 * offsets - 1).abs().pow(beta)).sum()


def grid_of(rounding: AdaRoundQuantizer, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return rounding.scale.detach().view(shape), rounding.zero_point.view(shape), 2**rounding.bits - 1


@pytest.mark.parametrize("beta", [20.0, 7.3, 2.0])
def test_fused_soft_rounding_and_penalty_match_the_formulas_in_value_and_gradient(beta: float) -> None:
    torch.manual_seed(0)
    layer = QuantConv2d(nn.Conv2d(6, 8, 3), w_bits=4, a_bits=None, weight_init="mse")
    layer.weight_quantizer.init_range(layer.weight)
    rounding = attach(layer)
    with torch.no_grad():  # spread h(V) over both clamps: offsets at exactly 0 and 1, and in between
        rounding.rounding.mul_(4).add_(torch.randn_like(rounding.rounding))
    weight = layer.weight.detach()
    upstream = torch.randn_like(weight)

    expected_weight, expected_penalty = _formula(rounding, weight, beta)
    expected_grad, = torch.autograd.grad((expected_weight * upstream).sum() + 0.3 * expected_penalty,
                                         rounding.rounding)
    fused_weight, fused_penalty = rounding(layer.weight), rounding_penalty(rounding.rounding, beta)
    fused_grad, = torch.autograd.grad((fused_weight * upstream).sum() + 0.3 * fused_penalty, rounding.rounding)

    offsets = rectified_sigmoid(rounding.rounding)
    assert bool((offsets == 0).any()) and bool((offsets == 1).any()) and bool(((offsets > 0) & (offsets < 1)).any())
    assert torch.allclose(fused_weight, expected_weight, atol=1e-6, rtol=0)
    assert fused_penalty.item() == pytest.approx(expected_penalty.item(), rel=1e-5)
    assert torch.allclose(fused_grad, expected_grad, atol=1e-6, rtol=1e-5)
    assert expected_grad.abs().max() > 1e-3  # the comparison is not between two zeros


def test_a_rounding_quantizer_refuses_a_weight_it_was_not_made_for() -> None:
    rounding = attach(quant_linear())
    with pytest.raises(ValueError, match="rounds a weight of shape"):
        rounding(torch.zeros(3, 24))
