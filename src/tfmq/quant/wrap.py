"""Turn a model (a diffusers UNet or any module of Conv2d/Linear layers) into its fake-quantized twin.

The twin is a deep copy: the full-precision model stays untouched and usable, since reconstruction
needs its outputs as targets. The copy keeps its class, forward, config and diffusers API, so it
drops into a pipeline in place of the original.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from tfmq.quant.config import QuantConfig
from tfmq.quant.nn.attention import QuantAttnProcessor
from tfmq.quant.nn.layers import QuantConv2d, QuantLayer, QuantLinear
from tfmq.quant.nn.quantizer import UniformQuantizer


def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    *,
    example_inputs: Mapping[str, Any] | None = None,
    init_weight_ranges: bool = True,
) -> nn.Module:
    """A quantized copy of `model`; `model` itself is left as it was.

    Every Conv2d/Linear outside `config.keep_fp` becomes a QuantConv2d/QuantLinear, every diffusers
    `Attention` gets a QuantAttnProcessor (when `config.quantize_attention`), and the shortcut convs
    of up-block resnets get split input quantizers (when `config.split_shortcut`).

    Weight ranges are initialised at once (`config.weight_init`) unless `init_weight_ranges` is False,
    which is for a copy about to load a saved state. Activation ranges need data: see
    `observe_activations`. `example_inputs` are keyword arguments for one forward of `model`, used only
    to find the split channels; diffusers UNets get one built from their config.
    """
    if any(isinstance(module, QuantLayer) for module in model.modules()):
        raise ValueError(f"{type(model).__name__} is already quantized: wrap its full-precision original")
    quantized = copy.deepcopy(model)
    # Everything that can be refused is checked before the example forward and the weight ranges.
    attentions = _attentions_to_quantize(quantized, config) if config.quantize_attention else []

    targets = layers_to_quantize(quantized, config)
    splits = find_shortcut_splits(quantized, example_inputs) if config.split_shortcut else {}
    for name, module in targets:
        twin_class = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
        twin = twin_class(
            module,
            w_bits=config.w_bits,
            a_bits=config.a_bits,
            weight_init=config.weight_init,
            act_init=config.act_init,
            split=splits.get(name),
        )
        if init_weight_ranges:
            twin.weight_quantizer.init_range(twin.weight)
        _replace_submodule(quantized, name, twin)

    for attention in attentions:
        processor = QuantAttnProcessor(config.a_bits, config.attention_probs_bits, config.act_init)
        attention.set_processor(processor.to(attention.to_q.weight.device))
    return quantized


def layers_to_quantize(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Module]]:
    """The (name, layer) pairs `quantize_model` turns into quantized twins; an error if there are none, which a
    caller can learn before any calibration work."""
    candidates = [(name, module) for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
    targets = [(name, module) for name, module in candidates if not _kept_in_full_precision(name, config.keep_fp)]
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no Conv2d or Linear layer to quantize outside keep_fp={config.keep_fp}"
        )
    return targets


def _kept_in_full_precision(name: str, patterns: tuple[str, ...]) -> bool:
    """True if `name` or one of its parents matches a keep_fp pattern (a kept block keeps its layers)."""
    parts = name.split(".")
    prefixes = [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes for pattern in patterns)


def _replace_submodule(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, replacement)


def _attentions_to_quantize(model: nn.Module, config: QuantConfig) -> list[Attention]:
    """The diffusers Attention modules outside keep_fp; an error if one cannot take our processor."""
    attentions = []
    for name, module in model.named_modules():
        if isinstance(module, Attention) and not _kept_in_full_precision(name, config.keep_fp):
            reason = QuantAttnProcessor.unsupported_reason(module)
            if reason is not None:
                raise ValueError(
                    f"cannot quantize the attention matmuls of {name}: {reason}; use quantize_attention=False"
                )
            attentions.append(module)
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
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(1, config.in_channels, height, width, generator=generator).to(reference),
        "timestep": torch.tensor([1], device=reference.device),
    }
    if config.get("cross_attention_dim") is not None:
        width = config.get("encoder_hid_dim") or config.cross_attention_dim
        inputs["encoder_hidden_states"] = torch.randn(1, 1, width, generator=generator).to(reference)
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
