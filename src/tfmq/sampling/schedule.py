"""Which timesteps a sampler visits: uniform or quadratic skipping, as in the DDIM paper."""

from __future__ import annotations

import numpy as np

from tfmq.errors import TfmqError

SKIP_TYPES = ("uniform", "quad")


def timestep_schedule(num_train_timesteps: int, steps: int, skip_type: str = "quad") -> np.ndarray:
    """Descending, distinct training-timestep indices visited by a `steps`-step sampler.

    `uniform` takes every (T // steps)-th timestep from 0; `quad` spaces them quadratically up to 0.8 T,
    so that more steps fall near t = 0 where images get their detail. The DDIM paper's quadratic list
    repeats small timesteps (0, 0, 0, 0, 1, ... at 100 steps): repeated steps are no-op UNet calls and
    make per-timestep tables ambiguous, so here each repeat moves up to the next free timestep.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise TfmqError(f"steps must be between 1 and {num_train_timesteps}, got {steps}")
    if skip_type == "uniform":
        ascending = np.arange(0, num_train_timesteps, num_train_timesteps // steps)[:steps]
    elif skip_type == "quad":
        ascending = (np.linspace(0, np.sqrt(num_train_timesteps * 0.8), steps) ** 2).astype(np.int64)
        for index in range(1, steps):
            ascending[index] = max(ascending[index], ascending[index - 1] + 1)
        if ascending[-1] >= num_train_timesteps:
            raise TfmqError(f"quadratic skipping cannot place {steps} distinct steps; use --skip-type uniform")
    else:
        raise TfmqError(f"unknown skip type {skip_type!r}; use one of {', '.join(SKIP_TYPES)}")
    return ascending[::-1].astype(np.int64).copy()
