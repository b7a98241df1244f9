"""Round-to-nearest PTQ: nothing is learnt. The weights keep their min-max or MSE grid and the activations
the ranges observed on the calibration data; FSC tables where the config asks for them."""

from __future__ import annotations

from typing import Any

from torch import nn

from tfmq.quant.config import RTNConfig
from tfmq.quant.methods.registry import MethodInputs, register_method


@register_method(RTNConfig)
def quantize_rtn(model: nn.Module, inputs: MethodInputs) -> dict[str, Any]:
    inputs.calibrate_timestep_tables(model)
    return {}
