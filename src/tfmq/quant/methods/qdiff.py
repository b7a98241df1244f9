"""The Q-Diffusion baseline: BRECQ block reconstruction of a diffusion UNet on time-step-aware data.

Every resnet, attention / transformer block, sampler and stray layer is reconstructed in forward order
against the full-precision model: AdaRound for its weights, then LSQ for its activation step sizes,
one set of activation parameters shared by all timesteps. The temporal path of a resnet (its
`time_emb_proj`) is learnt with the block, against the block's output. FSC tables, where the config asks
for them, are calibrated on the reconstructed model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from tfmq.quant.config import QDiffusionConfig
from tfmq.quant.methods.capture import ModelInputs
from tfmq.quant.methods.reconstruction import UnitResult, reconstruct
from tfmq.quant.methods.registry import MethodInputs, register_method
from tfmq.quant.methods.resume import UnitCheckpoints
from tfmq.quant.methods.units import unet_units


@register_method(QDiffusionConfig)
def quantize_qdiff(model: nn.Module, inputs: MethodInputs) -> dict[str, Any]:
    config = inputs.config
    results = reconstruct_qdiff(model, inputs.full_precision, inputs.weight_batches(), config,
                                progress=inputs.progress, checkpoints=inputs.checkpoints)
    inputs.calibrate_timestep_tables(model)
    return reconstruction_record(results, config)


def reconstruct_qdiff(
    model: nn.Module,
    full_precision: nn.Module,
    inputs: Sequence[ModelInputs],
    config: QDiffusionConfig,
    *,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    checkpoints: UnitCheckpoints | None = None,
) -> list[UnitResult]:
    """Reconstruct the wrapped UNet `model` unit by unit against `full_precision` (its original).

    `inputs` are keyword inputs of UNet forwards (`sample`, `timestep`, and `encoder_hidden_states` for
    text UNets): the weight-reconstruction subset of the calibration data, every `interval_length`-th
    sampling step. Iterations, batch size, learning rates and the cache budget come from
    `config.reconstruction`. Activation ranges must be initialised before.
    """
    if not inputs:
        raise ValueError("qdiff reconstruction needs calibration inputs; got none")
    units = unet_units(model, full_precision, inputs[0])
    return reconstruct(model, full_precision, units, inputs, config.reconstruction,
                       progress=progress, cache_dir=cache_dir, checkpoints=checkpoints)


def reconstruction_record(results: Sequence[UnitResult], config: QDiffusionConfig) -> dict[str, Any]:
    """What a reconstruction leaves in the provenance: each unit's losses and the settings it ran with."""
    return {"reconstruction": [result.to_dict() for result in results],
            "reconstruction_settings": dataclasses.asdict(config.reconstruction)}
