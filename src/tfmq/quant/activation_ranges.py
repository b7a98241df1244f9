"""The activation ranges every method starts from: observed on calibration data with weights quantized."""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from tfmq.denoiser import denoiser_call
from tfmq.devices import module_device, on_device
from tfmq.quant.calibration import CalibrationSet
from tfmq.quant.wrap import observe_activations, set_quant_state


@torch.no_grad()
def calibrate_activation_ranges(
    model: nn.Module, calibration: CalibrationSet, batch_size: int, progress: bool = True
) -> None:
    """Observe every activation quantizer's inputs over `calibration`, with weights already quantized
    (the activations the deployed model will see), then fix each range by its init method."""
    set_quant_state(model, weight=True, act=False)
    batches = calibration.batches(batch_size)
    device = module_device(model)
    with observe_activations(model):
        for inputs in tqdm(batches, desc="activation ranges", unit="batch", disable=not progress):
            denoiser_call(model, on_device(inputs, device))
    set_quant_state(model, weight=True, act=True)
