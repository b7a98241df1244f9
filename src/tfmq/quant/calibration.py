"""Calibration data from the full-precision model's own sampling trajectories (no training data).

Every sampling step of N seeded trajectories is recorded as (x_t, t, step index). Activation calibration
uses every step; weight reconstruction thins them to every `interval_length`-th step, as in the paper's
scripts. The paper's scripts draw fresh trajectories per step; here the N trajectories are shared by all
steps, which gives each step the same marginal distribution for a hundredth of the UNet calls.

A set is calibration data only for the model, sampler and guidance it was recorded with: it carries its
provenance (`CalibrationProvenance`), saved with a digest of its tensors, and a loaded set is checked against
the run it is used in (`CalibrationSet.check_made_for`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file

from tfmq import distributed
from tfmq.errors import TfmqError
from tfmq.files import WRITTEN_BY, write_bytes_atomic
from tfmq.quant.spill import SpillFolder
from tfmq.sampling import Conditioning, SamplerConfig, distinct_timesteps, sample, sampling_timesteps
from tfmq.sampling.validation import check_count

CALIBRATION_SEED_OFFSET = 1_000_000  # calibration seeds never coincide with evaluation seeds 0, 1, 2, ...
CONDITION_PREFIX = "condition."  # conditions' keys in a saved set
CALIBRATION_SPILL_PREFIX = "tfmq-calibration-"
DIGESTED_METADATA = ("interval_length", "provenance")  # the metadata a saved set's digest covers


@dataclass(frozen=True)
class CalibrationProvenance:
    """What a calibration set was recorded from: the base model (`model_fingerprint`), the sampler, the
    number of trajectories, the seed and the guidance scale (1.0 without guidance), and how long it took."""

    model_fingerprint: str
    sampler: SamplerConfig
    num_trajectories: int
    seed: int
    guidance_scale: float = 1.0
    collect_seconds: float | None = field(default=None, compare=False)  # a measurement, not an identity

    def to_dict(self) -> dict:
        return {**asdict(self), "sampler": self.sampler.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> CalibrationProvenance:
        return cls(**{**data, "sampler": SamplerConfig(**data["sampler"])})


@dataclass
class CalibrationSet:
    """UNet inputs recorded along sampling trajectories, with the schedule they were recorded on.

    `conditions` holds the UNet's other keyword inputs per sample (class_labels, encoder_hidden_states);
    with guidance the unconditional and conditional branch of a step are both recorded, as the UNet saw them.
    A set recorded beyond a memory budget keeps its rows in memory-mapped files of `spill` (its subsets
    too), and its batches are views of them.
    """

    samples: torch.Tensor       # x_t, (N, C, H, W)
    timesteps: torch.Tensor     # t of each sample, (N,)
    step_indices: torch.Tensor  # position of t in `schedule`, (N,)
    schedule: torch.Tensor      # the distinct timesteps the sampler visits, in order
    interval_length: int = 1
    conditions: dict[str, torch.Tensor] = field(default_factory=dict)
    provenance: CalibrationProvenance | None = None
    loaded_from: str | None = None  # the file `load` read it from (not saved)
    spill: SpillFolder | None = field(default=None, repr=False)  # where its rows are on disk, if they are

    def __len__(self) -> int:
        return len(self.samples)

    def _subset(self, keep: torch.Tensor) -> CalibrationSet:
        # no provenance: a subset is no longer the set that was recorded; a spilled set's subset is spilled too
        rows = keep.nonzero().flatten()
        take = (lambda tensor: tensor[rows]) if self.spill is None else (lambda tensor: self.spill.take(tensor, rows))
        return CalibrationSet(take(self.samples), self.timesteps[rows], self.step_indices[rows], self.schedule,
                              self.interval_length, {key: take(value) for key, value in self.conditions.items()},
                              spill=self.spill)

    def at_steps(self, step_indices: torch.Tensor | list[int]) -> CalibrationSet:
        return self._subset(torch.isin(self.step_indices, torch.as_tensor(step_indices, device=self.step_indices.device)))

    def for_weights(self) -> CalibrationSet:
        """Every `interval_length`-th sampling step: the data of weight reconstruction."""
        return self.at_steps(list(range(0, len(self.schedule), self.interval_length)))

    def per_step(self, count: int) -> CalibrationSet:
        """At most `count` samples of every sampling step, spread evenly over the step's samples (`spread`):
        a balanced subset, of both branches of a guided set."""
        keep = torch.zeros(len(self), dtype=torch.bool, device=self.step_indices.device)
        for step in self.step_indices.unique():
            keep[spread((self.step_indices == step).nonzero().flatten(), count)] = True
        return self._subset(keep)

    def inputs(self, indices: torch.Tensor, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """UNet keyword inputs of samples `indices`, on `device` (default: where the set is)."""
        inputs = {"sample": self.samples[indices], "timestep": self.timesteps[indices],
                  **{key: value[indices] for key, value in self.conditions.items()}}
        return inputs if device is None else {key: value.to(device) for key, value in inputs.items()}

    def timestep_groups(self, device: torch.device | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """UNet keyword inputs of one timestep at a time: how a sampler calls the UNet, and all that a model
        with per-timestep tables accepts."""
        for timestep in self.timesteps.unique():
            yield self.inputs((self.timesteps == timestep).nonzero().flatten(), device)

    def batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """The whole set as UNet keyword inputs, `batch_size` samples at a time, in order: views of where the
        set is (`tfmq.devices.on_device` moves a batch where the model runs when it is used)."""
        return [{"sample": self.samples[start : start + batch_size], "timestep": self.timesteps[start : start + batch_size],
                 **{key: value[start : start + batch_size] for key, value in self.conditions.items()}}
                for start in range(0, len(self), batch_size)]

    def check_made_for(self, unet: torch.nn.Module, sampler: SamplerConfig, guidance_scale: float = 1.0) -> None:
        """Refuse a set recorded for another model, sampler or guidance scale: its x_t are not the inputs this
        UNet sees at these timesteps, so it would calibrate the quantizers for the wrong activations."""
        from tfmq.quant.provenance import model_fingerprint  # provenance imports modules that import this one

        recorded = self.provenance
        if recorded is None:
            raise TfmqError("the calibration set records no model, sampler or guidance (made by an older tfmq): "
                            "collect it again")
        if recorded.sampler.describe() != sampler.describe():
            raise TfmqError(f"calibration set was recorded with {recorded.sampler.describe()}, "
                            f"not {sampler.describe()}")
        if recorded.guidance_scale != guidance_scale:
            raise TfmqError(f"calibration set was recorded with guidance scale {recorded.guidance_scale:g}, "
                            f"not {guidance_scale:g}")
        fingerprint = model_fingerprint(unet)
        if recorded.model_fingerprint != fingerprint:
            raise TfmqError(f"calibration set was recorded with another model (fingerprint "
                            f"{recorded.model_fingerprint[:12]}, not {fingerprint[:12]})")

    def _saved_form(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {"samples": self.samples, "timesteps": self.timesteps, "step_indices": self.step_indices,
                   "schedule": self.schedule,
                   **{CONDITION_PREFIX + key: value for key, value in self.conditions.items()}}
        tensors = {key: value.contiguous() for key, value in tensors.items()}
        metadata = {"interval_length": str(self.interval_length)}
        if self.provenance is not None:
            metadata["provenance"] = json.dumps(self.provenance.to_dict(), sort_keys=True)
        return tensors, metadata

    def identity(self) -> str:
        """SHA-256 of the set's tensors and provenance without what was measured (the seconds recording
        took): the same for the same data recorded again, as a rerun of an interrupted command records it."""
        tensors, metadata = self._saved_form()
        if self.provenance is not None:
            metadata["provenance"] = json.dumps({**self.provenance.to_dict(), "collect_seconds": None}, sort_keys=True)
        return _digest(tensors, metadata)

    def save(self, path: str | Path) -> None:
        """Write the set atomically (its folder made if missing), with its provenance and their digest."""
        tensors, metadata = self._saved_form()
        metadata.update(digest=_digest(tensors, metadata), written_by=WRITTEN_BY)

        write_bytes_atomic(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))

    @classmethod
    def load(cls, path: str | Path) -> CalibrationSet:
        """A saved set; one whose tensors or provenance changed since tfmq wrote it is refused."""
        from safetensors import safe_open

        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
            conditions = {key[len(CONDITION_PREFIX):]: value for key, value in tensors.items()
                          if key.startswith(CONDITION_PREFIX)}
            recorded = metadata.get("provenance")
            calibration = cls(tensors["samples"], tensors["timesteps"], tensors["step_indices"], tensors["schedule"],
                              int(metadata.get("interval_length", 1)), conditions,
                              None if recorded is None else CalibrationProvenance.from_dict(json.loads(recorded)),
                              loaded_from=str(path))
        except Exception as exc:  # missing keys, corrupt or foreign files
            raise TfmqError(f"cannot read calibration data {path}: {str(exc).splitlines()[0]}") from exc
        digest = metadata.get("digest")
        if (digest is None and recorded is not None) or (digest is not None and digest != _digest(tensors, metadata)):
            raise TfmqError(f"calibration data {path} fails its digest check: it was changed after tfmq wrote it")
        return calibration


def spread(indices: torch.Tensor, count: int) -> torch.Tensor:
    """At most `count` of `indices`, evenly spaced: a guided set records each batch's unconditional branch
    before its conditional one, so the first rows of a step would all be of one branch (and, for a
    class-conditional model, of the null label)."""
    if len(indices) <= count:
        return indices
    return indices[torch.linspace(0, len(indices) - 1, count, device=indices.device).round().long()]


def _digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 of every tensor (name, dtype, shape, bytes) and of the metadata that says what they are."""
    digest = hashlib.sha256(json.dumps({key: metadata.get(key) for key in DIGESTED_METADATA}).encode())
    for name, tensor in sorted(tensors.items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class _RecordedRows:
    """Rows of named tensors in the order a sampler's observer hands them over: in memory, or, once they
    would exceed `budget_bytes`, in chunks spilled to disk (never more than half the budget held)."""

    def __init__(self, budget_bytes: float | None, directory: str | Path | None) -> None:
        self.budget_bytes = budget_bytes
        self.directory = directory
        self.held: list[dict[str, torch.Tensor]] = []
        self.held_bytes = 0
        self.chunks: list[dict[str, torch.Tensor]] = []
        self.staging: SpillFolder | None = None

    def append(self, rows: dict[str, torch.Tensor]) -> None:
        self.held.append(rows)
        self.held_bytes += sum(tensor.numel() * tensor.element_size() for tensor in rows.values())
        if self.budget_bytes is not None and self.held_bytes > self.budget_bytes / 2:
            self._spill_held()

    def _spill_held(self) -> None:
        if not self.held:
            return
        if self.staging is None:
            self.staging = SpillFolder(CALIBRATION_SPILL_PREFIX, self.directory)
        chunk = {key: self.staging.empty((sum(len(rows[key]) for rows in self.held), *tensor.shape[1:]), tensor.dtype)
                 for key, tensor in self.held[0].items()}
        start = 0
        for rows in self.held:
            for key, tensor in rows.items():
                chunk[key][start : start + len(tensor)] = tensor
            start += len(next(iter(rows.values())))
        self.chunks.append(chunk)
        self.held, self.held_bytes = [], 0

    def joined(self) -> dict[str, torch.Tensor]:
        """Every row in memory, in call order (what a process group gathers)."""
        if self.staging is not None:
            raise RuntimeError("rows spilled to disk are not gathered")
        return {} if not self.held else {key: torch.cat([rows[key] for rows in self.held]) for key in self.held[0]}

    def ordered(self, order: torch.Tensor) -> tuple[dict[str, torch.Tensor], SpillFolder | None]:
        """Row `k` of each tensor is the `order[k]`-th row appended; on disk (with its folder) if any row was
        spilled, moved there a chunk at a time."""
        if self.staging is None:
            return {key: value[order] for key, value in self.joined().items()}, None
        self._spill_held()
        folder = SpillFolder(CALIBRATION_SPILL_PREFIX, self.directory)
        destination = torch.empty_like(order)
        destination[order] = torch.arange(len(order))
        result = {key: folder.empty((len(order), *tensor.shape[1:]), tensor.dtype)
                  for key, tensor in self.chunks[0].items()}
        start = 0
        for chunk in self.chunks:
            count = len(next(iter(chunk.values())))
            for key, tensor in chunk.items():
                result[key][destination[start : start + count]] = tensor
            start += count
        self.chunks = []
        self.staging.close()
        return result, folder


def collect_calibration(
    unet: torch.nn.Module, scheduler: DDPMScheduler, num_samples: int = 64,
    config: SamplerConfig = SamplerConfig(), interval_length: int = 5, seed: int = 0, batch_size: int = 64,
    progress: bool = True, conditioning: Conditioning | None = None, memory_budget_mb: float | None = None,
    spill_dir: str | Path | None = None,
) -> CalibrationSet:
    """Run the full-precision sampler from `num_samples` seeds (with `conditioning`, one condition per
    trajectory) and keep the UNet input of every step, both branches when guided.

    Beyond `memory_budget_mb` the recorded rows go to memory-mapped files in a temporary folder under
    `spill_dir` (the system's by default), which the set and its subsets then read from.

    Under a process group each rank samples its share of the trajectories and every rank gets the whole
    set, the same bits as one process records; the shares are gathered in memory (no budget)."""
    from tfmq.quant.provenance import model_fingerprint  # provenance imports modules that import this one

    check_count("number of calibration samples", num_samples)
    check_count("interval_length", interval_length)
    check_count("seed", seed, minimum=0)
    fingerprint = model_fingerprint(unet)
    distributed.check_same_on_all_ranks(fingerprint, "the model")
    started = time.perf_counter()
    budget_bytes = None if memory_budget_mb is None or distributed.is_active() else memory_budget_mb * 2**20
    rows = _RecordedRows(budget_bytes, spill_dir)
    steps: list[torch.Tensor] = []
    schedule = torch.as_tensor(distinct_timesteps(sampling_timesteps(scheduler, config)), device="cpu")
    position = {int(t): index for index, t in enumerate(schedule.tolist())}

    def record(step_index: int, t: int, x: torch.Tensor, conditions: dict[str, torch.Tensor]) -> None:
        # kept in host memory, as the UNet saw them (its dtype): batches go to the model's device when used
        steps.append(torch.full((len(x),), position[t], device="cpu"))
        rows.append({"samples": x.to("cpu", copy=True),
                     **{CONDITION_PREFIX + key: value.to("cpu", copy=True) for key, value in conditions.items()}})

    sample(unet, scheduler, num_samples, CALIBRATION_SEED_OFFSET + seed, config, batch_size, progress,
           observer=record, conditioning=conditioning)
    step_indices = torch.cat(steps) if steps else torch.empty(0, dtype=torch.long)
    if distributed.is_active():
        # this rank's rows, in the order of its UNet calls; the ranks' rows in rank order are one process's
        gathered = distributed.gather_rows({} if not steps else {"step_indices": step_indices, **rows.joined()})
        step_indices = gathered.pop("step_indices")
        order = torch.argsort(step_indices, stable=True)  # grouped by step, trajectories in seed order
        recorded, folder = {key: value[order] for key, value in gathered.items()}, None
    else:
        order = torch.argsort(step_indices, stable=True)
        recorded, folder = rows.ordered(order)
    samples = recorded.pop("samples")
    conditions = {key[len(CONDITION_PREFIX):]: value for key, value in recorded.items()}
    provenance = CalibrationProvenance(fingerprint, config, num_samples, seed,
                                       1.0 if conditioning is None else conditioning.guidance_scale,
                                       round(time.perf_counter() - started, 2))
    return CalibrationSet(samples, schedule[step_indices][order], step_indices[order], schedule,
                          interval_length, conditions, provenance, spill=folder)
