"""Full-size UNets through tfmq: Stable Diffusion v1.4's UNet (its real config, random weights, nothing
downloaded) quantized to W4A8 by RTN and by TFMQ, saved, exported to ONNX and run one step in onnxruntime.

    OMP_NUM_THREADS=2 python benchmarks/full_size.py                       # ~35 min on 2 shared cores
    OMP_NUM_THREADS=2 python benchmarks/full_size.py --rtn-weight-init mse  # + RTN's MSE range search (74 min)

Every phase runs in its own process, so its peak RSS (VmHWM) is its own:
- `fp`: build the UNet, count parameters and FLOPs (per unit, on the meta device, at --latent-size and at
  64x64), time one full-precision step (both guidance branches), write the calibration set: random latents of
  --trajectories trajectories on a --steps-step PLMS schedule, each step with a conditional and an
  unconditional branch of random 77x768 encoder states (no sampling: the weights are random anyway);
- `rtn`, `tfmq`: `tfmq.quantize` W4A8 and `tfmq.save_quantized`, with the time of wrapping (the weight-range
  search) and of observing the activation ranges. Both default to min-max weight ranges: the library's MSE
  search over 80 candidates takes over an hour on SD v1.4 here (`--rtn-weight-init mse` measures it). TFMQ runs --weight-iters AdaRound and
  --act-iters LSQ iterations a unit; per unit the benchmark also times the capture of its inputs and
  targets and its two optimisations, and records its cache's bytes (the provenance has only each unit's total
  seconds). The public API cannot reconstruct a subset of units: --max-units (0: all) is a patch of this
  script, the units left out keep their round-to-nearest weights;
- `export`: `tfmq.load_quantized` the TFMQ checkpoint, time one fake-quant torch step, `tfmq.export_onnx`;
- `onnxruntime`: `tfmq.OnnxUNet` on that graph, one step timed;
- `export-fp32`: the full-precision UNet as an ONNX graph, over protobuf's 2 GB (the check of what
  `export_onnx` does with a graph that size).
SDXL's UNet (`--models sdxl`) is counted on the meta device only: its phases' memory is estimated from SD
v1.4's measured peaks scaled by the parameter ratio, and a phase whose figure exceeds --memory-limit-gb is
skipped with it. A running phase that passes the limit is stopped and reported the same way.
A finished phase is kept in --work and not run again for the same settings.
Writes benchmarks/results/full_size.{json,md} (or --name).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from memory import peak_rss_mb  # this folder: scripts run as files

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_LATENT = 64  # SD v1.4 at 512x512 pixels
MB = 1e6

# CompVis/stable-diffusion-v1-4, unet/config.json (sample_size is replaced by --latent-size: the ONNX export
# traces at the config's sample size).
SD14_UNET: dict[str, Any] = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the keys that differ from diffusers' defaults).
SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "norm_eps": 1e-5,
    "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10], "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                                                   "UpBlock2D"],
    "use_linear_projection": True,
}
# SD v1.4's layout at a fraction of the width: a smoke test of this script in a minute.
TINY_UNET: dict[str, Any] = {**SD14_UNET, "block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 32}
CONFIGS = {"sd14": SD14_UNET, "sdxl": SDXL_UNET, "tiny": TINY_UNET}
TOKENS = 77
PHASES = ("fp", "rtn", "tfmq", "export", "onnxruntime", "export-fp32")
# A phase's peak RSS over the UNet's fp32 bytes, to refuse a phase before it starts; measured on SD v1.4 at
# 32x32 latents (results/full_size.json): 11.3 GB for 3.44 GB of weights in the quantizing phases.
PEAK_OVER_MODEL = {"fp": 1.2, "rtn": 3.5, "tfmq": 3.5, "export": 3.4, "onnxruntime": 1.3, "export-fp32": 3.4}
# How many fp32 copies of the UNet a phase holds at its peak (the original and its quantized twin; the export's
# twin; the traced graph): SDXL's estimate swaps SD v1.4's copies for its own and keeps the rest (activations,
# observers), which depends on the latent size, not the width. The onnxruntime phase holds only the graph: it
# scales with the parameters.
MODEL_COPIES = {"fp": 1, "rtn": 2, "tfmq": 2, "export": 2, "export-fp32": 2}


# ----------------------------------------------------------------------------------------------------
# Models and calibration data


def unet_config(name: str, latent_size: int) -> dict[str, Any]:
    return {**CONFIGS[name], "sample_size": latent_size}


def build_unet(name: str, latent_size: int, device: str = "cpu") -> torch.nn.Module:
    """The UNet of config `name` with random weights, the same in every process (seed 0): the checkpoint's
    fingerprint check then accepts the base model rebuilt by the export phase."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        return UNet2DConditionModel(**unet_config(name, latent_size)).eval()


def example_inputs(unet: torch.nn.Module, batch: int, latent_size: int, timestep: int = 500) -> dict[str, Any]:
    """One UNet call of `batch` samples (for SDXL its added text/time conditions too), on the UNet's device."""
    config, device = unet.config, next(unet.parameters()).device
    generator = torch.Generator().manual_seed(1)
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch, config.in_channels, latent_size, latent_size, generator=generator),
        "timestep": torch.full((batch,), timestep, dtype=torch.int64),
        "encoder_hidden_states": torch.randn(batch, TOKENS, config.cross_attention_dim, generator=generator),
    }
    if config.get("addition_embed_type") == "text_time":
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, generator=generator),
                                       "time_ids": torch.randn(batch, 6, generator=generator)}
    return _moved(inputs, device)


def _moved(value: Any, device: torch.device) -> Any:
    if isinstance(value, dict):
        return {key: _moved(item, device) for key, item in value.items()}
    return value.to(device) if torch.is_tensor(value) else value


def flops_per_module(name: str, latent_size: int) -> dict[str, float]:
    """{module name: forward FLOPs of one sample} ("" is the whole UNet), counted on the meta device.
    torch's FlopCounterMode counts matmuls, convolutions and attention, not elementwise work."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = build_unet(name, latent_size, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(**example_inputs(unet, 1, latent_size))
    flops = {}
    for module, counts in counter.get_flop_counts().items():
        if module == "Global":
            continue
        key = module.split(".", 1)[1] if "." in module else ""
        flops[key] = float(sum(counts.values()))
    return flops


def parameter_count(unet: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in unet.parameters())


def sampler_schedule(steps: int) -> torch.Tensor:
    """The distinct timesteps of Stable Diffusion's PLMS sampler at `steps` steps (its scheduler config)."""
    from diffusers import DDPMScheduler

    from tfmq.sampling import SamplerConfig, distinct_timesteps, sampling_timesteps

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", steps_offset=1, clip_sample=False)
    return torch.as_tensor(distinct_timesteps(sampling_timesteps(scheduler, SamplerConfig(name="plms", steps=steps))))


def random_calibration(trajectories: int, steps: int, latent_size: int, width: int, interval_length: int,
                       seed: int = 0):
    """A `CalibrationSet` as `collect_calibration` lays it out (grouped by step, trajectories in order), of
    random latents: per step and trajectory the unconditional and the conditional branch share x_t and differ
    in their encoder states (one random "empty prompt" for every unconditional branch)."""
    from tfmq.quant.calibration import CalibrationSet

    generator = torch.Generator().manual_seed(seed)
    schedule = sampler_schedule(steps)
    empty_prompt = torch.randn(TOKENS, width, generator=generator)
    prompts = torch.randn(trajectories, TOKENS, width, generator=generator)
    samples, states, step_indices = [], [], []
    for step in range(len(schedule)):
        for trajectory in range(trajectories):
            latent = torch.randn(4, latent_size, latent_size, generator=generator)
            samples += [latent, latent]
            states += [empty_prompt, prompts[trajectory]]
            step_indices += [step, step]
    step_indices_tensor = torch.as_tensor(step_indices, dtype=torch.int64)
    return CalibrationSet(torch.stack(samples), schedule[step_indices_tensor], step_indices_tensor, schedule,
                          interval_length, {"encoder_hidden_states": torch.stack(states)})


def tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def calibration_bytes(calibration) -> int:
    return tensor_bytes(iter([calibration.samples, calibration.timesteps, calibration.step_indices,
                              *calibration.conditions.values()]))


def folder_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status: memory figures need Linux")


def memory_guard(limit_gb: float) -> None:
    """Stop this process (exit 3, a JSON line saying why) once its RSS passes `limit_gb`: the machine has 24 GB
    shared with other work."""
    def watch() -> None:
        while True:
            rss = current_rss_mb()
            if rss > limit_gb * 1024:
                print(json.dumps({"skipped": f"stopped at {rss / 1024:.1f} GB RSS, over the {limit_gb:g} GB limit"}),
                      flush=True)
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------------
# Per-unit instrumentation of tfmq's reconstruction loop


class UnitProbe:
    """What the provenance does not say per unit: the seconds of capturing its inputs and targets, of AdaRound
    and of LSQ, its cache's bytes and per-sample tensor shapes, and the process's RSS after the capture.

    It wraps three functions of `tfmq.quant.methods.reconstruction` (a benchmark-only patch: `reconstruct`
    looks them up by name); `keep_units` keeps only some units of TFMQ's block list (`--max-units`)."""

    def __init__(self) -> None:
        self.units: dict[str, dict[str, Any]] = {}

    def install(self, max_units: int) -> None:
        from tfmq.quant.methods import reconstruction
        from tfmq.quant.methods import tfmq as tfmq_method

        capture, learn_rounding, learn_step_sizes = (reconstruction.capture, reconstruction._learn_rounding,
                                                     reconstruction._learn_step_sizes)

        def timed_capture(unit, *args, **kwargs):
            started = time.perf_counter()
            cache, templates = capture(unit, *args, **kwargs)
            one = cache.rows(torch.arange(1))
            self.units.setdefault(unit.name, {}).update(
                capture_s=time.perf_counter() - started,
                cache_bytes=tensor_bytes(iter(one.values())) * cache.num_samples,
                cache_shapes={key: [list(tensor.shape[1:]), tensor.element_size()] for key, tensor in one.items()},
                rss_after_capture_mb=current_rss_mb(), layers=len(unit.layers),
                weights=sum(layer.weight.numel() for layer in unit.layers))
            return cache, templates

        def timed(function: Callable, key: str) -> Callable:
            def run(data, settings, bar):
                started = time.perf_counter()
                function(data, settings, bar)
                self.units.setdefault(data.unit.name, {})[key] = time.perf_counter() - started
            return run

        reconstruction.capture = timed_capture
        reconstruction._learn_rounding = timed(learn_rounding, "adaround_s")
        reconstruction._learn_step_sizes = timed(learn_step_sizes, "lsq_s")
        if max_units:
            block_units = tfmq_method.block_units

            def kept_units(*args, **kwargs):
                units = block_units(*args, **kwargs)
                self.all_units = [unit.name for unit in units]
                if len(units) <= max_units:
                    return units
                # spread over the forward order, first and last included: every depth and kind of block
                picks = sorted({round(index * (len(units) - 1) / (max_units - 1)) for index in range(max_units)})
                return [units[index] for index in picks]

            tfmq_method.block_units = kept_units


# ----------------------------------------------------------------------------------------------------
# Phases (each in its own process)


def phase_fp(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    unet = build_unet(args.model, args.latent_size)
    result: dict[str, Any] = {"build_s": time.perf_counter() - started, "parameters": parameter_count(unet)}
    result["model_bytes"] = tensor_bytes(iter(unet.state_dict().values()))
    for size in sorted({args.latent_size, PAPER_LATENT}):
        result[f"flops_{size}"] = flops_per_module(args.model, size)
    inputs = example_inputs(unet, 2, args.latent_size)
    with torch.no_grad():
        result["fp_step_s"] = median_seconds(lambda: unet(**inputs), args.repeats)
    calibration = random_calibration(args.trajectories, args.steps, args.latent_size, unet.config.cross_attention_dim,
                                     args.interval_length)
    calibration.save(args.work / "calibration.safetensors")
    result.update(calibration_samples=len(calibration), text_width=unet.config.cross_attention_dim, weight_samples=len(calibration.for_weights()),
                  schedule=calibration.schedule.tolist(), calibration_bytes=calibration_bytes(calibration),
                  calibration_file_bytes=(args.work / "calibration.safetensors").stat().st_size)
    return result


def time_quantize_steps(seconds: dict[str, float]) -> None:
    """Record in `seconds` the time of the two steps every method starts with: wrapping (with the weight
    ranges' search) and observing the activation ranges (a benchmark-only patch of `tfmq.quant.api`)."""
    from tfmq.quant import api

    def timed(function: Callable, key: str) -> Callable:
        def run(*args, **kwargs):
            started = time.perf_counter()
            value = function(*args, **kwargs)
            seconds[key] = time.perf_counter() - started
            return value
        return run

    api.quantize_model = timed(api.quantize_model, "wrap_s")
    api.calibrate_activation_ranges = timed(api.calibrate_activation_ranges, "activation_ranges_s")


def _quantize_phase(args: argparse.Namespace, config, probe: UnitProbe | None) -> dict[str, Any]:
    import tfmq
    from tfmq.quant.api import relative_output_error

    steps: dict[str, float] = {}
    time_quantize_steps(steps)

    started = time.perf_counter()
    unet = build_unet(args.model, args.latent_size)
    result: dict[str, Any] = {"build_s": time.perf_counter() - started, "rss_after_build_mb": current_rss_mb()}
    calibration = tfmq.CalibrationSet.load(args.work / "calibration.safetensors")
    started = time.perf_counter()
    quantized = tfmq.quantize(unet, config, calibration, source=f"random {args.model}", progress=not args.quiet)
    result.update(quantize_s=time.perf_counter() - started, peak_after_quantize_mb=peak_rss_mb(), **steps)
    folder = args.work / config.method
    started = time.perf_counter()
    tfmq.save_quantized(quantized, folder, overwrite=True)
    result.update(save_s=time.perf_counter() - started, checkpoint_bytes=folder_bytes(folder))
    # A held-out step of fresh random latents: a check that the model runs and stays finite, not a quality
    # figure (the weights are random).
    held_out = random_calibration(1, args.steps, args.latent_size, unet.config.cross_attention_dim, 1, seed=1)
    held_out = held_out.at_steps([len(held_out.schedule) // 2])
    result["relative_output_error"] = relative_output_error(quantized, unet, held_out)
    info = quantized.tfmq_info.to_dict()
    units = info["method_results"].get("reconstruction", [])
    if probe is not None:
        for unit in units:
            unit.update(probe.units.get(unit["name"], {}))
        result["all_units"] = getattr(probe, "all_units", None)
    result.update(units=units, settings=info["method_results"].get("reconstruction_settings"),
                  quant_config=info["quant_config"])
    return result


def phase_rtn(args: argparse.Namespace) -> dict[str, Any]:
    import tfmq

    return _quantize_phase(args, tfmq.RTNConfig(w_bits=4, a_bits=8, weight_init=args.rtn_weight_init), None)


def phase_tfmq(args: argparse.Namespace) -> dict[str, Any]:
    import tfmq

    probe = UnitProbe()
    probe.install(args.max_units)
    config = tfmq.TFMQConfig(w_bits=4, a_bits=8, weight_init=args.tfmq_weight_init, recon_preset="fast",
                             recon_weight_iters=args.weight_iters,
                             recon_act_iters=args.act_iters, recon_batch_size=args.recon_batch_size)
    return _quantize_phase(args, config, probe)


def phase_export(args: argparse.Namespace) -> dict[str, Any]:
    import tfmq

    base = build_unet(args.model, args.latent_size)
    started = time.perf_counter()
    quantized = tfmq.load_quantized(args.work / "tfmq", base)
    result: dict[str, Any] = {"load_s": time.perf_counter() - started}
    del base
    gc.collect()
    calibration = tfmq.CalibrationSet.load(args.work / "calibration.safetensors")
    # a scheduled timestep: the model's timestep tables serve no other
    inputs = example_inputs(quantized, 2, args.latent_size, timestep=int(calibration.schedule[0]))
    with torch.no_grad():
        result["fake_quant_step_s"] = median_seconds(lambda: quantized(**inputs), 1)
    # both branches of the first trajectory at every step: the conv output grids' calibration
    grid_inputs = list(calibration.per_step(2).timestep_groups())
    path = args.work / "tfmq.onnx"
    started = time.perf_counter()
    with _error_recorded(result):
        tfmq.export_onnx(quantized, path, calibration=grid_inputs, overwrite=True)
        result["onnx_bytes"] = sum(file.stat().st_size for file in args.work.glob("tfmq.onnx*"))
    result["export_s"] = time.perf_counter() - started
    return result


def phase_onnxruntime(args: argparse.Namespace) -> dict[str, Any]:
    import tfmq

    path = args.work / "tfmq.onnx"
    if not path.is_file():
        return {"error": "no int8 graph: the export phase failed"}
    started = time.perf_counter()
    engine = tfmq.OnnxUNet(path, threads=torch.get_num_threads())
    result: dict[str, Any] = {"load_s": time.perf_counter() - started}
    schedule = engine.info.schedule
    config = engine.config
    generator = torch.Generator().manual_seed(1)
    inputs = {"sample": torch.randn(2, config["in_channels"], args.latent_size, args.latent_size, generator=generator),
              "timestep": int(schedule[len(schedule) // 2]),
              "encoder_hidden_states": torch.randn(2, TOKENS, config["cross_attention_dim"], generator=generator)}
    result["onnxruntime_step_s"] = median_seconds(lambda: engine(**inputs), args.repeats)
    return result


def phase_export_fp32(args: argparse.Namespace) -> dict[str, Any]:
    import tfmq

    unet = build_unet(args.model, args.latent_size)
    result: dict[str, Any] = {}
    started = time.perf_counter()
    with _error_recorded(result):
        tfmq.export_onnx(unet, args.work / "fp32.onnx", format="fp32", overwrite=True)
        result["onnx_bytes"] = sum(file.stat().st_size for file in args.work.glob("fp32.onnx*"))
    result["export_s"] = time.perf_counter() - started
    return result


@contextmanager
def _error_recorded(result: dict[str, Any]) -> Iterator[None]:
    """A failure of the library becomes the phase's `error` (type and first line), not the end of the run."""
    try:
        yield
    except Exception as exc:  # what export_onnx raises past 2 GB is the measurement
        lines = str(exc).strip().splitlines() or [""]
        frames = traceback.extract_tb(exc.__traceback__)
        ours = [frame for frame in frames if "/tfmq/" in frame.filename] or frames
        where = ", ".join(f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" for frame in (ours[-1], frames[-1]))
        result["error"] = f"{type(exc).__name__}: {lines[0][:400]} (at {where})"


WORKERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "fp": phase_fp, "rtn": phase_rtn, "tfmq": phase_tfmq, "export": phase_export,
    "onnxruntime": phase_onnxruntime, "export-fp32": phase_export_fp32,
}


def run_worker(args: argparse.Namespace) -> None:
    memory_guard(args.memory_limit_gb)
    started = time.perf_counter()
    result = WORKERS[args.worker](args)
    result.update(phase=args.worker, wall_s=time.perf_counter() - started, peak_rss_mb=peak_rss_mb(),
                  threads=torch.get_num_threads())
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------
# The parent: phases in order, kept results, tables


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key in ("model", "latent_size", "trajectories", "steps", "interval_length",
                                                "weight_iters", "act_iters", "recon_batch_size", "max_units",
                                                "rtn_weight_init", "tfmq_weight_init")}


def run_phase(phase: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run `phase` in a child process (or return its kept result)."""
    done = args.work / "phases" / f"{phase}.json"
    if done.is_file():
        return json.loads(done.read_text())
    command = [sys.executable, __file__, "--worker", phase, "--work", str(args.work),
               "--memory-limit-gb", str(args.memory_limit_gb), "--repeats", str(args.repeats)]
    for key, value in settings_of(args).items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    if args.quiet:
        command.append("--quiet")
    print(f"[{time.strftime('%H:%M:%S')}] phase {phase} ...", flush=True)
    child = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    lines = [line for line in child.stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        result = {"phase": phase, "error": f"exit code {child.returncode}, no result (see stderr above)"}
    else:
        result = json.loads(lines[-1])
        result["phase"] = phase
    if child.returncode == 0:
        from tfmq.files import write_json

        done.parent.mkdir(parents=True, exist_ok=True)
        write_json(done, result)
    print(f"[{time.strftime('%H:%M:%S')}] phase {phase}: {phase_summary(result)}", flush=True)
    return result


def phase_summary(result: dict[str, Any]) -> str:
    keys = ("wall_s", "peak_rss_mb", "quantize_s", "export_s", "onnxruntime_step_s", "error", "skipped")
    return ", ".join(f"{key} {result[key]:.4g}" if isinstance(result[key], float) else f"{key} {result[key]}"
                     for key in keys if key in result)


def meta_count(name: str) -> dict[str, Any]:
    """Parameters and per-sample forward FLOPs of a config, on the meta device (no memory)."""
    unet = build_unet(name, CONFIGS[name]["sample_size"], device="meta")
    parameters = parameter_count(unet)
    native = CONFIGS[name]["sample_size"]
    return {"parameters": parameters, "model_bytes": 4 * parameters, "native_latent": native,
            "gflop_per_sample_native": flops_per_module(name, native)[""] / 1e9}


def sdxl_peak_gb(phase: str, result: dict[str, Any], fp: dict[str, Any], sdxl: dict[str, Any]) -> float | None:
    """SDXL's peak RSS in a phase, from SD v1.4's measured one (see MODEL_COPIES)."""
    if "peak_rss_mb" not in result or "model_bytes" not in fp:
        return None
    peak = result["peak_rss_mb"] * 2**20
    if phase not in MODEL_COPIES:
        return peak * sdxl["parameters"] / fp["parameters"] / 2**30
    return (peak + MODEL_COPIES[phase] * (sdxl["model_bytes"] - fp["model_bytes"])) / 2**30


def unit_rows(units: list[dict[str, Any]], flops: dict[str, float], settings: dict[str, Any]) -> list[dict]:
    """The per-unit table: cache bytes, capture / AdaRound / LSQ seconds (per iteration), FLOPs."""
    rows = []
    for unit in units:
        weight_iters, act_iters = settings["weight_iters"], settings["act_iters"]
        rows.append({
            "unit": unit["name"], "samples": unit["samples"], "weights_M": unit.get("weights", 0) / 1e6,
            "gflop_per_sample": flops.get(unit["name"], 0.0) / 1e9,
            "cache_mb": unit.get("cache_bytes", 0) / MB, "capture_s": unit.get("capture_s"),
            "adaround_s_per_iter": unit["adaround_s"] / weight_iters if "adaround_s" in unit and weight_iters else None,
            "lsq_s_per_iter": unit["lsq_s"] / act_iters if "lsq_s" in unit and act_iters else None,
            "unit_s": unit["seconds"], "mse_before": unit["mse_before"], "mse_after": unit["mse_after"],
        })
    return rows


PHASE_COLUMNS = ("phase", "wall_s", "peak_rss_mb", "seconds", "bytes_mb", "note")
UNIT_COLUMNS = ("unit", "samples", "weights_M", "gflop_per_sample", "cache_mb", "capture_s", "adaround_s_per_iter",
                "lsq_s_per_iter", "unit_s", "mse_before", "mse_after")


def phase_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for phase, result in results.items():
        row = {"phase": phase, "wall_s": result.get("wall_s"), "peak_rss_mb": result.get("peak_rss_mb")}
        if phase == "fp":
            row.update(seconds=result.get("fp_step_s"), bytes_mb=result.get("calibration_bytes", 0) / MB,
                       note="seconds: one FP step (batch 2); bytes: calibration set")
        elif phase in ("rtn", "tfmq"):
            steps = ", ".join(f"{label} {result[key]:.0f} s" for key, label in (
                ("wrap_s", "wrap"), ("activation_ranges_s", "activation ranges")) if key in result)
            init = (result.get("quant_config") or {}).get("weight_init")
            row.update(seconds=result.get("quantize_s"), bytes_mb=result.get("checkpoint_bytes", 0) / MB,
                       note=f"seconds: quantize ({init} weight ranges{'; ' + steps if steps else ''}); bytes: "
                            f"checkpoint; rel. output error {result.get('relative_output_error', float('nan')):.3g}")
        elif phase in ("export", "export-fp32"):
            row.update(seconds=result.get("export_s"), bytes_mb=(result.get("onnx_bytes") or 0) / MB,
                       note="seconds: export_onnx; bytes: graph" + (
                           f"; fake-quant torch step (batch 2) {result['fake_quant_step_s']:.1f} s"
                           if "fake_quant_step_s" in result else ""))
        elif phase == "onnxruntime":
            row.update(seconds=result.get("onnxruntime_step_s"), note="seconds: one int8 step (batch 2)")
        for key in ("error", "skipped"):
            if key in result:
                row["note"] = f"{key.upper()}: {result[key]}"
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd14", choices=("sd14", "tiny"), help="the UNet quantized")
    parser.add_argument("--sdxl", action=argparse.BooleanOptionalAction, default=True,
                        help="count SDXL's UNet on the meta device and estimate its memory")
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--trajectories", type=int, default=2, help="calibration trajectories (2 branches each)")
    parser.add_argument("--steps", type=int, default=4, help="PLMS steps of the calibration schedule")
    parser.add_argument("--interval-length", type=int, default=2, help="reconstruction on every N-th step")
    parser.add_argument("--weight-iters", type=int, default=4, help="AdaRound iterations a unit")
    parser.add_argument("--act-iters", type=int, default=2, help="LSQ iterations a unit")
    parser.add_argument("--recon-batch-size", type=int, default=8)
    parser.add_argument("--max-units", type=int, default=12, help="TFMQ units reconstructed, spread (0: all)")
    parser.add_argument("--rtn-weight-init", default="minmax", choices=("mse", "minmax"),
                        help="RTN's weight ranges; mse (the library's default) measures its search in wrap_s, "
                             "74 min of SD v1.4 on this project's 2 shared cores")
    parser.add_argument("--tfmq-weight-init", default="minmax", choices=("mse", "minmax"),
                        help="TFMQ's weight ranges (minmax: the MSE search is measured once, by RTN)")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--memory-limit-gb", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls of a step (after a warm-up)")
    parser.add_argument("--name", default="full_size")
    parser.add_argument("--work", type=Path, default=Path("runs/full_size"))
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.worker is not None:
        run_worker(args)
        return

    from tfmq.files import write_json, write_text_atomic
    from tfmq.report import format_table

    settings = settings_of(args)
    settings_file = args.work / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) != settings:
        raise SystemExit(f"{args.work} holds phases of other settings: pass another --work")
    write_json(settings_file, settings)
    model_bytes = 4 * parameter_count(build_unet(args.model, args.latent_size, device="meta"))
    results: dict[str, dict[str, Any]] = {}
    for phase in args.phases:
        estimate = PEAK_OVER_MODEL[phase] * model_bytes / 2**30
        if estimate > args.memory_limit_gb:
            results[phase] = {"phase": phase, "skipped": f"estimated {estimate:.1f} GB > {args.memory_limit_gb:g} GB"}
            continue
        results[phase] = run_phase(phase, args)

    fp, tfmq_result = results.get("fp", {}), results.get("tfmq", {})
    sdxl: dict[str, Any] | None = None
    if args.sdxl and args.model == "sd14":  # the estimate scales SD v1.4's measured peaks
        sdxl = meta_count("sdxl")
        sdxl["estimated_peak_gb"] = {phase: sdxl_peak_gb(phase, result, fp, sdxl) for phase, result in results.items()}
        sdxl["fits"] = {phase: value is not None and value <= args.memory_limit_gb
                        for phase, value in sdxl["estimated_peak_gb"].items()}
    units = unit_rows(tfmq_result.get("units", []), fp.get(f"flops_{args.latent_size}", {}),
                      tfmq_result.get("settings") or {"weight_iters": args.weight_iters, "act_iters": args.act_iters})
    phase_table = format_table(phase_rows(results), PHASE_COLUMNS, markdown=True)
    unit_table = format_table(units, UNIT_COLUMNS, markdown=True)
    # all_units: the block units the patch chose from; TIAR's unit comes before them
    all_units = tfmq_result.get("all_units")
    tiar_units = sum(unit["unit"] == "temporal_information_block" for unit in units)
    total_units = len(all_units) + tiar_units if all_units else len(units)
    flops = fp.get(f"flops_{args.latent_size}", {}).get("")
    flops_paper = fp.get(f"flops_{PAPER_LATENT}", {}).get("")
    lines = [
        f"UNet `{args.model}` (random weights, seed 0): {fp.get('parameters', 0) / 1e6:.1f} M parameters, "
        f"{fp.get('model_bytes', 0) / 2**30:.2f} GiB in fp32; forward "
        f"{(flops or 0) / 1e9:.0f} GFLOP a sample at {args.latent_size}x{args.latent_size} latents, "
        f"{(flops_paper or 0) / 1e9:.0f} at {PAPER_LATENT}x{PAPER_LATENT} (matmul/conv/attention FLOPs, torch's "
        f"FlopCounterMode).",
        f"Calibration: {fp.get('calibration_samples')} samples ({args.trajectories} trajectories x {args.steps} PLMS "
        f"steps {fp.get('schedule')} x 2 branches, random latents and {TOKENS}x{fp.get('text_width')} "
        f"encoder states), {fp.get('calibration_bytes', 0) / MB:.1f} MB; reconstruction on the steps "
        f"0, {args.interval_length}, ... (interval length {args.interval_length}): {fp.get('weight_samples')} samples.",
        f"TFMQ W4A8: {args.weight_iters} AdaRound + {args.act_iters} LSQ iterations a unit at batch "
        f"{args.recon_batch_size}; {len(units)} of {total_units} units reconstructed"
        + (f" (--max-units {args.max_units}, the others keep round-to-nearest)" if args.max_units else "") + ".",
        f"Torch threads {fp.get('threads')}; load average at the end {os.getloadavg()[0]:.1f} (the machine is shared).",
    ]
    if sdxl is not None:
        over = [phase for phase, fits in sdxl["fits"].items() if not fits]
        lines.append(
            f"SDXL UNet (meta device): {sdxl['parameters'] / 1e6:.0f} M parameters, "
            f"{sdxl['model_bytes'] / 2**30:.1f} GiB in fp32, {sdxl['gflop_per_sample_native']:.0f} GFLOP a sample "
            f"at {sdxl['native_latent']}x{sdxl['native_latent']}; peak RSS estimated from SD v1.4's (its fp32 "
            f"copies of the UNet swapped for SDXL's, at these latents): " + ", ".join(f"{phase} {value:.1f} GB" for phase, value in
                                            sdxl["estimated_peak_gb"].items() if value is not None)
            + (f" -> does not fit in {args.memory_limit_gb:g} GB (24 GB machine): {', '.join(over)}; not run."
               if over else "; not run."))
    text = "\n".join(f"- {line}" for line in lines)
    print("\n" + text + "\n\n" + phase_table + "\n\n" + unit_table)
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", {"settings": settings, "phases": results, "units": units,
                                                "sdxl": sdxl, "summary": lines})
    command = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/full_size.py "
               + " ".join(sys.argv[1:]))
    write_text_atomic(RESULTS / f"{args.name}.md",
                      f"# Full-size UNets\n\n`{command}`\n\n{text}\n\n## Phases\n\n{phase_table}\n\n"
                      f"## TFMQ units\n\n{unit_table}\n")


if __name__ == "__main__":
    main()
