"""One-shot second-order rounding (GPTQ, Frantar et al. 2023), as a start for AdaRound.

GPTQ rounds a layer's weight one input column at a time on the layer's fixed grid and spreads each column's
rounding error over the columns not rounded yet, weighted by the inverse Hessian `H = X^T X` of the layer's
inputs, so that the layer's output on those inputs moves as little as possible. No iterations: one
Cholesky factorisation and one pass over the columns per layer.

AdaRound learns, per weight, to round down or up from a weight it was given. `compensated_weight` returns
the weight as GPTQ had updated it when it rounded each column: its round-to-nearest is GPTQ's result, so
AdaRound started from it starts at GPTQ's decisions, with soft offsets telling how close each one was.
"""

from __future__ import annotations

import torch
from torch import nn

from tfmq.quant.nn.layers import QuantConv2d, QuantLayer

# The Hessian's rows are input vectors (one per output position of a conv): more than enough beyond this.
MAX_ROWS = 16_384
# Added to the Hessian's diagonal, as a fraction of its mean: keeps it invertible (the GPTQ paper's value).
DAMPING = 0.01
BLOCK = 128  # columns updated at once: the result is the same for any block, the speed is not


def supports(layer: QuantLayer) -> bool:
    """Whether a layer's input vectors can be formed: linears, and convs without groups or padding modes."""
    if isinstance(layer, QuantConv2d):
        return layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
    return True


def input_rows(layer: QuantLayer, inputs: torch.Tensor) -> torch.Tensor:
    """The vectors the weight's rows are multiplied with, one per row of the result: (N, in_features)."""
    if isinstance(layer, QuantConv2d):
        patches = nn.functional.unfold(inputs, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                                       stride=layer.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return inputs.reshape(-1, inputs.shape[-1])


class InputHessian:
    """`X^T X` over the inputs a layer is called with, from at most MAX_ROWS of their vectors (drawn at random
    from each call's, in proportion to `rows_per_call`)."""

    def __init__(self, layer: QuantLayer, rows_per_call: int, generator: torch.Generator) -> None:
        columns = layer.weight[0].numel()
        self.layer = layer
        self.rows_per_call = rows_per_call
        self.generator = generator
        self.sum = torch.zeros(columns, columns, device=layer.weight.device)
        self.rows = 0

    def add(self, inputs: torch.Tensor) -> None:
        rows = input_rows(self.layer, inputs.detach()).float()
        if len(rows) > self.rows_per_call:
            chosen = torch.randperm(len(rows), generator=self.generator, device="cpu")[:self.rows_per_call]
            rows = rows[chosen.to(rows.device)]
        self.sum.addmm_(rows.T, rows)
        self.rows += len(rows)


def _inverse_cholesky(hessian: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of H^-1, the damping raised tenfold until H is positive definite."""
    mean_diagonal = hessian.diagonal().mean().clamp_min(1e-12)
    for attempt in range(6):
        damped = hessian + torch.eye(len(hessian), device=hessian.device) * (DAMPING * 10**attempt * mean_diagonal)
        factor, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
    raise ValueError("the layer's input Hessian is not positive definite even with damping")


@torch.no_grad()
def compensated_weight(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                       top: int) -> torch.Tensor:
    """GPTQ on `weight` (out channels first) over the grid `scale`, `zero_point` (one per out channel, codes
    0..top): each column as it was when rounded, after the error of the columns before it was spread on it."""
    shape = weight.shape
    work = weight.detach().float().reshape(shape[0], -1).clone()
    hessian = hessian.float().clone()
    dead = hessian.diagonal() == 0  # inputs that were always 0: their weights do not matter
    hessian[dead, dead] = 1.0
    inverse = _inverse_cholesky(hessian)
    scale, zero_point = scale.reshape(-1, 1).float(), zero_point.reshape(-1, 1).float()
    result = torch.empty_like(work)
    for start in range(0, work.shape[1], BLOCK):
        stop = min(start + BLOCK, work.shape[1])
        block = work[:, start:stop]
        errors = torch.empty_like(block)
        for index in range(stop - start):
            column = block[:, index:index + 1]
            result[:, start + index:start + index + 1] = column
            rounded = (torch.clamp(torch.round(column / scale) + zero_point, 0, top) - zero_point) * scale
            error = (column - rounded) / inverse[start + index, start + index]
            block[:, index:] -= error * inverse[start + index, start + index:stop]
            errors[:, index:index + 1] = error
        work[:, stop:] -= errors @ inverse[start:stop, stop:]
    return result.reshape(shape).to(weight.dtype)
