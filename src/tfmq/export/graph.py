"""The export twin of a quantized denoiser: a torch module whose trace is the integer ONNX graph.

A deep copy of the fake-quant model in which the quantized layers and attention quantizers are frozen
into QDQ form (`layers`, `qdq`), and every cache site of the Temporal Information Block (what depends on
the timestep alone: a UNet block's `time_emb_proj`, a transformer's time MLP) is replaced by the table of
its outputs over the schedule, read at the step index that the graph takes as input.

Over a fixed schedule such a site is a finite table. Computed in torch with the fake-quant TIB (its FSC
rows, or the temporal feature caches) it holds exactly what the fake-quant model computes there; each
site becomes a `StepTable` of them, served at the graph's `step` (a Gather in ONNX), and the small,
latency-bound linears behind it do not run in the integer graph. A model's output correction becomes a
Gather and a Sub at the graph's output, with the mean of the graph's own error added (`add_graph_error`: the
conv output grids the fake-quant model lacks). What also reads the class label (a DiT's
modulation Linears, after the label embedding is added) stays in the graph, its FSC grids read per step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from tfmq.denoiser import denoiser_call, predicted_noise
from tfmq.export.conv_outputs import single_timestep_batches
from tfmq.export.layers import IntegerConv2d, IntegerLinear
from tfmq.export.norms import GroupNormThenAffine, replace_group_norms
from tfmq.export.qdq import DequantizedWeight, frozen_activation
from tfmq.quant.nn.attention import QuantAttnProcessor
from tfmq.quant.nn.layers import QuantConv2d
from tfmq.quant.nn.output_correction import CORRECTION_NAME, OutputCorrection
from tfmq.quant.nn.step_table import StepRows, StepTable
from tfmq.quant.nn.temporal import TABLES_NAME, SkippedTimestepEmbedding, cache_site_outputs_by_timestep, timestep_tables
from tfmq.quant.tib import find_tib
from tfmq.quant.wrap import quant_layers

ATTENTION_QUANTIZERS = ("query_quantizer", "key_quantizer", "probs_quantizer", "value_quantizer")


class _DenoiserGraph(nn.Module):
    """What both graphs share: the model called by keyword with its one condition (`condition`: the name of
    the graph's third input, None for an unconditional model), returning epsilon alone."""

    def __init__(self, model: nn.Module, condition: str | None, correction: OutputCorrection | None = None) -> None:
        super().__init__()
        self.model = model
        self.condition = condition
        self.correction = correction  # taken off the whole output at the row of the call

    def noise(self, sample: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        inputs = {"sample": sample, "timestep": timestep}
        if self.condition is not None:
            inputs[self.condition] = condition
        output = denoiser_call(self.model, inputs)
        return predicted_noise(self.model, output if self.correction is None else self.correction(output))


class StepGraph(_DenoiserGraph):
    """`model(sample, step[, condition])` -> noise, the TIB (and the output correction, if any) read from
    tables at `step`."""

    def __init__(self, model: nn.Module, step_rows: StepRows, condition: str | None,
                 correction: OutputCorrection | None = None) -> None:
        super().__init__(model, condition, correction)
        self.step_rows = step_rows  # what the tables of `model` read their row from
        # The shape of the row the tables read: 0-d, one row expanded to the batch (ONNX: a Gather of a scalar);
        # (1,) a row broadcast over it, for a compiler that cannot index constants by a 0-d tensor.
        self.row_shape: tuple[int, ...] = ()

    def forward(self, sample: torch.Tensor, step: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        # One row for the whole batch. The timestep argument feeds only what the tables replaced (and the
        # batch size their rows are expanded to).
        with self.step_rows.serving(step.reshape(self.row_shape)):
            return self.noise(sample, step.reshape(1).expand(sample.shape[0]), condition)


class TimestepGraph(_DenoiserGraph):
    """`model(sample, timestep[, condition])` -> noise: the full-precision graph."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        return self.noise(sample, timestep, condition)


def integer_twin(
    model: nn.Module, schedule: torch.Tensor, output_grids: dict[str, tuple], condition: str | None,
    requantize_weights: bool = False,
    group_norm_form: Callable[[nn.GroupNorm], nn.Module] | None = GroupNormThenAffine,
    layer_twins: tuple[type[IntegerConv2d], type[IntegerLinear]] = (IntegerConv2d, IntegerLinear),
) -> tuple[StepGraph, dict[str, int]]:
    """The export twin of `model` (left untouched), and how many layers hold symmetric int8, uint8 (8-bit
    weights with zero points) and float weights. Convs in `output_grids` get those output grids (one per input
    part); `condition`: see StepGraph; `requantize_weights`: see WeightCodes; `group_norm_form`: what each
    affine GroupNorm becomes (the engine's fastest form of it, by default onnxruntime's; None leaves them);
    `layer_twins`: the classes that stand in for the quantized convs and linears (an engine's own forms)."""
    conv_twin, linear_twin = layer_twins
    tib = find_tib(model)
    with torch.no_grad():
        site_outputs = cache_site_outputs_by_timestep(model, torch.as_tensor(schedule))
    twin = copy.deepcopy(model)
    if timestep_tables(twin) is not None:
        delattr(twin, TABLES_NAME)  # its row-selecting hooks then do nothing; the graph's step is the row
    step_rows = StepRows()
    correction = twin._modules.pop(CORRECTION_NAME, None)  # the graph takes it off the output
    if correction is not None:
        correction.step_rows = step_rows
    for owner, attribute in tib.cache_sites.items():
        setattr(twin.get_submodule(owner), attribute,
                StepTable(site_outputs[owner].float().contiguous(), step_rows=step_rows))
    skipped = tib.skippable_embedding  # a UNet's time MLP: nothing reads it once every block reads a table
    if skipped is not None and not isinstance(twin.get_submodule(skipped), SkippedTimestepEmbedding):
        setattr(twin, skipped, SkippedTimestepEmbedding(twin.get_submodule(skipped)))
    counts = {"int8_weights": 0, "uint8_weights": 0, "float_weights": 0}
    for name, layer in list(quant_layers(twin)):
        if skipped is not None and name.startswith(skipped + "."):
            continue  # unread
        twin_layer = (conv_twin(layer, output_grids.get(name), requantize_weights, step_rows)
                      if isinstance(layer, QuantConv2d) else linear_twin(layer, requantize_weights, step_rows))
        counts[_weight_kind(twin_layer.weight)] += 1
        twin.set_submodule(name, twin_layer)
    if group_norm_form is not None:
        replace_group_norms(twin, group_norm_form)
    for module in twin.modules():
        if isinstance(module, QuantAttnProcessor):
            for attribute in ATTENTION_QUANTIZERS:
                frozen = frozen_activation(getattr(module, attribute), step_rows)
                setattr(module, attribute, nn.Identity() if frozen is None else frozen)
    return StepGraph(twin.eval(), step_rows, condition, correction), counts


def _weight_kind(weight: nn.Module) -> str:
    if not isinstance(weight, DequantizedWeight):
        return "float_weights"
    return "int8_weights" if weight.codes.dtype == torch.int8 else "uint8_weights"


@torch.no_grad()
def add_graph_error(graph: StepGraph, model: nn.Module, schedule: torch.Tensor,
                    calibration: Iterable[Mapping[str, Any]]) -> int:
    """Add to the output correction of `graph` (the twin of `model`), at every step of `schedule` that
    `calibration` (UNet keyword inputs) reaches, the per-channel mean of the graph's noise less the fake-quant
    model's: the error of what the graph adds (its conv output grids), which the model's correction, measured
    without them, leaves. Both outputs carry the model's correction, so the difference is the graph's alone.
    Returns how many steps were measured (0 without a correction)."""
    correction = graph.correction
    if correction is None:
        return 0
    row_of = {int(timestep): row for row, timestep in enumerate(torch.as_tensor(schedule).tolist())}
    offsets = correction.offsets  # a row per step of the graph's schedule; a learned variance's channels last
    sums = torch.zeros_like(offsets, dtype=torch.float64)
    counts = torch.zeros(len(offsets), 1, dtype=torch.float64)
    for inputs in calibration:
        for batch in single_timestep_batches(inputs):
            row = row_of.get(int(torch.as_tensor(batch["timestep"]).reshape(-1)[0]))
            if row is None:
                continue
            condition = None if graph.condition is None else batch[graph.condition]
            error = (graph(batch["sample"], torch.tensor(row), condition)
                     - predicted_noise(model, denoiser_call(model, batch))).double()
            sums[row, :error.shape[1]] += error.transpose(0, 1).reshape(error.shape[1], -1).sum(dim=1)
            counts[row] += error[:, 0].numel()
    reached = counts[:, 0] > 0
    offsets[reached] += (sums[reached] / counts[reached]).to(offsets.dtype)
    return int(reached.sum())
