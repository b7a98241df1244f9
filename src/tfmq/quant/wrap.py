"""Turn a model (a diffusers UNet or any module of Conv2d/Linear layers) into its fake-quantized twin.

The twin is a copy of the module tree whose parameters and buffers are new tensors over the full-precision
model's storage: the two together take the memory of one until a method changes a weight, which then gets
storage of its own (`QuantLayer.replace_weight`); nothing writes into the shared storage, so the full-precision model stays
untouched and usable (reconstruction needs its outputs as targets). The copy keeps its class, forward, config
and diffusers API, so it drops into a pipeline in place of the original.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from tfmq.quant.config import QuantConfig
from tfmq.quant.nn.attention import QuantAttnProcessor
from tfmq.quant.nn.layers import QuantConv2d, QuantLayer, QuantLinear
from tfmq.quant.nn.quantizer import UniformQuantizer


@dataclass(frozen=True)
class LayerPlan:
    """How one Conv2d/Linear is wrapped: its bit widths, and the input channel where a split shortcut's skip
    tensor begins (None: one input quantizer)."""

    w_bits: int | None
    a_bits: int | None
    split: int | None = None


@dataclass(frozen=True)
class AttentionPlan:
    """The bit widths of a quantizing attention processor: Q, K and V, and the softmax output."""

    a_bits: int | None
    probs_bits: int | None


@dataclass(frozen=True)
class WrappingPlan:
    """Which modules of a model become quantized twins, by qualified name: what `quantize_model` builds from
    a config, and what a checkpoint's manifest records so that loading builds the same without the config."""

    layers: dict[str, LayerPlan]
    attentions: dict[str, AttentionPlan]


def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    *,
    example_inputs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A quantized copy of `model`; `model` itself is left as it was.

    Every Conv2d/Linear that `config.layers` does not keep in full precision becomes a QuantConv2d/QuantLinear
    with the bit widths the rules give it, every diffusers `Attention` gets a QuantAttnProcessor (when
    `config.quantize_attention`), and the shortcut convs of up-block resnets get split input quantizers
    (when `config.split_shortcut`). Weight ranges are initialised at once (`config.weight_init`);
    activation ranges need data: see `observe_activations`. `example_inputs` are keyword arguments for one
    forward of `model`, used only to find the split channels; diffusers UNets get one built from their config.
    """
    _check_full_precision(model)
    quantized = copy.deepcopy(model, memo=_storage_sharing_memo(model))
    plan = wrapping_plan(quantized, config, example_inputs)
    apply_wrapping_plan(quantized, plan, weight_init=config.weight_init, act_init=config.act_init)
    return quantized


def _storage_sharing_memo(model: nn.Module) -> dict[int, torch.Tensor]:
    """A deepcopy memo that gives the copy its own parameter and buffer objects (moving or casting it leaves
    `model` alone) over `model`'s storage (no second copy of the weights)."""
    memo: dict[int, torch.Tensor] = {}
    for parameter in model.parameters():
        memo[id(parameter)] = nn.Parameter(parameter.detach(), requires_grad=parameter.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer.detach()
    return memo


def wrapping_plan(model: nn.Module, config: QuantConfig,
                  example_inputs: Mapping[str, Any] | None = None) -> WrappingPlan:
    """What `quantize_model` makes of `model` under `config`."""
    # Everything that can be refused is checked before the example forward.
    attentions = _attentions_to_quantize(model, config) if config.quantize_attention else []
    targets = layers_to_quantize(model, config)
    splits = find_shortcut_splits(model, example_inputs) if config.split_shortcut else {}
    layers = {}
    for name, _ in targets:
        bits = config.layer_bits(name)
        layers[name] = LayerPlan(bits.w_bits, bits.a_bits, splits.get(name))
    attention_plans = {}
    for name, _ in attentions:
        a_bits = config.layer_bits(name).a_bits
        attention_plans[name] = AttentionPlan(a_bits, a_bits if config.softmax_bits is None else config.softmax_bits)
    return WrappingPlan(layers, attention_plans)


def apply_wrapping_plan(model: nn.Module, plan: WrappingPlan, *, weight_init: str = "mse", act_init: str = "mse",
                        init_weight_ranges: bool = True) -> None:
    """Replace the modules of `plan` in `model` by their quantized twins, in place. `init_weight_ranges=False`
    is for a model about to load a saved state."""
    _check_full_precision(model)
    for name, layer_plan in plan.layers.items():
        module = _submodule(model, name)
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"{name} is a {type(module).__name__}, not a Conv2d or Linear layer to quantize")
        twin_class = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
        twin = twin_class(module, w_bits=layer_plan.w_bits, a_bits=layer_plan.a_bits, weight_init=weight_init,
                          act_init=act_init, split=layer_plan.split)
        if init_weight_ranges:
            twin.weight_quantizer.init_range(twin.weight)
        model.set_submodule(name, twin)
    for name, attention_plan in plan.attentions.items():
        attention = _submodule(model, name)
        if not isinstance(attention, Attention):
            raise ValueError(f"{name} is a {type(attention).__name__}, not a diffusers Attention")
        attention.set_processor(QuantAttnProcessor(attention_plan.a_bits, attention_plan.probs_bits, act_init,
                                                   device=attention.to_q.weight.device))


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise ValueError(f"{name} is no module of {type(model).__name__}") from exc


def _check_full_precision(model: nn.Module) -> None:
    if any(isinstance(module, QuantLayer) for module in model.modules()):
        raise ValueError(f"{type(model).__name__} is already quantized: wrap its full-precision original")


def layers_to_quantize(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Module]]:
    """The (name, layer) pairs `quantize_model` turns into quantized twins; an error if there are none, which a
    caller can learn before any calibration work."""
    candidates = [(name, module) for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
    targets = [(name, module) for name, module in candidates if not config.layer_bits(name).full_precision]
    if not targets:
        patterns = [rule.pattern for rule in config.layers]
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize: the layer rules "
                         f"{patterns} keep them all in full precision")
    return targets


def _attentions_to_quantize(model: nn.Module, config: QuantConfig) -> list[tuple[str, Attention]]:
    """The diffusers Attention modules the layer rules do not keep in full precision; an error if one cannot
    take our processor."""
    attentions = []
    for name, module in model.named_modules():
        if isinstance(module, Attention) and not config.layer_bits(name).full_precision:
            reason = QuantAttnProcessor.unsupported_reason(module)
            if reason is not None:
                raise ValueError(
                    f"cannot quantize the attention matmuls of {name}: {reason}; use quantize_attention=False"
                )
            attentions.append((name, module))
    return attentions


def find_shortcut_splits(model: nn.Module, example_inputs: Mapping[str, Any] | None = None) -> dict[str, int]:
    """For every up-block resnet's `conv_shortcut`: the input channel where the skip tensor begins.

    Up-blocks (modules with `resnets` whose forward takes `res_hidden_states_tuple`) concatenate
    `[hidden_states, skip]` before a resnet. One forward records the skip tensors each block receives
    and each resnet's input; the split is where the input's tail equals one of those skip tensors.
    Matching real tensors, not reproducing diffusers' channel arithmetic, keeps this right for any
    block type or layer count. Returns {qualified conv_shortcut name: split}; {} without up-blocks.
    """
    up_blocks = [
        (name, module) for name, module in model.named_modules()
        if hasattr(module, "resnets") and "res_hidden_states_tuple" in inspect.signature(module.forward).parameters
    ]
    if not up_blocks:
        return {}

    skips_received: dict[str, tuple[torch.Tensor, ...]] = {}
    splits: dict[str, int] = {}

    def record_skips(block_name: str):
        def hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
            arguments = inspect.signature(block.forward).bind(*args, **kwargs).arguments
            skips_received[block_name] = tuple(arguments["res_hidden_states_tuple"])
        return hook

    def match_skip(block_name: str, conv_name: str):
        def hook(resnet: nn.Module, args: tuple, kwargs: dict) -> None:
            resnet_input = next(iter(inspect.signature(resnet.forward).bind(*args, **kwargs).arguments.values()))
            for skip in skips_received[block_name]:
                skip_channels = skip.shape[1]
                if (
                    resnet_input.shape[1] > skip_channels
                    and resnet_input.shape[2:] == skip.shape[2:]
                    and torch.equal(resnet_input[:, -skip_channels:], skip)
                ):
                    splits[conv_name] = resnet_input.shape[1] - skip_channels
                    return
        return hook

    handles = []
    for block_name, block in up_blocks:
        handles.append(block.register_forward_pre_hook(record_skips(block_name), with_kwargs=True))
        for index, resnet in enumerate(block.resnets):
            if isinstance(getattr(resnet, "conv_shortcut", None), nn.Conv2d):
                conv_name = f"{block_name}.resnets.{index}.conv_shortcut"
                handles.append(resnet.register_forward_pre_hook(match_skip(block_name, conv_name), with_kwargs=True))
    try:
        inputs = _example_inputs(model) if example_inputs is None else example_inputs
        with torch.no_grad():
            model(**inputs)
    except Exception as error:
        raise ValueError(
            f"one forward of {type(model).__name__} to find the shortcut split channels failed ({error}); "
            "pass example_inputs=... or use split_shortcut=False"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    return splits


def _example_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """One random input for a diffusers UNet, from its config (sample, timestep, text/class conditioning)."""
    config = getattr(model, "config", None)
    if config is None or config.get("sample_size") is None or "in_channels" not in config:
        raise ValueError(f"{type(model).__name__} has no diffusers config with sample_size and in_channels")
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    reference = next(model.parameters())
    generator = torch.Generator(reference.device).manual_seed(0)
    where = {"device": reference.device, "dtype": reference.dtype}
    inputs = {
        "sample": torch.randn(1, config.in_channels, height, width, generator=generator, **where),
        "timestep": torch.tensor([1], device=reference.device),
    }
    if config.get("cross_attention_dim") is not None:
        width = config.get("encoder_hid_dim") or config.cross_attention_dim
        inputs["encoder_hidden_states"] = torch.randn(1, 1, width, generator=generator, **where)
    if config.get("num_class_embeds") is not None:
        inputs["class_labels"] = torch.zeros(1, dtype=torch.long, device=reference.device)
    return inputs


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
    """The (qualified name, layer) pairs of every QuantConv2d/QuantLinear in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer):
            yield name, module


def quantizers(model: nn.Module) -> Iterator[tuple[str, UniformQuantizer]]:
    """Every quantizer in `model`, weight and activation, with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, UniformQuantizer):
            yield name, module


def activation_quantizers(model: nn.Module) -> Iterator[tuple[str, UniformQuantizer]]:
    """The quantizers of layer inputs and attention matmuls: all but the layers' weight quantizers."""
    weight_quantizers = {id(layer.weight_quantizer) for _, layer in quant_layers(model)}
    for name, quantizer in quantizers(model):
        if id(quantizer) not in weight_quantizers:
            yield name, quantizer


def set_quant_state(model: nn.Module, weight: bool, act: bool) -> None:
    """Switch weight and activation quantization on or off (off = the full-precision op)."""
    for _, quantizer in quantizers(model):
        quantizer.enabled = act
    for _, layer in quant_layers(model):
        layer.weight_quantizer.enabled = weight


@contextmanager
def observe_activations(model: nn.Module) -> Iterator[None]:
    """Calibrate activation ranges: forwards run inside the block are observed, and on exit each
    activation quantizer's range is set from all it saw (by its init method, min-max or MSE).

    While observing, activations pass unquantized; weights are quantized as `set_quant_state` left
    them. Quantizers that saw nothing keep their previous state. On an exception the observations are
    dropped and no range changes.
    """
    observed = [quantizer for _, quantizer in activation_quantizers(model)]
    for quantizer in observed:
        quantizer.start_observing()
    try:
        yield
    except BaseException:
        for quantizer in observed:
            quantizer.cancel_observing()
        raise
    for quantizer in observed:
        quantizer.finalize_range()
