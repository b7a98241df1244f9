"""Finite-set calibration (FSC): activation ranges calibrated per sampling timestep, kept as tables.

Each activation quantizer in scope gets one row of (step, zero point) per timestep of the sampler's
schedule; the UNet selects the row of the timestep it is called with (`tfmq.quant.nn.temporal`), so the
quantized UNet stays a drop-in for diffusers pipelines:

- `attach_timestep_tables` gives the quantizers in scope their tables, with shapes fixed by the schedule
  length, so a freshly wrapped model loads a saved state, and attaches the schedule and its row selection.
- The row is the position of t in the schedule, looked up by value: the calibration data must be
  labelled with the sampler's actual timesteps.
- `calibrate_timestep_tables` fills the rows from a CalibrationSet, step by step.
- Schedule-free tables (`tfmq.quant.nn.temporal.training_schedule`) have a row for every training timestep:
  the calibrated timesteps get their own ranges, and every other row is filled from its calibrated
  neighbours (`fill_uncalibrated_rows`): their ranges linearly interpolated in t, or the nearest one's.
  Rows beyond the lowest or highest calibrated timestep take that edge row's range.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from tfmq.denoiser import denoiser_call
from tfmq.devices import module_device
from tfmq.quant.calibration import CalibrationSet, spread
from tfmq.quant.config import FSC_FILLS, FSC_SCOPES
from tfmq.quant.nn.layers import QuantLayer
from tfmq.quant.nn.quantizer import UniformQuantizer
from tfmq.quant.nn.temporal import TimestepTables, attach_timestep_schedule, checked_schedule, timestep_tables
from tfmq.quant.tib import find_tib
from tfmq.quant.wrap import activation_quantizers

TABLE_SCOPES = tuple(scope for scope in FSC_SCOPES if scope != "none")
# The FSC defaults of the authors' scripts: range init on 16 samples of a step, then a moving min/max
# with momentum 0.95 over all of that step's samples, batch by batch.
DEFAULT_MOMENTUM = 0.95
DEFAULT_INIT_SAMPLES = 16
DEFAULT_BATCH_SIZE = 16


def table_quantizers(model: nn.Module) -> Iterator[tuple[str, UniformQuantizer]]:
    """Every quantizer of `model` that carries a timestep table, with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, UniformQuantizer) and module.has_timestep_table:
            yield name, module


def quantizers_in_scope(model: nn.Module, scope: str) -> list[tuple[str, UniformQuantizer]]:
    """The activation quantizers that FSC scope `scope` gives a table.

    "temporal": the input quantizers of the Linears reading a temporal feature (the time MLP's second
    layer and every `time_emb_proj`), where they are quantized; "all": every activation quantizer.
    """
    _check_scope(scope)
    if scope == "all":
        return [(name, quantizer) for name, quantizer in activation_quantizers(model) if quantizer.bits is not None]
    chosen = []
    for name in find_tib(model).feature_reader_names:
        layer = model.get_submodule(name)
        if isinstance(layer, QuantLayer) and layer.input_quantizer.bits is not None:
            chosen.append((f"{name}.input_quantizer", layer.input_quantizer))
    return chosen


def _check_scope(scope: str) -> None:
    if scope not in TABLE_SCOPES:
        raise ValueError(f"a timestep table scope must be one of {', '.join(TABLE_SCOPES)}; got {scope!r}")


def _check_fill(fill: str) -> None:
    if fill not in FSC_FILLS:
        raise ValueError(f"fill must be one of {', '.join(FSC_FILLS)}; got {fill!r}")


def attach_timestep_tables(
    model: nn.Module, schedule: torch.Tensor | list[int], scope: str
) -> TimestepTables:
    """Give the activation quantizers of `scope` one uncalibrated row per timestep of `schedule`, and
    make `model` select the row of the timestep it is called with. Changes `model` in place.

    A model that has the schedule alone (`attach_timestep_schedule`, same schedule) keeps it."""
    _check_scope(scope)
    schedule = checked_schedule(schedule)
    model_class = type(model).__name__
    tables = timestep_tables(model)
    if tables is not None and (tables.scope != "none" or not torch.equal(tables.schedule.cpu(), schedule)):
        raise ValueError(f"{model_class} already carries timestep tables")
    chosen = quantizers_in_scope(model, scope)
    if not chosen:
        raise ValueError(f"{model_class} has no quantized activation in fsc_scope={scope!r}")
    if tables is None:
        tables = attach_timestep_schedule(model, schedule)
    for _, quantizer in chosen:
        quantizer.enable_timestep_table(len(schedule), tables.step_rows)
    tables.scope = scope
    return tables


def checked_calibration_schedule(calibration: CalibrationSet) -> torch.Tensor:
    """The schedule of `calibration`, after checking that its labels agree with it and cover it."""
    if len(calibration) == 0:
        raise ValueError("the calibration set is empty")
    schedule = checked_schedule(calibration.schedule)
    step_indices = calibration.step_indices.long().cpu()
    if int(step_indices.min()) < 0 or int(step_indices.max()) >= len(schedule):
        raise ValueError(f"calibration step indices must lie in 0..{len(schedule) - 1}")
    if not torch.equal(calibration.timesteps.cpu().to(torch.float64), schedule[step_indices].to(torch.float64)):
        raise ValueError("the calibration timesteps disagree with schedule[step_indices]: label calibration data "
                         "with the sampler's actual timestep array")
    missing = sorted(set(range(len(schedule))) - set(step_indices.unique().tolist()))
    if missing:
        shown = ", ".join(f"{step} (t={int(schedule[step])})" for step in missing[:5])
        raise ValueError(f"the calibration set has no samples of {len(missing)} scheduled step(s): {shown}")
    return schedule


def _observe(
    quantizers: list[UniformQuantizer], run: Callable[[torch.Tensor], None], batches: list[torch.Tensor],
    method: str | None,
) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Each quantizer's range over `batches`: by its own init method (None) or min-max."""
    for quantizer in quantizers:
        quantizer.start_observing(keep_sample=method != "minmax")
    for batch in batches:
        run(batch)
    return [quantizer.take_observed_range(method) for quantizer in quantizers]


def _step_ranges(
    quantizers: list[UniformQuantizer], run: Callable[[torch.Tensor], None], indices: torch.Tensor,
    momentum: float | None, init_samples: int, batch_size: int,
) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """The range of every quantizer over one step's samples `indices`."""
    if momentum is None:
        return _observe(quantizers, run, list(indices.split(batch_size)), None)
    ranges = _observe(quantizers, run, list(spread(indices, init_samples).split(batch_size)), None)
    for batch in indices.split(batch_size):
        batch_ranges = _observe(quantizers, run, [batch], "minmax")
        ranges = [
            None if current is None or seen is None else
            (momentum * current[0] + (1 - momentum) * seen[0], momentum * current[1] + (1 - momentum) * seen[1])
            for current, seen in zip(ranges, batch_ranges)
        ]
    return ranges


def fill_uncalibrated_rows(quantizer: UniformQuantizer, fill: str) -> None:
    """Give every uncalibrated row of `quantizer`'s table a range from the calibrated rows around it: their
    ranges interpolated linearly in the row's timestep ("linear"), or the nearer one's ("nearest"; the lower
    on a tie). Rows outside the calibrated ones take the edge row's range. The calibrated rows are unchanged."""
    rows, left, right, weight = filled_rows(quantizer.table_initialized, fill)
    if len(rows) == 0:
        return
    low, high = quantizer.table_ranges()
    quantizer.set_table_ranges(rows, torch.lerp(low[left], low[right], weight),
                               torch.lerp(high[left], high[right], weight))


def filled_rows(calibrated_mask: torch.Tensor, fill: str) -> tuple[torch.Tensor, ...]:
    """How a schedule-free table's uncalibrated rows are filled from its calibrated ones (`calibrated_mask`,
    bool per row): (rows, left, right, weight), each row's value lerp(value[left], value[right], weight)."""
    _check_fill(fill)
    calibrated = calibrated_mask.nonzero().flatten()
    if len(calibrated) == 0:
        raise ValueError("a table with no calibrated row has no value to fill the others from")
    rows = (~calibrated_mask).nonzero().flatten()
    above = torch.searchsorted(calibrated, rows, right=True)  # calibrated rows at or below each row
    left = calibrated[(above - 1).clamp(0, len(calibrated) - 1)]
    right = calibrated[above.clamp(max=len(calibrated) - 1)]
    gap = (right - left).clamp_min(1).float()
    weight = ((rows - left).float() / gap).clamp(0, 1)
    if fill == "nearest":
        weight = (weight > 0.5).float()
    return rows, left, right, weight


@torch.no_grad()
def calibrate_timestep_tables(
    model: nn.Module,
    calibration: CalibrationSet,
    scope: str,
    *,
    momentum: float | None = DEFAULT_MOMENTUM,
    init_samples: int = DEFAULT_INIT_SAMPLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    through_unet: bool = False,
    table_schedule: torch.Tensor | None = None,
    fill: str = "linear",
    progress: bool = True,
) -> TimestepTables:
    """Calibrate one activation range per scheduled timestep for every quantizer of `scope` (FSC).

    Attaches the tables (schedule: `table_schedule`, by default `calibration.schedule`) unless the model
    already has them for that schedule and scope. A schedule-free `table_schedule` (every training timestep)
    gets the calibration's timesteps calibrated and its other rows filled by `fill_uncalibrated_rows`
    ("linear" or "nearest"). For each calibrated step: the range is initialised by each quantizer's init
    method (min-max or MSE) on the step's first `init_samples` samples, then moved toward each batch's
    min/max with `momentum` over all of the step's samples; `momentum=None` takes the init method's range of
    all the step's samples at once. Weights and the other activations are quantized as the model is set.

    The model is called on the calibration inputs (conditions included). For the "temporal" scope only the
    TIB runs (unless `through_unet`): its features depend on the timesteps (and class labels) alone, so
    this gives the same tables for a fraction of the cost.
    """
    model_class = type(model).__name__
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                 or not 0 <= momentum < 1):
        raise ValueError(f"momentum must be in [0, 1) or None, got {momentum!r}")
    for name, value in (("init_samples", init_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    _check_scope(scope)
    _check_fill(fill)
    schedule = checked_calibration_schedule(calibration)
    table_schedule = schedule if table_schedule is None else checked_schedule(table_schedule)
    tables = timestep_tables(model)
    if tables is None or tables.scope == "none":
        tables = attach_timestep_tables(model, table_schedule, scope)
    elif tables.scope != scope or not torch.equal(tables.schedule.cpu(), table_schedule):
        raise ValueError(f"{model_class} already has timestep tables of scope {tables.scope!r} for another "
                         f"schedule or scope than this calibration ({scope!r}, {len(table_schedule)} steps)")
    if not tables.schedule_free and not torch.equal(table_schedule, schedule):
        raise ValueError("timestep tables of a schedule other than the calibration's must be schedule-free "
                         "(every training timestep, tfmq.quant.nn.training_schedule)")
    table_rows = [tables.row_of(int(timestep)) for timestep in schedule]  # the row each calibrated step sets

    tib = find_tib(model) if scope == "temporal" and not through_unet else None
    labels = calibration.conditions.get("class_labels")
    if tib is not None and tib.class_conditional and labels is None:
        raise ValueError(f"{model_class} is class-conditional: the calibration set needs class_labels")
    device = module_device(model)

    def run(indices: torch.Tensor) -> None:
        if tib is not None:
            tib.temporal_features(calibration.timesteps[indices].to(device),
                                  None if labels is None else labels[indices].to(device))
        else:
            denoiser_call(model, calibration.inputs(indices, device))

    named = list(table_quantizers(model))
    quantizers = [quantizer for _, quantizer in named]
    step_indices = calibration.step_indices.cpu()
    try:
        for step in tqdm(range(len(schedule)), desc="timestep tables", unit="step", disable=not progress):
            indices = (step_indices == step).nonzero().flatten()
            ranges = _step_ranges(quantizers, run, indices, momentum, init_samples, batch_size)
            for (name, quantizer), step_range in zip(named, ranges):
                if step_range is None:
                    raise ValueError(f"{name} saw no activation at step {step} (t={int(schedule[step])}): "
                                     "the calibration forward does not reach it")
                quantizer.set_table_range(table_rows[step], *step_range)
        if tables.schedule_free:
            for quantizer in quantizers:
                fill_uncalibrated_rows(quantizer, fill)
    finally:
        for quantizer in quantizers:
            quantizer.cancel_observing()
    return tables

