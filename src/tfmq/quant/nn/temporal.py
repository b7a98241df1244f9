"""The modules a quantized UNet carries to serve each call from per-timestep tables, and how a UNet call
selects their row.

A sampler visits a finite, known list of timesteps (the schedule). Tables indexed by it (the FSC tables of
activation quantizers, see `tfmq.quant.timestep_table`, and the temporal feature caches) hold one row per
scheduled timestep and read the row of the call from the model's `StepRows` (`tfmq.quant.nn.step_table`),
so the quantized UNet stays a drop-in for diffusers pipelines (`unet(sample, t)`):

- `attach_timestep_schedule` adds a `timestep_tables` submodule (the schedule, a buffer, and the model's
  `StepRows`); a forward pre-hook on the UNet turns the `timestep` argument into the row of the call, and
  a forward hook puts the previous one back after it, once it has taken the model's output correction
  (`tfmq.quant.nn.output_correction`), if it has one, off the output. Nothing else is written: the tables
  read the row.
- The row is the position of t in the schedule, looked up by value. A timestep outside the schedule, or a
  batch mixing timesteps, is an error, never a fallback.
- A schedule-free model's schedule is every training timestep, 0..T-1 in order (`training_schedule`): row t
  serves timestep t, so any scheduler's integer timesteps have their own row, and a fractional timestep (a
  continuous-time scheduler's) is served by the row of the nearest integer. A timestep outside 0..T-1 is an
  error.
- A temporal feature cache (a `StepTable` quantized per row) stands in for a module of the TIB whose output
  depends on the timestep alone (`cache_sites`: a residual block's `time_emb_proj`, a transformer
  embedder's time MLP); when every block of a UNet reads one, `SkippedTimestepEmbedding` stands in for the
  time MLP.
  `install_temporal_cache` puts them in place, `restore_temporal_cache` rebuilds them empty from a
  checkpoint's metadata, ready for its state.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.normalization import AdaGroupNorm
from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D
from torch import nn

from tfmq.devices import module_device
from tfmq.quant.nn.output_correction import CORRECTION_NAME, OutputCorrection, output_correction
from tfmq.quant.nn.quantizer import UniformQuantizer
from tfmq.quant.nn.step_table import StepRows, StepTable
from tfmq.quant.tib import TemporalInformationBlock, find_tib

TABLES_NAME = "timestep_tables"
SCHEDULE_KEY = f"{TABLES_NAME}.schedule"
# The UNet forwards whose only readers of the time embedding, besides the class and added embeddings
# (refused by find_tib or checked), are the blocks: read in diffusers 0.42.
_KNOWN_FORWARDS = (UNet2DModel.forward, UNet2DConditionModel.forward)


# A residual block's temporal feature at every scheduled timestep, computed ahead and quantized per row
# (full-precision values are float codes on the grid (1, 0)): the step table that methods and checkpoints
# build and look for under this name.


class SkippedTimestepEmbedding(TimestepEmbedding):
    """The time MLP of a UNet whose every block reads its temporal feature from a cache: nothing reads the
    embedding any more, so it returns zeros of the right shape without computing anything.

    Keeps the original's layers under the same names, so the model's state (and find_tib) are unchanged.
    """

    def __init__(self, embedding: TimestepEmbedding) -> None:
        nn.Module.__init__(self)  # not TimestepEmbedding.__init__: the layers are the original's
        for name in ("linear_1", "act", "linear_2", "cond_proj", "post_act"):  # TimestepEmbedding's attributes
            setattr(self, name, getattr(embedding, name))

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        return sample.new_zeros(sample.shape[0], self.linear_2.out_features)


class TimestepTables(nn.Module):
    """The schedule a model's timestep tables are indexed by, and the rows they serve.

    Lives in the UNet as the submodule `timestep_tables`; its `schedule` buffer (int64: the sampler's
    timesteps in sampling order, or every training timestep for a schedule-free model) is saved with the
    model's state. `step_rows` is shared by every table of the model and holds the row of the call in
    progress, not saved: None outside a UNet call or `selected_timestep`. `scope` is the FSC scope of the quantizer tables, "none" when only temporal
    feature caches use the rows.
    """

    def __init__(self, schedule: torch.Tensor, scope: str, timestep_position: int) -> None:
        super().__init__()
        self.register_buffer("schedule", schedule)
        # rows for every training timestep 0..T-1 (`training_schedule`): any timestep of it is served
        self.schedule_free = is_training_schedule(schedule.cpu())
        self.scope = scope
        self.timestep_position = timestep_position  # index of `timestep` among the forward's arguments
        self.step_rows = StepRows()

    def extra_repr(self) -> str:
        return f"scope={self.scope}, steps={len(self.schedule)}" + (", any timestep" if self.schedule_free else "")

    def row_of(self, timestep: torch.Tensor | int | float) -> int:
        """The row of `timestep` (a number, or a tensor whose entries all hold the same timestep)."""
        values = torch.as_tensor(timestep, device="cpu").detach().reshape(-1)
        if values.numel() == 0:
            raise ValueError("no timestep given: the timestep tensor is empty")
        if not bool((values == values[0]).all()):
            distinct = sorted(set(values.tolist()))
            shown = ", ".join(map(str, distinct[:5])) + (", ..." if len(distinct) > 5 else "")
            raise ValueError(f"all samples of a batch must share one timestep with per-timestep activation "
                             f"tables; got {len(distinct)} different ones ({shown})")
        value = values[0].item()
        schedule = self.schedule.cpu()
        if self.schedule_free:
            if not 0 <= round(value) < len(schedule):
                raise ValueError(f"timestep {value} is outside the model's training range 0..{len(schedule) - 1}, "
                                 "which its schedule-free tables cover")
            return round(value)
        matches = (schedule.to(torch.float64) == float(value)).nonzero().flatten()
        if len(matches) == 0:
            raise ValueError(
                f"timestep {value} is not one of the {len(schedule)} timesteps the activation tables were "
                f"calibrated for ({int(schedule.min())}..{int(schedule.max())}); sample with the schedule "
                "of the calibration data"
            )
        return int(matches[0])

    def rows_of(self, timestep: torch.Tensor | int | float) -> torch.Tensor:
        """The row of `timestep` as the tables take it: one row (0-d int64) for the whole batch.

        Found where the schedule is and checked by a device-side assertion, so the host never waits for an
        accelerator on a UNet call; where the check runs at once (the CPU) a bad timestep gets `row_of`'s
        detailed error."""
        values = torch.as_tensor(timestep, device=self.schedule.device).detach().reshape(-1)
        if values.numel() == 0:
            self.row_of(timestep)  # raises
        if self.schedule_free:
            return self._nearest_row(timestep, values)
        matches = self.schedule.to(torch.float64) == values[:1].to(torch.float64)
        try:
            torch._assert_async(matches.any() & (values == values[:1]).all(),
                                "a timestep of this call is not in the schedule of the timestep tables, or the "
                                "batch mixes timesteps: sample with the schedule of the calibration data")
        except RuntimeError:
            self.row_of(timestep)
            raise
        return matches.to(torch.int64).argmax()

    def check_serves(self, timesteps: torch.Tensor | list[int]) -> None:
        """A ValueError unless every timestep of `timesteps` (a sampler's) has a row: checked before sampling."""
        values = torch.as_tensor(timesteps, device="cpu").reshape(-1)
        schedule = self.schedule.cpu()
        if self.schedule_free:
            served = (values.round() >= 0) & (values.round() < len(schedule))
        else:
            served = torch.isin(values.to(torch.float64), schedule.to(torch.float64))
        if not bool(served.all()):
            missing = sorted(set(values[~served].tolist()))
            shown = ", ".join(f"{value:g}" for value in missing[:5]) + (", ..." if len(missing) > 5 else "")
            if self.schedule_free:
                raise ValueError(f"this sampler visits {len(missing)} timestep(s) outside the model's training "
                                 f"range 0..{len(schedule) - 1} ({shown})")
            raise ValueError(f"this sampler visits {len(missing)} timestep(s) that are not among the {len(schedule)} "
                             f"the model was calibrated for ({shown}): sample with the calibration's sampler and "
                             "steps, or quantize with --schedule-free")

    def _nearest_row(self, timestep: torch.Tensor | int | float, values: torch.Tensor) -> torch.Tensor:
        """Row round(t) of a schedule-free table, checked like `rows_of`'s (on the device)."""
        row = values[0].round().to(torch.int64) if values.is_floating_point() else values[0].to(torch.int64)
        try:
            torch._assert_async((row >= 0) & (row < len(self.schedule)) & (values == values[:1]).all(),
                                "a timestep of this call is outside the training range of the schedule-free "
                                "tables, or the batch mixes timesteps")
        except RuntimeError:
            self.row_of(timestep)
            raise
        return row


def training_schedule(num_train_timesteps: int) -> torch.Tensor:
    """The schedule of schedule-free tables: every training timestep 0..T-1 in order, so row t is timestep t."""
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"a training range has at least 2 timesteps, got {num_train_timesteps!r}")
    return torch.arange(num_train_timesteps, dtype=torch.int64, device="cpu")


def is_training_schedule(schedule: torch.Tensor) -> bool:
    """Whether `schedule` is every timestep 0..T-1 in order (no sampler visits timesteps in rising order)."""
    return len(schedule) > 1 and int(schedule[0]) == 0 and bool((schedule.diff() == 1).all())


def timestep_tables(model: nn.Module) -> TimestepTables | None:
    """The model's TimestepTables, or None if its quantizers carry no timestep tables."""
    tables = model._modules.get(TABLES_NAME)
    return tables if isinstance(tables, TimestepTables) else None


def checked_schedule(schedule: torch.Tensor | list[int]) -> torch.Tensor:
    """`schedule` as int64 on the CPU, once it is a non-empty list of distinct integer timesteps."""
    schedule = torch.as_tensor(schedule, device="cpu").detach()
    if schedule.dim() != 1 or len(schedule) == 0:
        raise ValueError(f"a schedule is a non-empty 1-D list of timesteps, got shape {tuple(schedule.shape)}")
    if schedule.is_floating_point() and not torch.equal(schedule, schedule.round()):
        raise ValueError("timestep tables need integer timesteps; this schedule has fractional ones")
    schedule = schedule.to(torch.int64)
    if len(schedule.unique()) != len(schedule):
        raise ValueError("the schedule repeats a timestep: a table row per timestep would be ambiguous")
    return schedule


def _timestep_position(model: nn.Module) -> int:
    parameters = list(inspect.signature(model.forward).parameters)
    if "timestep" not in parameters:
        raise ValueError(f"{type(model).__name__}.forward takes no `timestep` argument: it cannot select "
                         "per-timestep activation tables")
    return parameters.index("timestep")


def attach_timestep_schedule(model: nn.Module, schedule: torch.Tensor | list[int]) -> TimestepTables:
    """Make `model` select, from the timestep of each call, the row of `schedule` for every timestep-indexed
    table in it, without giving any quantizer a table (scope "none"). Changes `model` in place."""
    schedule = checked_schedule(schedule)
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
    rows = None
    try:
        if "timestep" in kwargs:
            timestep = kwargs["timestep"]
        elif len(args) > tables.timestep_position:
            timestep = args[tables.timestep_position]
        else:
            raise ValueError(f"{type(model).__name__} was called without a timestep: its activation tables "
                             "need one to pick their row")
        rows = tables.rows_of(timestep)
    finally:  # entered even on an error (no row then): the after-call hook runs anyway and leaves
        tables.step_rows.enter(rows)


def _restore_row_after_call(model: nn.Module, args: tuple, output: object) -> object:
    """Take the output correction off the call's output at its row (while the row is still served), then
    serve the rows of before the call."""
    tables = timestep_tables(model)
    if tables is None:
        return None
    try:
        correction = output_correction(model)
        if correction is not None and output is not None and tables.step_rows.rows is not None:
            return correction.corrected(output)
        return None
    finally:
        tables.step_rows.leave()


@contextmanager
def selected_timestep(model: nn.Module, timestep: torch.Tensor | int | float) -> Iterator[int]:
    """Use the table rows of `timestep` inside the block (for calling parts of the model directly);
    yields the row. The previous row comes back on exit."""
    tables = timestep_tables(model)
    if tables is None:
        raise ValueError(f"{type(model).__name__} carries no timestep tables")
    rows = tables.rows_of(timestep)
    with tables.step_rows.serving(rows):
        yield int(rows)


def temporal_features_by_timestep(
    model: nn.Module, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The TIB's temporal features of `model` for mixed `timesteps`, each computed with the table rows of
    its own timestep when the model carries tables: what the UNet's blocks receive at that timestep."""
    tib = find_tib(model)
    return _by_timestep(model, timesteps, class_labels, tib.temporal_features)


def cache_site_outputs_by_timestep(model: nn.Module, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
    """{owner: output} of the TIB's cache sites of `model` (`TemporalInformationBlock.cache_sites`) for
    mixed `timesteps`, each with its own timestep's table rows: what a cache would replace."""
    tib = find_tib(model)
    return _by_timestep(model, timesteps, None, lambda group, _labels: tib.site_outputs(group))


def _by_timestep(
    model: nn.Module, timesteps: torch.Tensor, class_labels: torch.Tensor | None,
    compute: Callable[[torch.Tensor, torch.Tensor | None], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """`compute(timesteps, labels)` for mixed `timesteps`, one timestep at a time under its table rows when
    `model` carries tables, put back in the order of `timesteps`."""
    if timestep_tables(model) is None:
        return compute(timesteps, class_labels)
    timesteps = torch.as_tensor(timesteps, device=module_device(model)).reshape(-1)
    results: dict[str, torch.Tensor] = {}
    for timestep in timesteps.unique():
        positions = (timesteps == timestep).nonzero().flatten()
        labels = None if class_labels is None else class_labels[positions.to(class_labels.device)]
        with selected_timestep(model, timestep):
            group = compute(timesteps[positions], labels)
        for name, values in group.items():
            if name not in results:
                results[name] = values.new_empty(len(timesteps), *values.shape[1:])
            results[name][positions.to(values.device)] = values
    return results


def _time_embedding_unread(model: nn.Module, tib: TemporalInformationBlock) -> bool:
    """True if no module of `model` reads the time embedding: every block takes its temporal feature from a
    cache, and nothing else in the forward (class embedding, spatial or adaptive norms) uses it."""
    if type(model).forward not in _KNOWN_FORWARDS or tib.class_embedding is not None:
        return False
    for module in model.modules():
        if isinstance(module, ResnetBlock2D) and not isinstance(module.time_emb_proj, StepTable):
            return False  # reads the embedding, projected or (without time_emb_proj) as it is
        if isinstance(module, (ResnetBlockCondNorm2D, AdaGroupNorm)):
            return False
        if isinstance(module, Attention) and module.spatial_norm is not None:
            return False
    return True


def cache_code_dtype(bits: int | None) -> torch.dtype:
    """The dtype of a cache's codes at `bits` (None: full-precision values)."""
    if bits is None:
        return torch.float32
    return torch.uint8 if bits <= 8 else torch.int32


def site_width(module: nn.Module) -> int:
    """The output width of a cache site: a projection's, or a time MLP's (its last Linear's)."""
    return module.out_features if hasattr(module, "out_features") else module.linear_2.out_features


def install_temporal_cache(
    model: nn.Module, schedule: torch.Tensor, caches: Mapping[str, StepTable]
) -> bool:
    """Make `caches` ({owner: its cache}) stand in for the TIB's cache sites of those owners (a residual
    block's `time_emb_proj`, a transformer embedder's time MLP, PixArt's modulation Linear), serving the row
    of `schedule` of each call; skip a UNet's time MLP when no block reads it any more. Returns whether it
    was skipped. Changes `model` in place; it then needs timesteps of `schedule`."""
    tib = find_tib(model)
    sites = tib.cache_sites
    unknown = sorted(set(caches) - set(sites))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: no module of {type(model).__name__}'s Temporal Information Block "
                         "whose output depends on the timestep alone")
    schedule = torch.as_tensor(schedule, device="cpu")
    tables = timestep_tables(model)
    if tables is None:
        tables = attach_timestep_schedule(model, schedule)
    elif not torch.equal(tables.schedule.cpu(), schedule.to(tables.schedule.dtype)):
        raise ValueError(f"{type(model).__name__}'s timestep tables serve another schedule than the cache's")
    device = next(model.parameters()).device
    for owner, cache in caches.items():
        block = model.get_submodule(owner)
        expected = (len(schedule), site_width(getattr(block, sites[owner])))
        if tuple(cache.codes.shape) != expected:
            raise ValueError(f"the cache of {owner} has shape {tuple(cache.codes.shape)}, expected {expected}")
        cache.step_rows = tables.step_rows
        setattr(block, sites[owner], cache.to(device))
    if not any(isinstance(module, UniformQuantizer) and module.has_timestep_table for module in model.modules()):
        tables.scope = "none"  # every quantizer table was in a module a cache now stands in for (PixArt's)
    embedding = tib.skippable_embedding
    skipped = embedding is not None and _time_embedding_unread(model, tib)
    if skipped and not isinstance(model.get_submodule(embedding), SkippedTimestepEmbedding):
        setattr(model, embedding, SkippedTimestepEmbedding(model.get_submodule(embedding)))
    return skipped


def restore_temporal_cache(model: nn.Module, schedule: torch.Tensor, blocks: Sequence[str],
                           code_dtype: torch.dtype) -> bool:
    """Empty caches (right shapes, codes of `code_dtype`) for `blocks`, ready for `load_state_dict`: what
    `install_temporal_cache` built, rebuilt from a checkpoint's manifest."""
    caches = {}
    device = module_device(model)
    sites = find_tib(model).cache_sites
    for block in blocks:
        if block not in sites:
            raise ValueError(f"{block} holds no module a temporal feature cache stands in for")
        width = site_width(getattr(model.get_submodule(block), sites[block]))
        steps = len(schedule)
        caches[block] = StepTable(torch.zeros(steps, width, dtype=code_dtype, device=device),
                                  torch.ones(steps, device=device), torch.zeros(steps, device=device))
    return install_temporal_cache(model, schedule, caches)


def attach_output_correction(model: nn.Module, schedule: torch.Tensor, offsets: torch.Tensor) -> OutputCorrection:
    """Make every call of `model` return its output less row `offsets[i]` (one per channel) at step i of
    `schedule` (the model's timestep tables' schedule; attached, with no quantizer tables, if it has none).
    Changes `model` in place."""
    schedule = checked_schedule(schedule)
    if output_correction(model) is not None:
        raise ValueError(f"{type(model).__name__} already carries an output correction")
    tables = timestep_tables(model)
    if tables is None:
        tables = attach_timestep_schedule(model, schedule)
    elif not torch.equal(tables.schedule.cpu(), schedule):
        raise ValueError(f"{type(model).__name__}'s timestep tables serve another schedule than the output "
                         "correction's")
    if offsets.dim() != 2 or len(offsets) != len(schedule):
        raise ValueError(f"output offsets are ({len(schedule)} steps, channels), got shape {tuple(offsets.shape)}")
    correction = OutputCorrection(offsets.to(module_device(model)), tables.step_rows)
    model.add_module(CORRECTION_NAME, correction)
    return correction
