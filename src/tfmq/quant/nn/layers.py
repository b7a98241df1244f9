"""Fake-quantized twins of the UNet's Conv2d and Linear layers.

The twins subclass the modules they replace and share their parameters, so parameter names, the
attributes diffusers reads (`in_channels`, `weight`, ...) and `isinstance` checks stay as they were.
The attention matmuls have their own processor, `tfmq.quant.nn.attention`.
"""

from __future__ import annotations

import torch
from torch import nn

from tfmq.quant.nn.quantizer import UniformQuantizer


class QuantLayer:
    """What QuantConv2d and QuantLinear share: a per-output-channel weight quantizer and a per-tensor
    input quantizer, optionally a second input quantizer for the channels from `split` on.

    The split serves Q-Diffusion's shortcut splitting: in UNet up-blocks a layer reads
    `cat([upsampled, skip])`, two halves with very different ranges, so each gets its own grid.
    """

    weight: nn.Parameter
    weight_quantizer: UniformQuantizer
    input_quantizer: UniformQuantizer
    split_input_quantizer: UniformQuantizer | None
    split: int | None
    channel_dim: int

    def _add_quantizers(
        self,
        *,
        in_channels: int,
        w_bits: int | None,
        a_bits: int | None,
        weight_init: str,
        act_init: str,
        split: int | None,
    ) -> None:
        if split is not None and not 0 < split < in_channels:
            raise ValueError(f"split must lie strictly between 0 and {in_channels} input channels, got {split}")
        device = self.weight.device
        self.weight_quantizer = UniformQuantizer(w_bits, channels=self.weight.shape[0], init=weight_init, device=device)
        self.input_quantizer = UniformQuantizer(a_bits, init=act_init, device=device)
        self.split = split
        self.split_input_quantizer = (
            None if split is None else UniformQuantizer(a_bits, init=act_init, device=device)
        )

    def replace_weight(self, value: torch.Tensor) -> None:
        """Set the weight to `value` in storage of its own, never in place: a twin's weights share the
        full-precision model's storage (`tfmq.quant.wrap.quantize_model`)."""
        self.weight = nn.Parameter(value.detach().to(self.weight.device, self.weight.dtype, copy=True),
                                   requires_grad=self.weight.requires_grad)

    def extra_repr(self) -> str:
        # The mixin comes first in the twins' bases: super() is the wrapped op's own repr.
        return super().extra_repr() + ("" if self.split is None else f", split={self.split}")

    def quantize_input(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.split is None:
            return self.input_quantizer(inputs)
        head, tail = inputs.split([self.split, inputs.shape[self.channel_dim] - self.split], dim=self.channel_dim)
        return torch.cat([self.input_quantizer(head), self.split_input_quantizer(tail)], dim=self.channel_dim)


class QuantConv2d(QuantLayer, nn.Conv2d):
    """`conv` with fake-quantized weight and input; the bias stays in full precision.

    Shares `conv`'s weight and bias parameters (no copy). The weight is quantized on every call,
    so changes to it (AdaRound, loading a state) take effect at once.
    """

    channel_dim = 1

    def __init__(
        self,
        conv: nn.Conv2d,
        *,
        w_bits: int | None,
        a_bits: int | None,
        weight_init: str = "mse",
        act_init: str = "mse",
        split: int | None = None,
    ) -> None:
        # Built on the meta device: the parameters are replaced by conv's right after.
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )
        self.weight = conv.weight
        self.bias = conv.bias
        self._add_quantizers(
            in_channels=conv.in_channels, w_bits=w_bits, a_bits=a_bits,
            weight_init=weight_init, act_init=act_init, split=split,
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(inputs), self.weight_quantizer(self.weight), self.bias)


class QuantLinear(QuantLayer, nn.Linear):
    """`linear` with fake-quantized weight and input; the bias stays in full precision.

    Shares `linear`'s parameters, like QuantConv2d.
    """

    channel_dim = -1

    def __init__(
        self,
        linear: nn.Linear,
        *,
        w_bits: int | None,
        a_bits: int | None,
        weight_init: str = "mse",
        act_init: str = "mse",
        split: int | None = None,
    ) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self._add_quantizers(
            in_channels=linear.in_features, w_bits=w_bits, a_bits=a_bits,
            weight_init=weight_init, act_init=act_init, split=split,
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.quantize_input(inputs), self.weight_quantizer(self.weight), self.bias)
