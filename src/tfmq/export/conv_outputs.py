"""The 8-bit output grids that onnxruntime's integer convolution needs and the fake-quant model lacks.

QLinearConv writes uint8: a conv runs on integer kernels only if a QuantizeLinear follows it. The grids are
calibrated like the model's own activation ranges (MSE-searched per tensor) on the fake-quant model's
outputs, over inputs of every scheduled step. A conv with a split input (two grids, Q-Diffusion's shortcut
splitting) runs as two integer convs, one per input part, whose outputs are added: each part's output gets
its own grid.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from diffusers import DDPMScheduler
from torch import nn

from tfmq.denoiser import denoiser_inputs
from tfmq.export.qdq import KERNEL_BITS, QdqActivation
from tfmq.quant.nn.layers import QuantConv2d, QuantLayer
from tfmq.quant.nn.quantizer import UniformQuantizer
from tfmq.quant.wrap import quant_layers
from tfmq.quant.calibration import collect_calibration
from tfmq.sampling import Conditioning, SamplerConfig

UNetInputs = Mapping[str, Any]


def runs_on_integer_kernels(layer: QuantLayer) -> bool:
    """True if the weight and every part of the input are quantized to at most 8 bits (a split input has
    two parts, which need an ungrouped layer to be convolved apart)."""
    def quantized(quantizer: UniformQuantizer | None) -> bool:
        return quantizer is not None and quantizer.enabled and quantizer.bits is not None \
            and quantizer.bits <= KERNEL_BITS
    if layer.split is not None and (getattr(layer, "groups", 1) != 1 or not quantized(layer.split_input_quantizer)):
        return False
    return quantized(layer.input_quantizer) and quantized(layer.weight_quantizer)


def split_conv_parts(layer: QuantConv2d, inputs: torch.Tensor) -> list[torch.Tensor]:
    """A split fake-quant conv's output as the sum of one conv per input part (the bias in the first): what
    the integer graph computes before each part's output grid."""
    weight = layer.weight_quantizer(layer.weight)
    head, tail = inputs.split([layer.split, inputs.shape[1] - layer.split], dim=1)
    return [layer._conv_forward(layer.input_quantizer(head), weight[:, :layer.split], layer.bias),
            layer._conv_forward(layer.split_input_quantizer(tail), weight[:, layer.split:], None)]


def integer_conv_names(model: nn.Module) -> list[str]:
    """Names of the convolutions that can become QLinearConv."""
    return [name for name, layer in quant_layers(model)
            if isinstance(layer, QuantConv2d) and runs_on_integer_kernels(layer)]


def exact_conv_names(names: list[str], exact: bool | str | Sequence[str]) -> list[str]:
    """Which of `names` (convs that can run on integer kernels) stay exact: all (True), none (False), or those
    matching any of the fnmatch patterns `exact`; a pattern matching none of them is an error, not a no-op."""
    if isinstance(exact, bool):
        return list(names) if exact else []
    patterns = (exact,) if isinstance(exact, str) else tuple(exact)
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in names):
            example = f" (their names look like {names[-1]!r})" if names else ""
            raise ValueError(f"exact conv pattern {pattern!r} matches none of the {len(names)} convs that can run "
                             f"on integer kernels{example}")
    return [name for name in names if any(fnmatchcase(name, pattern) for pattern in patterns)]


def single_timestep_batches(inputs: UNetInputs) -> Iterator[dict[str, Any]]:
    """`inputs` split into one call per timestep: a model with timestep tables takes no mixed batch."""
    timesteps = torch.as_tensor(inputs["timestep"]).reshape(-1)
    if bool((timesteps == timesteps[0]).all()):
        yield dict(inputs)
        return
    for timestep in timesteps.unique():
        positions = (timesteps == timestep).nonzero().flatten()
        yield {key: value[positions] if torch.is_tensor(value) and value.dim() > 0 and len(value) == len(timesteps)
               else value for key, value in inputs.items()}


@torch.no_grad()
def conv_output_grids(
    model: nn.Module, names: list[str], calibration: Iterable[UNetInputs]
) -> dict[str, tuple[QdqActivation, ...]]:
    """{conv name: the output grid of each of its input parts (one, or two for a split input)}, from the
    outputs of `model` (fake-quant) on `calibration` (UNet keyword inputs)."""
    observers: dict[str, list[UniformQuantizer]] = {}
    handles = []
    for name in names:
        layer = model.get_submodule(name)
        observers[name] = [UniformQuantizer(KERNEL_BITS, init="mse") for _ in range(1 if layer.split is None else 2)]
        for observer in observers[name]:
            observer.start_observing()

        def observe(module: QuantConv2d, args: tuple, output: torch.Tensor,
                    parts_observers: list[UniformQuantizer] = observers[name]) -> None:
            parts = [output] if module.split is None else split_conv_parts(module, args[0])
            for observer, part in zip(parts_observers, parts):
                observer.observe(part)
        handles.append(layer.register_forward_hook(observe))
    try:
        for inputs in calibration:
            for batch in single_timestep_batches(inputs):
                model(**denoiser_inputs(model, batch))
    finally:
        for handle in handles:
            handle.remove()
    grids = {}
    for name, parts_observers in observers.items():
        grids[name] = ()
        for observer in parts_observers:
            observed = observer.take_observed_range()
            if observed is None:
                raise ValueError(f"the calibration inputs never reached {name}: give UNet inputs (sample, timestep)")
            observer.set_range(*observed)
            grids[name] += (QdqActivation.of(observer),)
    return grids


def trajectory_inputs(
    unet: nn.Module, scheduler: DDPMScheduler, sampler: SamplerConfig, num_images: int = 8, seed: int = 1_000,
    batch_size: int = 8, conditioning: Conditioning | None = None,
) -> list[dict[str, torch.Tensor]]:
    """UNet keyword inputs at every step of `unet`'s own sampling trajectories (with `conditioning`, one
    condition per image), one call per timestep: the calibration of the conv output grids, on the inputs the
    graph will see."""
    trajectories = collect_calibration(unet, scheduler, num_images, sampler, 1, seed, batch_size, progress=False,
                                       conditioning=conditioning)
    return list(trajectories.timestep_groups())
