"""Batched, seeded DDIM and DDPM sampling loops over any denoiser with the diffusers UNet call signature."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler
from tqdm import tqdm

from tfmq.errors import TfmqError
from tfmq.sampling.noise import draw, image_generators
from tfmq.sampling.schedule import SKIP_TYPES, timestep_schedule

SAMPLERS = ("ddim", "ddpm")
# Called before every UNet evaluation with (step index, timestep, x_t); calibration records through it.
StepObserver = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample: DDIM (eta, skip type) or DDPM ancestral, and how many steps."""

    name: str = "ddim"
    steps: int = 100
    eta: float = 0.0
    skip_type: str = "quad"

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise TfmqError(f"unknown sampler {self.name!r}; use one of {', '.join(SAMPLERS)}")
        if self.steps <= 0:
            raise TfmqError(f"steps must be positive, got {self.steps}")
        if self.eta < 0:
            raise TfmqError(f"eta must be >= 0, got {self.eta}")
        if self.skip_type not in SKIP_TYPES:
            raise TfmqError(f"unknown skip type {self.skip_type!r}; use one of {', '.join(SKIP_TYPES)}")

    def to_dict(self) -> dict:
        return asdict(self)


def sampling_timesteps(scheduler: DDPMScheduler, config: SamplerConfig) -> np.ndarray:
    """The descending timesteps the sampler will visit: calibration and per-timestep tables use exactly these."""
    if config.name == "ddim":
        return timestep_schedule(scheduler.config.num_train_timesteps, config.steps, config.skip_type)
    ddpm = copy.deepcopy(scheduler)
    ddpm.set_timesteps(config.steps)
    return ddpm.timesteps.numpy().astype(np.int64)


def _ddim_step(
    scheduler: DDPMScheduler, x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, eta: float,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """One step of the DDIM update (Song et al. 2021, eq. 12) between two arbitrary timesteps."""
    alphas_cumprod = scheduler.alphas_cumprod
    alpha = alphas_cumprod[t]
    alpha_prev = alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0)
    x0 = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        x0 = x0.clamp(-limit, limit)
    sigma = eta * ((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)).sqrt()
    x_prev = alpha_prev.sqrt() * x0 + (1 - alpha_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0:
        x_prev = x_prev + sigma * draw(generators, tuple(x.shape[1:]))
    return x_prev


@torch.no_grad()
def sample_batch(
    unet: torch.nn.Module, scheduler: DDPMScheduler, config: SamplerConfig, seed: int, indices: range,
    observer: StepObserver | None = None,
) -> torch.Tensor:
    """Sample images `indices` of `seed`; returns x_0 in [-1, 1]."""
    unet_config = unet.config
    shape = (unet_config.in_channels, unet_config.sample_size, unet_config.sample_size)
    generators = image_generators(seed, indices)
    x = draw(generators, shape)
    timesteps = sampling_timesteps(scheduler, config)
    ddpm = None
    if config.name == "ddpm":
        ddpm = copy.deepcopy(scheduler)
        ddpm.set_timesteps(config.steps)
    for step_index, t in enumerate(timesteps.tolist()):
        if observer is not None:
            observer(step_index, t, x)
        eps = unet(x, torch.full((len(x),), t, dtype=torch.long)).sample
        if ddpm is not None:
            x = ddpm.step(eps, t, x, generator=generators).prev_sample
        else:
            t_prev = int(timesteps[step_index + 1]) if step_index + 1 < len(timesteps) else -1
            x = _ddim_step(scheduler, x, eps, t, t_prev, config.eta, generators)
    return x.clamp(-1.0, 1.0)


def sample(
    unet: torch.nn.Module, scheduler: DDPMScheduler, num_images: int, seed: int = 0,
    config: SamplerConfig = SamplerConfig(), batch_size: int = 64, progress: bool = True,
    observer: StepObserver | None = None,
) -> torch.Tensor:
    """Sample `num_images` images; image i depends only on (seed, i), not on batch size."""
    if num_images <= 0:
        raise TfmqError(f"number of images must be positive, got {num_images}")
    if batch_size <= 0:
        raise TfmqError(f"batch size must be positive, got {batch_size}")
    batches = [range(start, min(start + batch_size, num_images)) for start in range(0, num_images, batch_size)]
    images = []
    for indices in tqdm(batches, desc=f"{config.name} {config.steps} steps", unit="batch", disable=not progress):
        images.append(sample_batch(unet, scheduler, config, seed, indices, observer))
    return torch.cat(images)
