"""Fake quantization of diffusion UNets: config, quantizer, quantized layers and model wrapping."""

from tfmq.quant.config import QuantConfig
from tfmq.quant.nn import QuantAttnProcessor, QuantConv2d, QuantLayer, QuantLinear, UniformQuantizer
from tfmq.quant.wrap import (
    activation_quantizers,
    find_shortcut_splits,
    observe_activations,
    quant_layers,
    quantize_model,
    quantizers,
    set_quant_state,
)

__all__ = [
    "QuantAttnProcessor",
    "QuantConfig",
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "UniformQuantizer",
    "activation_quantizers",
    "find_shortcut_splits",
    "observe_activations",
    "quant_layers",
    "quantize_model",
    "quantizers",
    "set_quant_state",
]
