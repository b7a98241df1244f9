"""Calibration data from the full-precision model's own sampling trajectories (no training data).

Every sampling step of N seeded trajectories is recorded as (x_t, t, step index). Activation calibration
uses every step; weight reconstruction thins them to every `interval_length`-th step, as in the paper's
scripts. The paper's scripts draw fresh trajectories per step; here the N trajectories are shared by all
steps, which gives each step the same marginal distribution for a hundredth of the UNet calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file

from tfmq.errors import TfmqError
from tfmq.sampling import SamplerConfig, sample, sampling_timesteps

CALIBRATION_SEED_OFFSET = 1_000_000  # calibration seeds never coincide with evaluation seeds 0, 1, 2, ...


@dataclass
class CalibrationSet:
    """UNet inputs recorded along sampling trajectories, with the schedule they were recorded on."""

    samples: torch.Tensor       # x_t, (N, C, H, W)
    timesteps: torch.Tensor     # t of each sample, (N,)
    step_indices: torch.Tensor  # position of t in `schedule`, (N,)
    schedule: torch.Tensor      # the sampler's descending timesteps
    interval_length: int = 1

    def __len__(self) -> int:
        return len(self.samples)

    def at_steps(self, step_indices: torch.Tensor | list[int]) -> CalibrationSet:
        keep = torch.isin(self.step_indices, torch.as_tensor(step_indices))
        return CalibrationSet(self.samples[keep], self.timesteps[keep], self.step_indices[keep], self.schedule,
                              self.interval_length)

    def for_weights(self) -> CalibrationSet:
        """Every `interval_length`-th sampling step: the data of weight reconstruction."""
        return self.at_steps(list(range(0, len(self.schedule), self.interval_length)))

    def per_step(self, count: int) -> CalibrationSet:
        """At most `count` samples of every sampling step (the first trajectories): a balanced subset."""
        keep = torch.zeros(len(self), dtype=torch.bool)
        for step in self.step_indices.unique():
            keep[(self.step_indices == step).nonzero().flatten()[:count]] = True
        return CalibrationSet(self.samples[keep], self.timesteps[keep], self.step_indices[keep], self.schedule,
                              self.interval_length)

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.samples.split(batch_size), self.timesteps.split(batch_size)))

    def save(self, path: str | Path) -> None:
        tensors = {"samples": self.samples, "timesteps": self.timesteps, "step_indices": self.step_indices,
                   "schedule": self.schedule}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"interval_length": str(self.interval_length)})

    @classmethod
    def load(cls, path: str | Path) -> CalibrationSet:
        from safetensors import safe_open

        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as handle:
                interval = int((handle.metadata() or {}).get("interval_length", 1))
            return cls(tensors["samples"], tensors["timesteps"], tensors["step_indices"], tensors["schedule"],
                       interval)
        except Exception as exc:  # missing keys, corrupt or foreign files
            raise TfmqError(f"cannot read calibration data {path}: {str(exc).splitlines()[0]}") from exc


def collect_calibration(
    unet: torch.nn.Module, scheduler: DDPMScheduler, num_samples: int = 64,
    config: SamplerConfig = SamplerConfig(), interval_length: int = 5, seed: int = 0, batch_size: int = 64,
    progress: bool = True,
) -> CalibrationSet:
    """Run the full-precision sampler from `num_samples` seeds and keep the UNet input of every step."""
    if interval_length <= 0:
        raise TfmqError(f"interval_length must be positive, got {interval_length}")
    records: list[tuple[int, int, torch.Tensor]] = []
    sample(unet, scheduler, num_samples, CALIBRATION_SEED_OFFSET + seed, config, batch_size, progress,
           observer=lambda step_index, t, x: records.append((step_index, t, x.clone())))
    schedule = torch.as_tensor(sampling_timesteps(scheduler, config))
    samples = torch.cat([x for _, _, x in records])
    timesteps = torch.cat([torch.full((len(x),), t) for _, t, x in records])
    step_indices = torch.cat([torch.full((len(x),), index) for index, _, x in records])
    order = torch.argsort(step_indices, stable=True)  # grouped by step, trajectories in seed order
    return CalibrationSet(samples[order], timesteps[order], step_indices[order], schedule, interval_length)
