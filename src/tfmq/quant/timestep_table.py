"""Finite-set calibration (FSC): activation ranges calibrated per sampling timestep, kept as tables.

A sampler visits a finite, known list of timesteps (the schedule). Each activation quantizer in scope
gets one row of (step, zero point) per scheduled timestep, and the UNet picks the row of the timestep
it is called with, so the quantized UNet stays a drop-in for diffusers pipelines (`unet(sample, t)`):

- `attach_timestep_tables` adds a `timestep_tables` submodule (the schedule, a buffer) and gives the
  quantizers in scope their tables, with shapes fixed by the schedule length, so a freshly wrapped model
  loads a saved state; a forward pre-hook on the UNet turns the `timestep` argument into a row for every
  table, and a forward hook puts the previous row back after the call.
- The row is the position of t in the schedule, looked up by value: the calibration data must be
  labelled with the sampler's actual timesteps. A timestep outside the schedule, or a batch mixing
  timesteps, is an error, never a fallback.
- `calibrate_timestep_tables` fills the rows from a CalibrationSet, step by step.

The same row selection serves `TemporalFeatureCache` (TFMQ's cache of temporal features, one row per
scheduled timestep): `attach_timestep_schedule` gives a model the schedule and the hooks alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm import tqdm

from tfmq.quant.calibration import CalibrationSet
from tfmq.quant.config import FSC_SCOPES
from tfmq.quant.layers import QuantLayer
from tfmq.quant.quantizer import UniformQuantizer
from tfmq.quant.tib import find_tib
from tfmq.quant.wrap import activation_quantizers

TABLES_NAME = "timestep_tables"
SCHEDULE_KEY = f"{TABLES_NAME}.schedule"
TABLE_SCOPES = tuple(scope for scope in FSC_SCOPES if scope != "none")
# The FSC defaults of the authors' scripts: range init on 16 samples of a step, then a moving min/max
# with momentum 0.95 over all of that step's samples, batch by batch.
DEFAULT_MOMENTUM = 0.95
DEFAULT_INIT_SAMPLES = 16
DEFAULT_BATCH_SIZE = 16



class TemporalFeatureCache(nn.Module):
    """Stands in for a residual block's `time_emb_proj`: its output at every scheduled timestep, computed
    ahead and quantized, one row per timestep of the schedule.

    Buffers (saved with the model): `codes` (timesteps, channels), integers on each row's own grid
    `scale` / `zero_point` (one per row); full-precision values are stored as float codes on the grid
    (1, 0). The row is selected like the quantizers' tables, from the timestep of the UNet call; the
    input (the time embedding) is read only for its batch size and dtype.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        super().__init__()
        if codes.dim() != 2 or scale.shape != (len(codes),) or zero_point.shape != (len(codes),):
            raise ValueError(f"a temporal feature cache is codes (timesteps, channels) with one scale and zero point "
                             f"per timestep; got {tuple(codes.shape)}, {tuple(scale.shape)}, {tuple(zero_point.shape)}")
        self.register_buffer("codes", codes.detach().clone())
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("zero_point", zero_point.detach().float().clone())
        self.timestep_row: int | None = None

    @property
    def out_features(self) -> int:
        return self.codes.shape[1]

    def extra_repr(self) -> str:
        return f"timestep_rows={self.codes.shape[0]}, out_features={self.out_features}, codes={self.codes.dtype}"

    def values(self) -> torch.Tensor:
        """The whole table, dequantized: (timesteps, channels), as `forward` serves it row by row."""
        return (self.codes.float() - self.zero_point[:, None]) * self.scale[:, None]

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        row = self.timestep_row
        if row is None:
            raise RuntimeError(
                f"TemporalFeatureCache({self.extra_repr()}) has no timestep selected: call the model with its "
                "timestep, or use timestep_table.selected_timestep(model, t)"
            )
        values = (self.codes[row].float() - self.zero_point[row]) * self.scale[row]
        return values.to(embedding.dtype).expand(embedding.shape[0], -1)


class TimestepTables(nn.Module):
    """The schedule a model's timestep tables are indexed by, and the row in use.

    Lives in the UNet as the submodule `timestep_tables`; its `schedule` buffer (int64, the sampler's
    timesteps in sampling order) is saved with the model's state. The row is state of the moment,
    not saved: None outside a UNet call or `selected_timestep`. `scope` is the FSC scope of the
    quantizer tables, "none" when only temporal feature caches use the rows.
    """

    def __init__(self, schedule: torch.Tensor, scope: str, timestep_position: int) -> None:
        super().__init__()
        self.register_buffer("schedule", schedule)
        self.scope = scope
        self.timestep_position = timestep_position  # index of `timestep` among the forward's arguments
        self.current_row: int | None = None
        self._rows_before_calls: list[int | None] = []

    def extra_repr(self) -> str:
        return f"scope={self.scope}, steps={len(self.schedule)}"

    def row_of(self, timestep: torch.Tensor | int | float) -> int:
        """The row of `timestep` (a number, or a tensor whose entries all hold the same timestep)."""
        values = torch.as_tensor(timestep).detach().reshape(-1).cpu()
        if values.numel() == 0:
            raise ValueError("no timestep given: the timestep tensor is empty")
        if not bool((values == values[0]).all()):
            distinct = sorted(set(values.tolist()))
            shown = ", ".join(map(str, distinct[:5])) + (", ..." if len(distinct) > 5 else "")
            raise ValueError(f"all samples of a batch must share one timestep with per-timestep activation "
                             f"tables; got {len(distinct)} different ones ({shown})")
        value = values[0].item()
        schedule = self.schedule.cpu()
        matches = (schedule.to(torch.float64) == float(value)).nonzero().flatten()
        if len(matches) == 0:
            raise ValueError(
                f"timestep {value} is not one of the {len(schedule)} timesteps the activation tables were "
                f"calibrated for ({int(schedule.min())}..{int(schedule.max())}); sample with the schedule "
                "of the calibration data"
            )
        return int(matches[0])

    def select(self, model: nn.Module, row: int | None) -> None:
        """Make `row` the current one of every timestep table and feature cache in `model` (None: no row)."""
        # Runs twice per UNet call: walks modules without building their names.
        for module in model.modules():
            if (isinstance(module, UniformQuantizer) and module.has_timestep_table) \
                    or isinstance(module, TemporalFeatureCache):
                module.timestep_row = row
        self.current_row = row


def timestep_tables(model: nn.Module) -> TimestepTables | None:
    """The model's TimestepTables, or None if its quantizers carry no timestep tables."""
    tables = model._modules.get(TABLES_NAME)
    return tables if isinstance(tables, TimestepTables) else None


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


def _timestep_position(model: nn.Module) -> int:
    parameters = list(inspect.signature(model.forward).parameters)
    if "timestep" not in parameters:
        raise ValueError(f"{type(model).__name__}.forward takes no `timestep` argument: it cannot select "
                         "per-timestep activation tables")
    return parameters.index("timestep")


def _checked_schedule(schedule: torch.Tensor | list[int]) -> torch.Tensor:
    schedule = torch.as_tensor(schedule).detach().cpu()
    if schedule.dim() != 1 or len(schedule) == 0:
        raise ValueError(f"a schedule is a non-empty 1-D list of timesteps, got shape {tuple(schedule.shape)}")
    if schedule.is_floating_point() and not torch.equal(schedule, schedule.round()):
        raise ValueError("timestep tables need integer timesteps; this schedule has fractional ones")
    schedule = schedule.to(torch.int64)
    if len(schedule.unique()) != len(schedule):
        raise ValueError("the schedule repeats a timestep: a table row per timestep would be ambiguous")
    return schedule


def attach_timestep_tables(
    model: nn.Module, schedule: torch.Tensor | list[int], scope: str
) -> TimestepTables:
    """Give the activation quantizers of `scope` one uncalibrated row per timestep of `schedule`, and
    make `model` select the row of the timestep it is called with. Changes `model` in place.

    A model that has the schedule alone (`attach_timestep_schedule`, same schedule) keeps it."""
    _check_scope(scope)
    schedule = _checked_schedule(schedule)
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
        quantizer.enable_timestep_table(len(schedule))
    tables.scope = scope
    return tables


def attach_timestep_schedule(model: nn.Module, schedule: torch.Tensor | list[int]) -> TimestepTables:
    """Make `model` select, from the timestep of each call, the row of `schedule` for every timestep-indexed
    table in it, without giving any quantizer a table (scope "none"). Changes `model` in place."""
    schedule = _checked_schedule(schedule)
    if timestep_tables(model) is not None:
        raise ValueError(f"{type(model).__name__} already carries timestep tables")
    position = _timestep_position(model)
    device = next(model.parameters()).device
    tables = TimestepTables(schedule.to(device), "none", position)
    model.add_module(TABLES_NAME, tables)
    # Module-level hooks (no closures): a deep copy of the model selects rows of its own quantizers.
    model.register_forward_pre_hook(_select_row_before_call, with_kwargs=True)
    model.register_forward_hook(_restore_row_after_call, always_call=True)
    return tables


def _select_row_before_call(model: nn.Module, args: tuple, kwargs: dict) -> None:
    tables = timestep_tables(model)
    if tables is None:
        return
    # Saved first: the after-call hook runs even when this one raises.
    tables._rows_before_calls.append(tables.current_row)
    if "timestep" in kwargs:
        timestep = kwargs["timestep"]
    elif len(args) > tables.timestep_position:
        timestep = args[tables.timestep_position]
    else:
        raise ValueError(f"{type(model).__name__} was called without a timestep: its activation tables "
                         "need one to pick their row")
    tables.select(model, tables.row_of(timestep))


def _restore_row_after_call(model: nn.Module, args: tuple, output: object) -> None:
    tables = timestep_tables(model)
    if tables is not None and tables._rows_before_calls:
        tables.select(model, tables._rows_before_calls.pop())


@contextmanager
def selected_timestep(model: nn.Module, timestep: torch.Tensor | int | float) -> Iterator[int]:
    """Use the table rows of `timestep` inside the block (for calling parts of the model directly);
    yields the row. The previous row comes back on exit."""
    tables = timestep_tables(model)
    if tables is None:
        raise ValueError(f"{type(model).__name__} carries no timestep tables")
    previous = tables.current_row
    row = tables.row_of(timestep)
    tables.select(model, row)
    try:
        yield row
    finally:
        tables.select(model, previous)


def temporal_features_by_timestep(
    model: nn.Module, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The TIB's temporal features of `model` for mixed `timesteps`, each computed with the table rows of
    its own timestep when the model carries tables: what the UNet's blocks receive at that timestep."""
    tib = find_tib(model)
    tables = timestep_tables(model)
    if tables is None:
        return tib.temporal_features(timesteps, class_labels)
    timesteps = torch.as_tensor(timesteps).reshape(-1)
    features: dict[str, torch.Tensor] = {}
    for timestep in timesteps.unique():
        positions = (timesteps == timestep).nonzero().flatten()
        labels = None if class_labels is None else class_labels[positions.to(class_labels.device)]
        with selected_timestep(model, timestep):
            group = tib.temporal_features(timesteps[positions], labels)
        for name, values in group.items():
            if name not in features:
                features[name] = values.new_empty(len(timesteps), *values.shape[1:])
            features[name][positions.to(values.device)] = values
    return features


def _check_calibration(calibration: CalibrationSet) -> torch.Tensor:
    """The schedule of `calibration`, after checking that its labels agree with it and cover it."""
    if len(calibration) == 0:
        raise ValueError("the calibration set is empty")
    schedule = _checked_schedule(calibration.schedule)
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
    ranges = _observe(quantizers, run, list(indices[:init_samples].split(batch_size)), None)
    for batch in indices.split(batch_size):
        batch_ranges = _observe(quantizers, run, [batch], "minmax")
        ranges = [
            None if current is None or seen is None else
            (momentum * current[0] + (1 - momentum) * seen[0], momentum * current[1] + (1 - momentum) * seen[1])
            for current, seen in zip(ranges, batch_ranges)
        ]
    return ranges


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
    progress: bool = True,
) -> TimestepTables:
    """Calibrate one activation range per scheduled timestep for every quantizer of `scope` (FSC).

    Attaches the tables (schedule = `calibration.schedule`) unless the model already has them for that
    schedule and scope. For each step: the range is initialised by each quantizer's init method (min-max
    or MSE) on the step's first `init_samples` samples, then moved toward each batch's min/max with
    `momentum` over all of the step's samples; `momentum=None` takes the init method's range of all the
    step's samples at once. Weights and the other activations are quantized as the model is set.

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
    schedule = _check_calibration(calibration)
    tables = timestep_tables(model)
    if tables is None or tables.scope == "none":
        tables = attach_timestep_tables(model, schedule, scope)
    elif tables.scope != scope or not torch.equal(tables.schedule.cpu(), schedule):
        raise ValueError(f"{model_class} already has timestep tables of scope {tables.scope!r} for another "
                         f"schedule or scope than this calibration ({scope!r}, {len(schedule)} steps)")

    tib = find_tib(model) if scope == "temporal" and not through_unet else None
    labels = calibration.conditions.get("class_labels")
    if tib is not None and tib.class_embedding is not None and labels is None:
        raise ValueError(f"{model_class} is class-conditional: the calibration set needs class_labels")
    device = next(model.parameters()).device

    def run(indices: torch.Tensor) -> None:
        if tib is not None:
            tib.temporal_features(calibration.timesteps[indices].to(device),
                                  None if labels is None else labels[indices].to(device))
        else:
            model(**{key: value.to(device) for key, value in calibration.inputs(indices).items()})

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
                quantizer.set_table_range(step, *step_range)
    finally:
        for quantizer in quantizers:
            quantizer.cancel_observing()
    return tables

