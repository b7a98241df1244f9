"""Calibration data from the full-precision model's own sampling trajectories (no training data).

Every sampling step of N seeded trajectories is recorded as (x_t, t, step index). Activation calibration
uses every step; weight reconstruction thins them to every `interval_length`-th step, as in the paper's
scripts. The paper's scripts draw fresh trajectories per step; here the N trajectories are shared by all
steps, which gives each step the same marginal distribution for a hundredth of the UNet calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file

from tfmq.errors import TfmqError
from tfmq.sampling import Conditioning, SamplerConfig, distinct_timesteps, sample, sampling_timesteps

CALIBRATION_SEED_OFFSET = 1_000_000  # calibration seeds never coincide with evaluation seeds 0, 1, 2, ...
CONDITION_PREFIX = "condition."  # conditions' keys in a saved set


@dataclass
class CalibrationSet:
    """UNet inputs recorded along sampling trajectories, with the schedule they were recorded on.

    `conditions` holds the UNet's other keyword inputs per sample (class_labels, encoder_hidden_states);
    with guidance the unconditional and conditional branch of a step are both recorded, as the UNet saw them.
    """

    samples: torch.Tensor       # x_t, (N, C, H, W)
    timesteps: torch.Tensor     # t of each sample, (N,)
    step_indices: torch.Tensor  # position of t in `schedule`, (N,)
    schedule: torch.Tensor      # the distinct timesteps the sampler visits, in order
    interval_length: int = 1
    conditions: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def _subset(self, keep: torch.Tensor) -> CalibrationSet:
        return CalibrationSet(self.samples[keep], self.timesteps[keep], self.step_indices[keep], self.schedule,
                              self.interval_length, {key: value[keep] for key, value in self.conditions.items()})

    def at_steps(self, step_indices: torch.Tensor | list[int]) -> CalibrationSet:
        return self._subset(torch.isin(self.step_indices, torch.as_tensor(step_indices)))

    def for_weights(self) -> CalibrationSet:
        """Every `interval_length`-th sampling step: the data of weight reconstruction."""
        return self.at_steps(list(range(0, len(self.schedule), self.interval_length)))

    def per_step(self, count: int) -> CalibrationSet:
        """At most `count` samples of every sampling step (the first trajectories): a balanced subset."""
        keep = torch.zeros(len(self), dtype=torch.bool)
        for step in self.step_indices.unique():
            keep[(self.step_indices == step).nonzero().flatten()[:count]] = True
        return self._subset(keep)

    def inputs(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """UNet keyword inputs of samples `indices`."""
        return {"sample": self.samples[indices], "timestep": self.timesteps[indices],
                **{key: value[indices] for key, value in self.conditions.items()}}

    def timestep_groups(self) -> Iterator[dict[str, torch.Tensor]]:
        """UNet keyword inputs of one timestep at a time: how a sampler calls the UNet, and all that a model
        with per-timestep tables accepts."""
        for timestep in self.timesteps.unique():
            yield self.inputs((self.timesteps == timestep).nonzero().flatten())

    def batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """The whole set as UNet keyword inputs, `batch_size` samples at a time, in order."""
        return [self.inputs(chunk) for chunk in torch.arange(len(self)).split(batch_size)]

    def save(self, path: str | Path) -> None:
        tensors = {"samples": self.samples, "timesteps": self.timesteps, "step_indices": self.step_indices,
                   "schedule": self.schedule,
                   **{CONDITION_PREFIX + key: value for key, value in self.conditions.items()}}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"interval_length": str(self.interval_length)})

    @classmethod
    def load(cls, path: str | Path) -> CalibrationSet:
        from safetensors import safe_open

        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as handle:
                interval = int((handle.metadata() or {}).get("interval_length", 1))
            conditions = {key[len(CONDITION_PREFIX):]: value for key, value in tensors.items()
                          if key.startswith(CONDITION_PREFIX)}
            return cls(tensors["samples"], tensors["timesteps"], tensors["step_indices"], tensors["schedule"],
                       interval, conditions)
        except Exception as exc:  # missing keys, corrupt or foreign files
            raise TfmqError(f"cannot read calibration data {path}: {str(exc).splitlines()[0]}") from exc


def collect_calibration(
    unet: torch.nn.Module, scheduler: DDPMScheduler, num_samples: int = 64,
    config: SamplerConfig = SamplerConfig(), interval_length: int = 5, seed: int = 0, batch_size: int = 64,
    progress: bool = True, conditioning: Conditioning | None = None,
) -> CalibrationSet:
    """Run the full-precision sampler from `num_samples` seeds (with `conditioning`, one condition per
    trajectory) and keep the UNet input of every step, both branches when guided."""
    if interval_length <= 0:
        raise TfmqError(f"interval_length must be positive, got {interval_length}")
    records: list[tuple[int, torch.Tensor, dict[str, torch.Tensor]]] = []
    schedule = torch.as_tensor(distinct_timesteps(sampling_timesteps(scheduler, config)))
    position = {int(t): index for index, t in enumerate(schedule.tolist())}

    def record(step_index: int, t: int, x: torch.Tensor, conditions: dict[str, torch.Tensor]) -> None:
        records.append((position[t], x.clone(), {key: value.clone() for key, value in conditions.items()}))

    sample(unet, scheduler, num_samples, CALIBRATION_SEED_OFFSET + seed, config, batch_size, progress,
           observer=record, conditioning=conditioning)
    samples = torch.cat([x for _, x, _ in records])
    step_indices = torch.cat([torch.full((len(x),), index) for index, x, _ in records])
    order = torch.argsort(step_indices, stable=True)  # grouped by step, trajectories in seed order
    conditions = {key: torch.cat([kwargs[key] for _, _, kwargs in records])[order] for key in records[0][2]}
    return CalibrationSet(samples[order], schedule[step_indices][order], step_indices[order], schedule,
                          interval_length, conditions)
