"""How tfmq calls a denoiser: a diffusers UNet, a diffusion transformer (DiT, PixArt) or an engine that
stands in for one.

tfmq records and replays a denoiser's inputs under one set of names: `sample` (x_t), `timestep` and the
conditions under their diffusers names (`class_labels`, `encoder_hidden_states`). The models differ in the
name of the first: a UNet's forward calls x_t `sample`, a transformer's `hidden_states`, and PixArt puts
`encoder_hidden_states` before `timestep`, so every call goes by keyword through `denoiser_call`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import nn

SAMPLE = "sample"
TRANSFORMER_SAMPLE = "hidden_states"


@functools.cache
def _parameter_names(function: Callable) -> frozenset[str]:
    return frozenset(inspect.signature(function).parameters)


def sample_argument(model: nn.Module | Callable) -> str:
    """The name `model.forward` (an engine's `__call__`) gives x_t: `sample` or a transformer's `hidden_states`.
    Read once per class (a sampler asks at every step)."""
    parameters = _parameter_names(getattr(type(model), "forward", type(model).__call__))
    if SAMPLE in parameters:
        return SAMPLE
    if TRANSFORMER_SAMPLE in parameters:
        return TRANSFORMER_SAMPLE
    raise ValueError(f"{type(model).__name__} takes neither `{SAMPLE}` nor `{TRANSFORMER_SAMPLE}`: "
                     "it is not a diffusers denoiser")


def denoiser_inputs(model: nn.Module | Callable, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`inputs` (tfmq's names: `sample`, `timestep`, conditions) under the keywords `model.forward` takes."""
    if SAMPLE not in inputs:  # a model of tfmq's own (the TIB run alone) takes its inputs as they are
        return inputs
    name = sample_argument(model)
    if name == SAMPLE:
        return inputs
    return {(name if key == SAMPLE else key): value for key, value in inputs.items()}


def denoiser_call(model: nn.Module | Callable, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's whole output tensor for `inputs` (tfmq's names): what it returns as `.sample`."""
    return model(**denoiser_inputs(model, inputs)).sample


def predicted_noise(model: nn.Module | Callable, output: torch.Tensor) -> torch.Tensor:
    """The epsilon part of a denoiser's output: a DiT that also learns the variance returns twice its input
    channels (epsilon first, as `DiTPipeline` splits it); every other model returns epsilon alone."""
    config = getattr(model, "config", None)
    channels = None if config is None else config.get("in_channels")
    if channels is not None and output.shape[1] == 2 * channels:
        return output[:, :channels]
    return output
