"""Shared by the reconstruction tests: calibrated tiny models and per-unit outputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tests.quant.tiny_unets import unet_inputs
from tfmq.quant.config import QuantConfig
from tfmq.quant.wrap import observe_activations, quantize_model


def input_batches(model: nn.Module, count: int, batch: int, seed: int) -> list[dict[str, torch.Tensor]]:
    return [unet_inputs(model, batch, seed + index) for index in range(count)]


def calibrated(full_precision: nn.Module, config: QuantConfig, batches: Sequence[dict]) -> nn.Module:
    """The wrapped model with its activation ranges observed on `batches`."""
    model = quantize_model(full_precision, config)
    with torch.no_grad(), observe_activations(model):
        for batch in batches:
            model(**batch)
    return model


@torch.no_grad()
def unit_outputs(model: nn.Module, names: Sequence[str], batches: Sequence[dict]) -> dict[str, torch.Tensor]:
    """The output of each named submodule over all `batches`, concatenated."""
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = []
    for name in names:
        def record(module: nn.Module, args: tuple, output, name: str = name) -> None:
            outputs[name].append(output[0] if isinstance(output, tuple) else output)
        handles.append(model.get_submodule(name).register_forward_hook(record))
    try:
        for batch in batches:
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(tensors) for name, tensors in outputs.items()}
