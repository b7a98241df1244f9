"""AdaRound: learn, per weight, whether to round down or up, instead of rounding to nearest.

Each weight gets a variable V; its soft rounding offset `h(V) = clamp(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)`
replaces the fractional part of W/s: `W^ = s * (clamp(floor(W/s) + h(V) + z, 0, 2^b - 1) - z)`. A regulariser
pushes every h(V) to 0 or 1 as its exponent beta is annealed; at the end each weight is rounded hard
(h(V) >= 0.5 -> up) and the decision is written into the layer's weight, so the layer's ordinary
round-to-nearest forward reproduces it and the checkpoint stores its codes.

Soft rounding is a switch on the layer: while `adaptive_rounding(layers)` is open, each layer's
`weight_quantizer` is an `AdaRoundQuantizer` sharing the original's step and zero point; on exit the
original quantizer is back in place.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from tfmq.quant.nn.layers import QuantLayer
from tfmq.quant.nn.quantizer import UniformQuantizer

# The stretch of the rectified sigmoid: h(V) reaches exactly 0 and 1 for finite V (AdaRound paper).
ZETA = 1.1
GAMMA = -0.1


def rectified_sigmoid(rounding: torch.Tensor) -> torch.Tensor:
    """h(V): the soft rounding offset in [0, 1]."""
    return torch.clamp(torch.sigmoid(rounding) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(offset: torch.Tensor) -> torch.Tensor:
    """A V with h(V) = `offset`, for offsets in [0, 1) (the fractional parts of W/s)."""
    return torch.logit((offset - GAMMA) / (ZETA - GAMMA))


class _SoftRoundedWeight(torch.autograd.Function):
    """W^ = s * (clamp(F + h(V), 0, 2^b - 1) - z) from V, where F = floor(W/s) + z is fixed while the rounding is
    learnt: the same values and gradient as autograd through the formula, in a few passes over the weight
    (AdaRound's cost per step is the weight's size, not the batch's)."""

    @staticmethod
    def forward(ctx, rounding: torch.Tensor, floor_codes: torch.Tensor, scale: torch.Tensor,
                zero_point: torch.Tensor, top: int) -> torch.Tensor:
        sigmoid = torch.sigmoid(rounding)
        stretched = sigmoid * (ZETA - GAMMA) + GAMMA
        passes = (stretched >= 0) & (stretched <= 1)  # torch.clamp passes the gradient at its bounds too
        codes = stretched.clamp_(0, 1).add_(floor_codes)
        passes &= (codes >= 0) & (codes <= top)
        ctx.save_for_backward(sigmoid.mul_(1 - sigmoid).mul_(passes).mul_(scale * (ZETA - GAMMA)))
        return codes.clamp_(0, top).sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None, None, None


class _RoundingPenalty(torch.autograd.Function):
    """sum(1 - |2 h(V) - 1|^beta) and its gradient in V, in a few passes over V."""

    @staticmethod
    def forward(ctx, rounding: torch.Tensor, beta: float) -> torch.Tensor:
        sigmoid = torch.sigmoid(rounding)
        stretched = sigmoid * (ZETA - GAMMA) + GAMMA
        passes = (stretched >= 0) & (stretched <= 1)
        centred = stretched.clamp_(0, 1).mul_(2).sub_(1)
        distance = centred.abs()
        powered = distance.pow(beta)
        total = distance.numel() - powered.sum()
        # d/dV -|c|^beta = -beta |c|^(beta - 1) sign(c) * 2 h'(V); |c|^(beta - 1) is 0 at c = 0 for beta > 1
        slope = torch.where(distance > 0, powered.div_(distance), 0.0).mul_(centred.sign_())
        slope.mul_(sigmoid.mul_(1 - sigmoid).mul_(passes)).mul_(-2 * beta * (ZETA - GAMMA))
        ctx.save_for_backward(slope)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (slope,) = ctx.saved_tensors
        return grad * slope, None


def rounding_penalty(rounding: torch.Tensor, beta: float) -> torch.Tensor:
    """sum(1 - |2 h(V) - 1|^beta): 0 where every offset is decided (0 or 1), one per weight at h(V) = 0.5."""
    return _RoundingPenalty.apply(rounding, float(beta))


class AdaRoundQuantizer(UniformQuantizer):
    """Stands in for a layer's weight quantizer while its rounding is learnt.

    Shares `scale`, `zero_point` and `initialized` with the quantizer it replaces (same tensors), so
    the grid is the one the range search chose and stays fixed. `soft` selects the training mode
    (W^ from h(V), differentiable in V); with `soft = False` it applies the hard decisions, which is
    what `harden` will write into the weight. It rounds the weight it was made for: floor(W/s) + z is
    computed once, since neither the weight nor the grid changes while the rounding is learnt.
    """

    def __init__(self, base: UniformQuantizer, weight: torch.Tensor) -> None:
        if not base.per_channel or base.bits is None or not base.has_range():
            raise ValueError("AdaRound needs a weight quantizer with bits and its range set")
        super().__init__(base.bits, channels=base.channels, init=base.init, device=base.scale.device)
        self.scale = base.scale
        self.zero_point = base.zero_point
        self.initialized = base.initialized
        self.enabled = base.enabled
        self.base = [base]  # a list: not a submodule, so `quantizers(model)` does not count it twice
        self.soft = True
        with torch.no_grad():
            scale, zero_point = self._grid(weight)
            scaled = weight.detach().float() / scale
            floor = torch.floor(scaled)
            self.floor_codes = floor + zero_point  # not a buffer: it lives only while the rounding is learnt
            self.rounding = nn.Parameter(inverse_rectified_sigmoid(scaled - floor))

    def offsets(self) -> torch.Tensor:
        """h(V) in soft mode, the hard 0/1 decisions otherwise."""
        soft_offsets = rectified_sigmoid(self.rounding)
        return soft_offsets if self.soft else (soft_offsets >= 0.5).to(soft_offsets.dtype)

    def _check_weight(self, weight: torch.Tensor) -> None:
        if weight.shape != self.floor_codes.shape:
            raise ValueError(f"this AdaRound quantizer rounds a weight of shape {tuple(self.floor_codes.shape)}, "
                             f"got {tuple(weight.shape)}")

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """floor(W/s) + h(V) + z, clamped to the grid (integers in hard mode)."""
        self._check_weight(weight)
        return torch.clamp(self.floor_codes + self.offsets(), 0, 2**self.bits - 1)

    def dequantized(self, weight: torch.Tensor) -> torch.Tensor:
        """W^ = (codes - z) * s, whether or not quantization is switched on."""
        scale, zero_point = self._grid(weight)
        if self.soft:
            self._check_weight(weight)
            return _SoftRoundedWeight.apply(self.rounding, self.floor_codes, scale, zero_point, 2**self.bits - 1)
        return (self.codes(weight) - zero_point) * scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.dequantized(weight).to(weight.dtype) if self.enabled else weight

    def extra_repr(self) -> str:
        return super().extra_repr() + f", adaround={'soft' if self.soft else 'hard'}"


def attach(layer: QuantLayer, start: torch.Tensor | None = None) -> AdaRoundQuantizer:
    """Switch `layer` to learnt rounding, V initialised so that W^ = W inside the grid; with `start` (a weight
    of the layer's shape, e.g. GPTQ's) the rounding is learnt around it instead of the layer's weight."""
    if isinstance(layer.weight_quantizer, AdaRoundQuantizer):
        raise ValueError("this layer is already in AdaRound mode")
    rounding = AdaRoundQuantizer(layer.weight_quantizer, layer.weight if start is None else start)
    layer.weight_quantizer = rounding
    return rounding


def detach(layer: QuantLayer) -> None:
    """Put the layer's original weight quantizer back, leaving the weight as it was."""
    rounding = layer.weight_quantizer
    if not isinstance(rounding, AdaRoundQuantizer):
        raise ValueError("this layer is not in AdaRound mode")
    base = rounding.base[0]
    base.enabled = rounding.enabled  # a set_quant_state meanwhile applies to the original too
    layer.weight_quantizer = base


def harden(layer: QuantLayer) -> None:
    """Round hard (h(V) >= 0.5 -> up), make `(q - z) * s` the weight and leave AdaRound mode.

    Round-to-nearest of (q - z) * s on the same grid gives q back, so the layer's ordinary forward and
    `integer_values` reproduce the learnt decisions exactly.
    """
    rounding = layer.weight_quantizer
    if not isinstance(rounding, AdaRoundQuantizer):
        raise ValueError("this layer is not in AdaRound mode")
    with torch.no_grad():
        rounding.soft = False
        layer.replace_weight(rounding.dequantized(layer.weight))
    detach(layer)


@contextmanager
def adaptive_rounding(layers: Sequence[QuantLayer], starts: Mapping[QuantLayer, torch.Tensor] | None = None
                      ) -> Iterator[list[AdaRoundQuantizer]]:
    """Learnt rounding for `layers` (those with quantized weights) while the block is open, each around its
    weight or its entry in `starts` (see `attach`).

    Yields the AdaRound quantizers (their `rounding` are the parameters to train). On a normal exit
    every layer is rounded hard and its weight overwritten; on an exception the layers go back to
    their original quantizers with their weights untouched.
    """
    roundable = [layer for layer in layers if layer.weight_quantizer.bits is not None]
    attached: list[QuantLayer] = []
    try:
        for layer in roundable:
            attach(layer, (starts or {}).get(layer))
            attached.append(layer)
        yield [layer.weight_quantizer for layer in attached]  # type: ignore[misc]
    except BaseException:
        for layer in attached:
            detach(layer)
        raise
    for layer in attached:
        harden(layer)


@contextmanager
def hard_rounding(layers: Sequence[QuantLayer], starts: Mapping[QuantLayer, torch.Tensor]) -> Iterator[None]:
    """Each of `layers` rounded to nearest from its entry in `starts` while the block is open, to measure a
    start; afterwards the layers are as they were."""
    attached: list[QuantLayer] = []
    try:
        for layer in layers:
            attach(layer, starts.get(layer)).soft = False
            attached.append(layer)
        yield
    finally:
        for layer in attached:
            detach(layer)


@dataclass(frozen=True)
class RoundingRegularizer:
    """`weight * sum(1 - |2 h(V) - 1|^beta)`: zero where every h(V) is 0 or 1.

    Off for the first `warmup` fraction of `iterations`; then beta falls linearly from `beta_start`
    to `beta_end` (reached at `iterations`). A large beta leaves h(V) free except near 0.5; a small
    one pulls every offset towards 0 or 1 (AdaRound paper, section 3.3).
    """

    iterations: int
    weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2

    @property
    def warmup_iterations(self) -> int:
        return math.ceil(self.warmup * self.iterations)

    def active(self, iteration: int) -> bool:
        return iteration >= self.warmup_iterations

    def beta(self, iteration: int) -> float:
        """The exponent at `iteration` (beta_start until the warm-up ends)."""
        span = self.iterations - self.warmup_iterations
        if span <= 0:
            return self.beta_end
        progress = min(max((iteration - self.warmup_iterations) / span, 0.0), 1.0)
        return self.beta_end + (self.beta_start - self.beta_end) * (1.0 - progress)

    def __call__(self, roundings: Sequence[AdaRoundQuantizer], iteration: int) -> torch.Tensor:
        if not roundings:
            return torch.zeros(())
        reference = roundings[0].rounding
        if not self.active(iteration):
            return reference.new_zeros(())
        beta = self.beta(iteration)
        return self.weight * sum(rounding_penalty(quantizer.rounding, beta) for quantizer in roundings)
