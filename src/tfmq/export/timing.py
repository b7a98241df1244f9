"""Timing of single UNet steps across engines (torch, onnxruntime), measured in one process and run, so
that their ratios hold on a noisy machine."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Mapping

import torch

# An engine: anything called like a diffusers UNet with keyword inputs.
Engine = Callable[..., object]


def time_steps(engines: Mapping[str, Engine], inputs: Mapping[str, object], repeats: int,
               rounds: int = 3) -> dict[str, float]:
    """Median seconds per call of every engine on `inputs`: `rounds` rounds, each a block of `repeats` calls
    per engine after a warm-up call. Blocks, not single interleaved calls: onnxruntime's worker threads spin a
    while after each call and would slow whichever engine runs next."""
    if repeats < 1 or rounds < 1:
        raise ValueError(f"repeats and rounds must be positive, got {repeats} and {rounds}")
    timings: dict[str, list[float]] = defaultdict(list)
    with torch.no_grad():
        for _ in range(rounds):
            for name, engine in engines.items():
                engine(**inputs)
                for _ in range(repeats):
                    started = time.perf_counter()
                    engine(**inputs)
                    timings[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}
