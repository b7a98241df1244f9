"""Seeded sampling: DDIM (uniform / quadratic skip, any eta) and DDPM ancestral."""

from tfmq.sampling.sampler import SamplerConfig, sample, sample_batch, sampling_timesteps
from tfmq.sampling.schedule import timestep_schedule

__all__ = ["SamplerConfig", "sample", "sample_batch", "sampling_timesteps", "timestep_schedule"]
