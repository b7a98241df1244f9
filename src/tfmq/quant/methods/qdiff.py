"""The Q-Diffusion baseline: BRECQ block reconstruction of a diffusion UNet on time-step-aware data.

Every resnet, attention / transformer block, sampler and stray layer is reconstructed in forward order
against the full-precision model: AdaRound for its weights, then LSQ for its activation step sizes,
one set of activation parameters shared by all timesteps. The temporal path of a resnet (its
`time_emb_proj`) is learnt with the block, against the block's output. Activation ranges must be
initialised before (`rtn.calibrate_activation_ranges`, or `observe_activations` for conditional UNets).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from tfmq.quant.config import QuantConfig
from tfmq.quant.methods.reconstruction import ModelInputs, UnitResult, reconstruct, unet_units


def reconstruct_qdiff(
    model: nn.Module,
    full_precision: nn.Module,
    inputs: Sequence[ModelInputs],
    config: QuantConfig,
    *,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> list[UnitResult]:
    """Reconstruct the wrapped UNet `model` unit by unit against `full_precision` (its original).

    `inputs` are keyword inputs of UNet forwards (`sample`, `timestep`, and `encoder_hidden_states` for
    text UNets): the weight-reconstruction subset of the calibration data, every `interval_length`-th
    sampling step. Iterations, batch size, learning rates and the cache budget come from
    `config.reconstruction`.
    """
    if not inputs:
        raise ValueError("qdiff reconstruction needs calibration inputs; got none")
    units = unet_units(model, full_precision, inputs[0])
    return reconstruct(model, full_precision, units, inputs, config.reconstruction,
                       progress=progress, cache_dir=cache_dir)
