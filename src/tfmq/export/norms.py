"""Float normalisations of the export twin, written as the runtimes run them in fewest passes."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


class GroupNormThenAffine(nn.Module):
    """`nn.GroupNorm` as a group normalisation without affine, then its per-channel scale and shift as a
    BatchNormalization of mean 0 and variance 1 with epsilon 0: the same values, in one pass over the tensor
    where the exporter's Mul and Add take two (onnxruntime folds the statistics into the scale and shift)."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        if not norm.affine:
            raise ValueError("a GroupNorm without affine parameters exports as one op already")
        self.num_groups, self.eps = norm.num_groups, norm.eps
        self.weight = nn.Parameter(norm.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(norm.bias.detach().clone(), requires_grad=False)
        self.register_buffer("mean", torch.zeros_like(self.weight), persistent=False)
        self.register_buffer("variance", torch.ones_like(self.weight), persistent=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        normalized = functional.group_norm(inputs, self.num_groups, eps=self.eps)
        return functional.batch_norm(normalized, self.mean, self.variance, self.weight, self.bias,
                                     training=False, eps=0.0)


def with_fused_group_norms(model: nn.Module) -> int:
    """Replace every affine `nn.GroupNorm` of `model` by a GroupNormThenAffine, in place; returns how many."""
    norms = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.GroupNorm) and module.affine]
    for name, norm in norms:
        model.set_submodule(name, GroupNormThenAffine(norm))
    return len(norms)
