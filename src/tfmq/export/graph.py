"""The export twin of a quantized UNet: a torch module whose trace is the integer ONNX graph.

A deep copy of the fake-quant model in which the quantized layers and attention quantizers are frozen
into QDQ form (`layers`, `qdq`), and the Temporal Information Block is replaced by the table of its
outputs over the schedule, read at the step index that the graph takes as input.

The TIB depends on the timestep alone, so over a fixed schedule it is a finite table. Computed in torch
with the fake-quant TIB (its FSC rows, or the temporal feature caches, selected per timestep) it holds
exactly the features the fake-quant UNet feeds its blocks; each block's `time_emb_proj` becomes a
`StepTable` of them, served at the graph's `step` (a Gather in ONNX), and none of the TIB's small,
latency-bound linears runs in the integer graph.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tfmq.export.layers import IntegerConv2d, IntegerLinear
from tfmq.export.qdq import DequantizedWeight, QdqActivation
from tfmq.quant.nn.attention import QuantAttnProcessor
from tfmq.quant.nn.layers import QuantConv2d
from tfmq.quant.nn.step_table import StepRows, StepTable
from tfmq.quant.nn.temporal import TABLES_NAME, SkippedTimestepEmbedding, temporal_features_by_timestep, timestep_tables
from tfmq.quant.tib import find_tib
from tfmq.quant.wrap import quant_layers

ATTENTION_QUANTIZERS = ("query_quantizer", "key_quantizer", "probs_quantizer", "value_quantizer")


class StepGraph(nn.Module):
    """`unet(sample, step[, encoder_hidden_states])` -> noise, the TIB read from tables at `step`."""

    def __init__(self, unet: nn.Module, step_rows: StepRows) -> None:
        super().__init__()
        self.unet = unet
        self.step_rows = step_rows  # what the tables of `unet` read their row from

    def forward(self, sample: torch.Tensor, step: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        conditioning = {} if encoder_hidden_states is None else {"encoder_hidden_states": encoder_hidden_states}
        # One row, shape (1,), which the blocks broadcast over the batch. The timestep argument only feeds
        # the skipped time embedding: dead code in the trace.
        with self.step_rows.serving(step.reshape(1)):
            return self.unet(sample, step, return_dict=False, **conditioning)[0]


class TimestepGraph(nn.Module):
    """`unet(sample, timestep[, encoder_hidden_states])` -> noise: the full-precision graph."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        conditioning = {} if encoder_hidden_states is None else {"encoder_hidden_states": encoder_hidden_states}
        return self.unet(sample, timestep, return_dict=False, **conditioning)[0]


def integer_twin(
    model: nn.Module, schedule: torch.Tensor, output_grids: dict[str, tuple[QdqActivation, ...]],
    requantize_weights: bool = False
) -> tuple[StepGraph, dict[str, int]]:
    """The export twin of `model` (left untouched), and how many layers hold symmetric int8, uint8 (8-bit
    weights with zero points) and float weights. Convs in `output_grids` get those output grids (one per input part);
    `requantize_weights`: see WeightCodes."""
    tib = find_tib(model)
    with torch.no_grad():
        features = temporal_features_by_timestep(model, torch.as_tensor(schedule))
    twin = copy.deepcopy(model)
    if timestep_tables(twin) is not None:
        delattr(twin, TABLES_NAME)  # its row-selecting hooks then do nothing; the graph's step is the row
    step_rows = StepRows()
    for resnet, name in zip(tib.resnets, tib.feature_names):
        table = StepTable(features[name].float().contiguous(), step_rows=step_rows)
        twin.get_submodule(resnet).time_emb_proj = table
    embedding = twin.get_submodule(tib.time_embedding)
    if not isinstance(embedding, SkippedTimestepEmbedding):
        setattr(twin, tib.time_embedding, SkippedTimestepEmbedding(embedding))
    counts = {"int8_weights": 0, "uint8_weights": 0, "float_weights": 0}
    for name, layer in list(quant_layers(twin)):
        if name.startswith(tib.time_embedding + "."):
            continue  # unread: the tables replace the TIB
        twin_layer = (IntegerConv2d(layer, output_grids.get(name), requantize_weights)
                      if isinstance(layer, QuantConv2d) else IntegerLinear(layer, requantize_weights))
        counts[_weight_kind(twin_layer.weight)] += 1
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent), child, twin_layer)
    for module in twin.modules():
        if isinstance(module, QuantAttnProcessor):
            for attribute in ATTENTION_QUANTIZERS:
                frozen = QdqActivation.of(getattr(module, attribute))
                setattr(module, attribute, nn.Identity() if frozen is None else frozen)
    return StepGraph(twin.eval(), step_rows), counts


def _weight_kind(weight: nn.Module) -> str:
    if not isinstance(weight, DequantizedWeight):
        return "float_weights"
    return "int8_weights" if weight.codes.dtype == torch.int8 else "uint8_weights"
