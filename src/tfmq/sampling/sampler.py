"""Batched, seeded sampling loops (DDIM, DDPM, PLMS, DPM-Solver) over any denoiser with the diffusers UNet
call signature, with conditioning, classifier-free guidance and a latent decoder where the model has them."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
from tqdm import tqdm

from tfmq.errors import TfmqError
from tfmq.sampling.guidance import Conditioning
from tfmq.sampling.noise import draw, image_generators
from tfmq.sampling.schedule import SKIP_TYPES, timestep_schedule

SAMPLERS = ("ddim", "ddpm", "plms", "dpm-solver")
# Called before every UNet evaluation with (step index, timestep, UNet sample input, UNet keyword inputs);
# calibration records through it. With guidance the inputs are the doubled (unconditional, conditional) batch.
StepObserver = Callable[[int, int, torch.Tensor, dict[str, torch.Tensor]], None]
# Turns the sampler's final x_0 into images in [-1, 1]: a latent model's decoder.
Decoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample: DDIM (eta, skip type), DDPM ancestral, PLMS (Stable Diffusion's sampler in the paper)
    or DPM-Solver++ (2nd order), and how many steps. eta and skip type are DDIM's; the others take the
    timestep spacing of the model's scheduler config."""

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


def _diffusers_sampler(scheduler: DDPMScheduler, config: SamplerConfig):
    """A fresh diffusers scheduler for DDPM, PLMS or DPM-Solver, set to `config.steps` (they keep state)."""
    if config.name == "ddpm":
        sampler = copy.deepcopy(scheduler)
    elif config.name == "plms":
        sampler = PNDMScheduler.from_config(scheduler.config, skip_prk_steps=True)
    else:
        sampler = DPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type="dpmsolver++",
                                                          solver_order=2)
    sampler.set_timesteps(config.steps)
    return sampler


def sampling_timesteps(scheduler: DDPMScheduler, config: SamplerConfig) -> np.ndarray:
    """The timesteps the sampler calls the UNet at, in order (PLMS calls one of them twice): calibration and
    per-timestep tables use exactly these."""
    if config.name == "ddim":
        return timestep_schedule(scheduler.config.num_train_timesteps, config.steps, config.skip_type)
    return _visited(_diffusers_sampler(scheduler, config))


def _visited(stepper) -> np.ndarray:
    """The timesteps a set diffusers scheduler calls the UNet at."""
    return stepper.timesteps.numpy().astype(np.int64)


def distinct_timesteps(timesteps: np.ndarray | list[int]) -> np.ndarray:
    """`timesteps` without repeats, in order of first visit: one table row per timestep the UNet sees."""
    values = np.asarray(timesteps, dtype=np.int64)
    _, first = np.unique(values, return_index=True)
    return values[np.sort(first)]


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
    observer: StepObserver | None = None, conditioning: Conditioning | None = None, decoder: Decoder | None = None,
) -> torch.Tensor:
    """Sample images `indices` of `seed` (with `conditioning` of these images); returns images in [-1, 1]."""
    unet_config = unet.config
    shape = (unet_config.in_channels, unet_config.sample_size, unet_config.sample_size)
    generators = image_generators(seed, indices)
    x = draw(generators, shape)
    conditioning = conditioning or Conditioning({})
    stepper = None if config.name == "ddim" else _diffusers_sampler(scheduler, config)
    timesteps = sampling_timesteps(scheduler, config) if stepper is None else _visited(stepper)
    for step_index, t in enumerate(timesteps.tolist()):
        sample_input, kwargs = conditioning.unet_inputs(x)
        if observer is not None:
            observer(step_index, t, sample_input, kwargs)
        timestep = torch.full((len(sample_input),), t, dtype=torch.long)
        eps = conditioning.combine(unet(sample_input, timestep, **kwargs).sample)
        if stepper is not None:
            extra = {"generator": generators} if config.name == "ddpm" else {}
            x = stepper.step(eps, t, x, **extra).prev_sample
        else:
            t_prev = int(timesteps[step_index + 1]) if step_index + 1 < len(timesteps) else -1
            x = _ddim_step(scheduler, x, eps, t, t_prev, config.eta, generators)
    if decoder is not None:
        x = decoder(x)
    return x.clamp(-1.0, 1.0)


def sample(
    unet: torch.nn.Module, scheduler: DDPMScheduler, num_images: int, seed: int = 0,
    config: SamplerConfig = SamplerConfig(), batch_size: int = 64, progress: bool = True,
    observer: StepObserver | None = None, conditioning: Conditioning | None = None, decoder: Decoder | None = None,
) -> torch.Tensor:
    """Sample `num_images` images; image i depends only on (seed, i) and its condition, not on batch size."""
    if num_images <= 0:
        raise TfmqError(f"number of images must be positive, got {num_images}")
    if batch_size <= 0:
        raise TfmqError(f"batch size must be positive, got {batch_size}")
    if conditioning is not None and conditioning.per_image and len(conditioning) != num_images:
        raise TfmqError(f"{len(conditioning)} conditions for {num_images} images: give one per image")
    batches = [range(start, min(start + batch_size, num_images)) for start in range(0, num_images, batch_size)]
    images = []
    for indices in tqdm(batches, desc=f"{config.name} {config.steps} steps", unit="batch", disable=not progress):
        batch_conditioning = None if conditioning is None else conditioning.of_images(indices)
        images.append(sample_batch(unet, scheduler, config, seed, indices, observer, batch_conditioning, decoder))
    return torch.cat(images)
