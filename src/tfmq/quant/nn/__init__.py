"""What lives inside a quantized model: quantizers, quantized layers, the per-timestep tables and caches,
and the rows they are read at. Imports no calibration, method, CLI or progress-bar code, so loading and
exporting a saved model need none."""

from tfmq.quant.nn.attention import QuantAttnProcessor
from tfmq.quant.nn.layers import QuantConv2d, QuantLayer, QuantLinear
from tfmq.quant.nn.output_correction import OutputCorrection, output_correction
from tfmq.quant.nn.quantizer import UniformQuantizer
from tfmq.quant.nn.step_table import StepRows, StepTable
from tfmq.quant.nn.temporal import (
    SkippedTimestepEmbedding,
    TimestepTables,
    attach_output_correction,
    attach_timestep_schedule,
    install_temporal_cache,
    restore_temporal_cache,
    selected_timestep,
    temporal_features_by_timestep,
    timestep_tables,
    training_schedule,
)

__all__ = [
    "OutputCorrection",
    "QuantAttnProcessor",
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "SkippedTimestepEmbedding",
    "StepRows",
    "StepTable",
    "TimestepTables",
    "UniformQuantizer",
    "attach_output_correction",
    "attach_timestep_schedule",
    "install_temporal_cache",
    "output_correction",
    "restore_temporal_cache",
    "selected_timestep",
    "temporal_features_by_timestep",
    "timestep_tables",
    "training_schedule",
]
