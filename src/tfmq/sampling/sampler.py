"""Batched, seeded sampling loops (DDIM, DDPM, PLMS, DPM-Solver) over any denoiser with the diffusers UNet
call signature, with conditioning, classifier-free guidance and a latent decoder where the model has them."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
from tqdm import tqdm

from tfmq import distributed
from tfmq.denoiser import denoiser_call, predicted_noise
from tfmq.devices import module_device, module_dtype
from tfmq.errors import TfmqError
from tfmq.sampling.guidance import Conditioning
from tfmq.sampling.noise import draw, image_generators
from tfmq.sampling.schedule import SKIP_TYPES, timestep_schedule
from tfmq.sampling.validation import check_count, check_number

SAMPLERS = ("ddim", "ddpm", "plms", "dpm-solver")
# Called before every UNet evaluation with (step index, timestep, UNet sample input, UNet keyword inputs);
# calibration records through it. With guidance the inputs are the doubled (unconditional, conditional) batch.
StepObserver = Callable[[int, int, torch.Tensor, dict[str, torch.Tensor]], None]
# Turns the sampler's final x_0 into images in [-1, 1]: a latent model's decoder.
Decoder = Callable[[torch.Tensor], torch.Tensor]
MEMINFO = Path("/proc/meminfo")


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
        check_count("steps", self.steps)
        check_number("eta", self.eta, minimum=0)
        if self.skip_type not in SKIP_TYPES:
            raise TfmqError(f"unknown skip type {self.skip_type!r}; use one of {', '.join(SKIP_TYPES)}")

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """What decides the trajectories, in words: eta and skip type only for DDIM, the others ignore them."""
        if self.name == "ddim":
            return f"ddim {self.steps} steps (eta {self.eta!r}, {self.skip_type} skip)"
        return f"{self.name} {self.steps} steps"


def _diffusers_sampler(scheduler: DDPMScheduler, config: SamplerConfig):
    """A fresh diffusers scheduler for DDPM, PLMS or DPM-Solver, set to `config.steps` (they keep state).

    Refused before diffusers sees it: a step count beyond the training timesteps (DDPM raises, PLMS quietly
    visits t = 0 over and over), and one whose schedule repeats or leaves the training timesteps.
    """
    total = scheduler.config.num_train_timesteps
    if not 1 <= config.steps <= total:
        raise TfmqError(f"steps must be between 1 and {total} (the model's training timesteps) for "
                        f"{config.name}, got {config.steps}")
    if config.name == "ddpm":
        sampler = copy.deepcopy(scheduler)
    elif config.name == "plms":
        sampler = PNDMScheduler.from_config(scheduler.config, skip_prk_steps=True)
    else:
        sampler = DPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type="dpmsolver++",
                                                          solver_order=2)
    sampler.set_timesteps(config.steps)
    visited = _visited(sampler)
    outside = visited[(visited < 0) | (visited >= total)]
    if len(outside):
        raise TfmqError(f"{config.describe()} visits timestep {int(outside[0])}, outside this model's 0..{total - 1} "
                        "(its scheduler's steps_offset); use fewer steps")
    distinct = len(distinct_timesteps(visited))
    if distinct != config.steps:
        raise TfmqError(f"{config.describe()} visits only {distinct} distinct timesteps on this model's "
                        f"{total}; use fewer steps")
    return sampler


def sampling_timesteps(scheduler: DDPMScheduler, config: SamplerConfig) -> np.ndarray:
    """The timesteps the sampler calls the UNet at, in order (PLMS calls one of them twice): calibration and
    per-timestep tables use exactly these. A TfmqError if `scheduler` cannot serve `config`: call it to check
    a sampler before any model work."""
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
    alpha_prev = alphas_cumprod[t_prev] if t_prev >= 0 else alphas_cumprod.new_tensor(1.0)
    x0 = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        x0 = x0.clamp(-limit, limit)
    sigma = eta * ((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)).sqrt()
    x_prev = alpha_prev.sqrt() * x0 + (1 - alpha_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0:
        x_prev = x_prev + sigma * draw(generators, tuple(x.shape[1:])).to(x.device)
    return x_prev


@torch.no_grad()
def sample_batch(
    unet: torch.nn.Module, scheduler: DDPMScheduler, config: SamplerConfig, seed: int, indices: range,
    observer: StepObserver | None = None, conditioning: Conditioning | None = None, decoder: Decoder | None = None,
) -> torch.Tensor:
    """Sample images `indices` of `seed` (with `conditioning` of these images); returns images in [-1, 1]."""
    generators = image_generators(seed, indices)
    device, dtype = module_device(unet), module_dtype(unet)
    x = draw(generators, _sample_shape(unet)).to(device)  # the sampler's state stays float32
    conditioning = (conditioning or Conditioning({})).to(device, dtype)
    stepper = None if config.name == "ddim" else _diffusers_sampler(scheduler, config)
    timesteps = sampling_timesteps(scheduler, config) if stepper is None else _visited(stepper)
    for step_index, t in enumerate(timesteps.tolist()):
        sample_input, kwargs = conditioning.unet_inputs(x.to(dtype))
        if observer is not None:
            observer(step_index, t, sample_input, kwargs)
        timestep = torch.full((len(sample_input),), t, dtype=torch.long, device=device)
        output = denoiser_call(unet, {"sample": sample_input, "timestep": timestep, **kwargs})
        eps = conditioning.combine(predicted_noise(unet, output)).float()
        if stepper is not None:
            extra = {"generator": generators} if config.name == "ddpm" else {}
            x = stepper.step(eps, t, x, **extra).prev_sample
        else:
            t_prev = int(timesteps[step_index + 1]) if step_index + 1 < len(timesteps) else -1
            x = _ddim_step(scheduler, x, eps, t, t_prev, config.eta, generators)
    if decoder is not None:
        x = decoder(x)
    return x.clamp(-1.0, 1.0).float().cpu()


def _sample_shape(unet: torch.nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of what the sampler denoises: the images, or a latent model's latents."""
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    return unet.config.in_channels, height, width


def _available_memory() -> int | None:
    """Bytes the system can still hand out: Linux's MemAvailable, else free physical pages, else unknown."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _size(num_bytes: float) -> str:
    """Bytes in the largest unit (up to TB) that keeps three significant figures readable."""
    units = ("bytes", "kB", "MB", "GB", "TB")
    power = min(int(math.log10(max(num_bytes, 1)) // 3), len(units) - 1)
    value = num_bytes / 1000**power
    return f"{value:.3g} {units[power]}" if value < 1000 else f"{value:,.0f} {units[power]}"


def _check_memory(num_images: int, image_shape: tuple[int, ...]) -> None:
    """Refuse a result that cannot fit in memory before sampling for hours towards it."""
    needed = num_images * math.prod(image_shape) * 4
    available = _available_memory()
    if available is not None and needed > available:
        shape = "x".join(str(size) for size in image_shape)
        raise TfmqError(f"{num_images} images of {shape} need {_size(needed)} of memory, but only {_size(available)} "
                        "is available; sample fewer images per run")


def check_sample(
    unet: torch.nn.Module, scheduler: DDPMScheduler, num_images: int, seed: int = 0,
    config: SamplerConfig = SamplerConfig(), batch_size: int = 64,
) -> None:
    """Every check `sample` makes before its first UNet call (counts, seed, the step count the scheduler can
    serve, memory for the result), for callers with costly work before sampling, such as encoding one
    prompt per image."""
    check_count("number of images", num_images)
    check_count("batch size", batch_size)
    check_count("seed", seed, minimum=0)
    sampling_timesteps(scheduler, config)
    _check_memory(num_images, _sample_shape(unet))


def sample(
    unet: torch.nn.Module, scheduler: DDPMScheduler, num_images: int, seed: int = 0,
    config: SamplerConfig = SamplerConfig(), batch_size: int = 64, progress: bool = True,
    observer: StepObserver | None = None, conditioning: Conditioning | None = None, decoder: Decoder | None = None,
) -> torch.Tensor:
    """Sample `num_images` images; image i depends only on (seed, i) and its condition, not on batch size.

    Under a process group (`tfmq.distributed`, every rank calling with the same arguments) each rank samples
    its share of the batches and every rank returns all the images: whole batches, so each image is computed
    as one process computes it. `observer` then sees this rank's batches only.
    """
    check_sample(unet, scheduler, num_images, seed, config, batch_size)
    if conditioning is not None and conditioning.per_image and len(conditioning) != num_images:
        raise TfmqError(f"{len(conditioning)} conditions for {num_images} images: give one per image")
    distributed.check_same_on_all_ranks({"num_images": num_images, "seed": seed, "sampler": config.to_dict(),
                                         "batch_size": batch_size}, "the images to sample")
    shape = _sample_shape(unet)
    batches = [range(start, min(start + batch_size, num_images)) for start in range(0, num_images, batch_size)]
    share = distributed.shard(len(batches))
    mine = batches[share.start:share.stop]
    images = None
    for indices in tqdm(mine, desc=f"{config.name} {config.steps} steps", unit="batch", disable=not progress):
        batch_conditioning = None if conditioning is None else conditioning.of_images(indices)
        batch = sample_batch(unet, scheduler, config, seed, indices, observer, batch_conditioning, decoder)
        if images is None:
            if batch.shape[1:] != shape:  # a decoder's images can be larger than its latents
                _check_memory(num_images, tuple(batch.shape[1:]))
            rows = sum(len(each) for each in mine)
            images = torch.empty((rows, *batch.shape[1:]), dtype=batch.dtype, device=batch.device)
        start = indices.start - mine[0].start
        images[start:start + len(indices)] = batch
    return distributed.gather_rows({} if images is None else {"images": images})["images"]
