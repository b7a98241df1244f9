"""Seeded sampling: DDIM (uniform / quadratic skip, any eta), DDPM, PLMS, DPM-Solver; guidance."""

from tfmq.sampling.guidance import Conditioning
from tfmq.sampling.sampler import (
    SamplerConfig,
    check_sample,
    distinct_timesteps,
    sample,
    sample_batch,
    sampling_timesteps,
)
from tfmq.sampling.schedule import timestep_schedule

__all__ = ["Conditioning", "SamplerConfig", "check_sample", "distinct_timesteps", "sample", "sample_batch",
           "sampling_timesteps", "timestep_schedule"]
