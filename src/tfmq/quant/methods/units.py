"""The units of block reconstruction: what to capture and what to learn together, and the BRECQ units of a
diffusers UNet. A method with other needs (TFMQ's temporal information block) builds its own units."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D
from torch import nn

from tfmq.denoiser import denoiser_call
from tfmq.quant.methods.capture import Call, ModelInputs
from tfmq.quant.nn.layers import QuantLayer
from tfmq.quant.nn.quantizer import UniformQuantizer
from tfmq.quant.wrap import activation_quantizers, quant_layers, quantizers

# The blocks of BRECQ in a diffusers UNet; quantized layers outside all of them are units of their own.
# A diffusion transformer's blocks are units of their own (in a UNet they lie inside a Transformer2DModel).
BLOCK_TYPES: tuple[type[nn.Module], ...] = (
    ResnetBlock2D, ResnetBlockCondNorm2D, Transformer2DModel, BasicTransformerBlock, Attention, Downsample2D,
    Upsample2D,
)


@dataclass(frozen=True)
class ReconstructionUnit:
    """What to reconstruct together, from which inputs, against which targets.

    `inputs_from`: modules of the quantized model; the arguments of their (single) call in a model
    forward are the unit's inputs. `targets_from`: modules of the full-precision model; their outputs
    (flattened to a tuple of tensors) are the targets. `forward(*calls)` replays the quantized unit from
    one `Call` per `inputs_from` module and returns what is compared with the targets, in their order.
    `layers` get AdaRound, the `scale` of `activation_quantizers` gets LSQ; either may be empty.
    """

    name: str
    inputs_from: tuple[nn.Module, ...]
    targets_from: tuple[nn.Module, ...]
    forward: Callable[..., Any]
    layers: tuple[QuantLayer, ...]
    activation_quantizers: tuple[UniformQuantizer, ...]

    @classmethod
    def block(cls, name: str, model: nn.Module, full_precision: nn.Module) -> ReconstructionUnit:
        """The submodule `name` of `model` against the same-named submodule of `full_precision`,
        learning every quantized layer and activation quantizer inside it."""
        module = model.get_submodule(name)

        def replay(call: Call) -> Any:
            return module(*call.args, **call.kwargs)

        return cls(
            name=name,
            inputs_from=(module,),
            targets_from=(full_precision.get_submodule(name),),
            forward=replay,
            layers=tuple(layer for _, layer in quant_layers(module)),
            activation_quantizers=tuple(quantizer for _, quantizer in activation_quantizers(module)),
        )


def unet_units(model: nn.Module, full_precision: nn.Module, example_inputs: ModelInputs) -> list[ReconstructionUnit]:
    """The BRECQ units of a wrapped UNet, in the order one forward of `example_inputs` reaches them.

    Units: every outermost ResnetBlock2D, attention / Transformer2DModel and down/up-sampler, and each
    quantized layer that lies in none of them (e.g. the time-embedding linears; conv_in and conv_out
    when they are quantized). Modules with nothing quantized, or that the forward never calls, are
    left out. The resnets' `time_emb_proj` belongs to its block, as in Q-Diffusion.
    """
    present = dict(full_precision.named_modules())
    # a cache site's stand-in keeps the quantized layers it replaces, which the forward no longer calls
    names = [name for name in _unit_names(model) if name in present]
    order = _call_order(full_precision, names, example_inputs)
    return [ReconstructionUnit.block(name, model, full_precision) for name in order]


def _unit_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    covered: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in covered):
            continue
        if isinstance(module, BLOCK_TYPES):
            covered.append(name)
            if any(quantizer.bits is not None for _, quantizer in quantizers(module)):
                names.append(name)
        elif isinstance(module, QuantLayer):
            covered.append(name)
            names.append(name)
    return names


def _call_order(model: nn.Module, names: Sequence[str], inputs: ModelInputs) -> list[str]:
    """`names` sorted by when one forward of `model` first calls them (registration order differs:
    diffusers registers a block's attentions before the resnets that run first)."""
    order: list[str] = []
    handles = []
    for name in names:
        def record(module: nn.Module, args: tuple, name: str = name) -> None:
            if name not in order:
                order.append(name)
        handles.append(model.get_submodule(name).register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            denoiser_call(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return order
