"""The 8-bit output grids that onnxruntime's integer convolution needs and the fake-quant model lacks.

QLinearConv writes uint8: a conv runs on integer kernels only if a QuantizeLinear follows it. The grids are
calibrated like the model's own activation ranges (MSE-searched per tensor) on the fake-quant model's
outputs, over inputs of every scheduled step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from diffusers import DDPMScheduler
from torch import nn

from tfmq.export.qdq import KERNEL_BITS, QdqActivation
from tfmq.quant.nn.layers import QuantConv2d, QuantLayer
from tfmq.quant.nn.quantizer import UniformQuantizer
from tfmq.quant.wrap import quant_layers
from tfmq.quant.calibration import collect_calibration
from tfmq.sampling import Conditioning, SamplerConfig

UNetInputs = Mapping[str, Any]


def runs_on_integer_kernels(layer: QuantLayer) -> bool:
    """True if both operands are quantized to at most 8 bits on one grid each (a split input has two)."""
    def quantized(quantizer: UniformQuantizer | None) -> bool:
        return quantizer is not None and quantizer.enabled and quantizer.bits is not None \
            and quantizer.bits <= KERNEL_BITS
    return layer.split is None and quantized(layer.input_quantizer) and quantized(layer.weight_quantizer)


def integer_conv_names(model: nn.Module) -> list[str]:
    """Names of the convolutions that can become QLinearConv."""
    return [name for name, layer in quant_layers(model)
            if isinstance(layer, QuantConv2d) and runs_on_integer_kernels(layer)]


def _single_timestep_batches(inputs: UNetInputs) -> Iterator[dict[str, Any]]:
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
) -> dict[str, QdqActivation]:
    """{conv name: its output grid}, from the outputs of `model` (fake-quant) on `calibration` (UNet
    keyword inputs)."""
    observers = {name: UniformQuantizer(KERNEL_BITS, init="mse") for name in names}
    handles = []
    for name, observer in observers.items():
        observer.start_observing()
        handles.append(model.get_submodule(name).register_forward_hook(
            lambda module, args, output, observer=observer: observer.observe(output)))
    try:
        for inputs in calibration:
            for batch in _single_timestep_batches(inputs):
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    grids = {}
    for name, observer in observers.items():
        observed = observer.take_observed_range()
        if observed is None:
            raise ValueError(f"the calibration inputs never reached {name}: give UNet inputs (sample, timestep)")
        observer.set_range(*observed)
        grids[name] = QdqActivation.of(observer)
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
