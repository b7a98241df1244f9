"""Timing of single UNet steps across engines (torch, onnxruntime), measured in one process and run, so
that their ratios hold on a noisy machine."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from tfmq.denoiser import denoiser_inputs
from tfmq.devices import module_device, module_dtype

# An engine: anything called like a diffusers UNet or transformer with keyword inputs.
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
                device, dtype = module_device(engine), module_dtype(engine)
                engine_inputs = {key: value.to(device, dtype if value.is_floating_point() else value.dtype)
                                 if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}
                engine_inputs = denoiser_inputs(engine, engine_inputs)
                engine(**engine_inputs)
                for _ in range(repeats):
                    started = time.perf_counter()
                    engine(**engine_inputs)
                    if device.type == "cuda":  # the call returns once queued: wait for the kernels
                        torch.cuda.synchronize(device)
                    timings[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}


def time_engines(model: Any, engines: Mapping[str, Engine], batches: Sequence[int],
                 repeats: int) -> tuple[int, list[dict[str, Any]]]:
    """One step of `model` (a `DiffusionModel`) as sampling calls it, timed on every engine at each batch size:
    the timestep (the middle of an integer engine's schedule, else 500) and a row per engine and batch, with its
    speedup over the engine named "torch fp32"."""
    schedules = [engine.rows.schedule for engine in engines.values() if getattr(engine, "rows", None) is not None]
    timestep = int(schedules[0][len(schedules[0]) // 2]) if schedules else 500
    config = model.unet.config
    # a calibration prompt's conditional branch, for a conditional model
    conditioning = model.conditioning(1, prompts=model.calibration_prompts())
    rows = []
    for batch in batches:
        inputs = {"sample": torch.randn(batch, config.in_channels, config.sample_size, config.sample_size),
                  "timestep": torch.full((batch,), timestep)}
        if conditioning is not None:
            inputs.update({key: value[:1].expand(batch, *value.shape[1:]) for key, value in
                           conditioning.per_image.items()})
        seconds = time_steps(engines, inputs, repeats)
        rows += [{"engine": name, "batch": batch, "ms_per_step": value * 1000,
                  "speedup_vs_torch_fp32": seconds["torch fp32"] / value} for name, value in seconds.items()]
    return timestep, rows
