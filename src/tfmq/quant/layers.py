"""Fake-quantized twins of the UNet's ops: Conv2d, Linear, and the attention matmuls.

The twins subclass the modules they replace and share their parameters, so parameter names, the
attributes diffusers reads (`in_channels`, `weight`, ...) and `isinstance` checks stay as they were.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from tfmq.quant.quantizer import UniformQuantizer


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
        self.weight_quantizer = UniformQuantizer(w_bits, channels=self.weight.shape[0], init=weight_init).to(device)
        self.input_quantizer = UniformQuantizer(a_bits, init=act_init).to(device)
        self.split = split
        self.split_input_quantizer = (
            None if split is None else UniformQuantizer(a_bits, init=act_init).to(device)
        )

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


class QuantAttnProcessor(nn.Module):
    """diffusers' plain attention math with the two matmuls' inputs fake-quantized.

    Q·Kᵀ and softmax·V are written out (diffusers' default processor hides them inside
    `scaled_dot_product_attention`), so Q, K, the softmax output and V each pass a per-tensor
    quantizer. An `nn.Module`, so the quantizers live in the model's state_dict under
    `<attention>.processor.*`. The projections to_q/to_k/to_v/to_out are QuantLinear layers of
    their own, wrapped with the rest of the model.
    """

    def __init__(self, a_bits: int | None, probs_bits: int | None, act_init: str = "mse") -> None:
        super().__init__()
        self.query_quantizer = UniformQuantizer(a_bits, init=act_init)
        self.key_quantizer = UniformQuantizer(a_bits, init=act_init)
        self.probs_quantizer = UniformQuantizer(probs_bits, init=act_init)
        self.value_quantizer = UniformQuantizer(a_bits, init=act_init)

    @staticmethod
    def unsupported_reason(attn: Attention) -> str | None:
        """Why this processor cannot stand in for `attn`'s current one, or None if it can."""
        if not isinstance(attn.processor, (AttnProcessor, AttnProcessor2_0, QuantAttnProcessor)):
            return f"its processor {type(attn.processor).__name__} is not diffusers' plain attention"
        if attn.norm_q is not None or attn.norm_k is not None:
            return "it normalises queries and keys (qk_norm)"
        return None

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Attention.forward passes on only the keyword arguments that the processor's __call__
        # names; nn.Module.__call__ names none, so the signature is spelled out here.
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channels, height * width).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = self.query_quantizer(attn.head_to_batch_dim(query))
        key = self.key_quantizer(attn.head_to_batch_dim(key))
        value = self.value_quantizer(attn.head_to_batch_dim(value))

        attention_probs = self.probs_quantizer(attn.get_attention_scores(query, key, attention_mask))
        hidden_states = attn.batch_to_head_dim(torch.bmm(attention_probs, value))

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
