"""Float normalisations of the export twin, written as the runtimes run them in fewest passes."""

from __future__ import annotations

from collections.abc import Callable

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


class ChannelMomentsGroupNorm(nn.Module):
    """`nn.GroupNorm` from per-channel moments, as TorchInductor compiles it in fewest float operations on
    channels-last tensors: the mean and mean square of each channel are reductions vectorised across channels,
    and small matmuls (which Inductor leaves to the BLAS, so their outputs are stored, not recomputed per
    element) average them over each group and spread each group's values back to its channels. Inductor's
    own GroupNorm reduces each group's few channels in partly masked vectors.

    The moments are taken about one value of each group (its first channel's first element), so the variance
    (mean square less squared mean) keeps float32's precision when a group's mean is far from zero."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        if not norm.affine:
            raise ValueError("ChannelMomentsGroupNorm takes an affine GroupNorm")
        self.num_groups, self.eps = norm.num_groups, norm.eps
        self.group_size = norm.num_channels // norm.num_groups
        self.weight = nn.Parameter(norm.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(norm.bias.detach().clone(), requires_grad=False)
        membership = (torch.arange(norm.num_channels)[:, None] // self.group_size
                      == torch.arange(norm.num_groups)[None, :]).float()
        self.register_buffer("group_average", membership / self.group_size, persistent=False)  # (channels, groups)
        self.register_buffer("group_spread", membership.t().contiguous(), persistent=False)  # (groups, channels)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dim() < 3:  # no spatial axes to reduce (a mean over none would reduce them all)
            return functional.group_norm(inputs, self.num_groups, self.weight, self.bias, self.eps)
        batch, channels = inputs.shape[:2]
        spatial = tuple(range(2, inputs.dim()))
        shape = (batch, channels) + (1,) * len(spatial)
        origin = inputs[:, ::self.group_size].flatten(2)[..., 0]  # (batch, groups): each group's first element
        centered = inputs - (origin @ self.group_spread).reshape(shape)
        moments = torch.cat([centered.mean(spatial), (centered * centered).mean(spatial)]) @ self.group_average
        offset, mean_square = moments[:batch], moments[batch:]
        inverse_deviation = torch.rsqrt((mean_square - offset * offset).clamp_min(0) + self.eps)
        spread = torch.cat([inverse_deviation, -(origin + offset) * inverse_deviation]) @ self.group_spread
        scale = spread[:batch] * self.weight
        shift = spread[batch:] * self.weight + self.bias
        return inputs * scale.reshape(shape) + shift.reshape(shape)


def replace_group_norms(model: nn.Module, form: Callable[[nn.GroupNorm], nn.Module]) -> int:
    """Replace every affine `nn.GroupNorm` of `model` by `form(norm)`, in place; returns how many."""
    norms = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.GroupNorm) and module.affine]
    for name, norm in norms:
        model.set_submodule(name, form(norm))
    return len(norms)
