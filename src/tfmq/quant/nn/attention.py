"""diffusers' attention with the inputs of its two matmuls fake-quantized."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from tfmq.quant.nn.quantizer import UniformQuantizer


class QuantAttnProcessor(nn.Module):
    """diffusers' plain attention math with the two matmuls' inputs fake-quantized.

    Q·Kᵀ and softmax·V are written out (diffusers' default processor hides them inside
    `scaled_dot_product_attention`), so Q, K, the softmax output and V each pass a per-tensor
    quantizer. An `nn.Module`, so the quantizers live in the model's state_dict under
    `<attention>.processor.*`. The projections to_q/to_k/to_v/to_out are QuantLinear layers of
    their own, wrapped with the rest of the model.
    """

    def __init__(self, a_bits: int | None, probs_bits: int | None, act_init: str = "mse",
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.query_quantizer = UniformQuantizer(a_bits, init=act_init, device=device)
        self.key_quantizer = UniformQuantizer(a_bits, init=act_init, device=device)
        self.probs_quantizer = UniformQuantizer(probs_bits, init=act_init, device=device)
        self.value_quantizer = UniformQuantizer(a_bits, init=act_init, device=device)

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

        attention_probs = self.probs_quantizer(attention_probabilities(attn, query, key, attention_mask))
        hidden_states = attn.batch_to_head_dim(torch.bmm(attention_probs, value))

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attention_probabilities(attn: Attention, query: torch.Tensor, key: torch.Tensor,
                            attention_mask: torch.Tensor | None) -> torch.Tensor:
    """`attn.get_attention_scores`, and in an ONNX export the same math as a matmul and a scale: its baddbmm
    with beta 0 exports as a zero tensor the size of the scores, a Mul by 0 and an Add, three passes over
    the scores that onnxruntime runs as written (the torch model keeps diffusers' call, bit for bit)."""
    if not torch.onnx.is_in_onnx_export():
        return attn.get_attention_scores(query, key, attention_mask)
    dtype = query.dtype
    if attn.upcast_attention:
        query, key = query.float(), key.float()
    scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
    if attention_mask is not None:
        scores = scores + attention_mask
    if attn.upcast_softmax:
        scores = scores.float()
    return scores.softmax(dim=-1).to(dtype)
