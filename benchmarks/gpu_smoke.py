"""The CUDA path end to end, in one short run, for the day a GPU machine is at hand (under 10 minutes on one GPU).

    python benchmarks/gpu_smoke.py --device cuda

1. The shipped fashion-ddpm on the GPU in float32 and float16: calibration, rtn and tfmq W4A8 (temporal cache,
   FSC over every activation), save, load, sampling; the images against the same float32 run on the CPU, and
   the time of a sampling step, FP against fake-quant, in the same run.
2. A random-weight UNet of Stable Diffusion v1.4's configuration (64x64 latents, float16): rtn and tfmq W4A8 on a
   random calibration set (2 prompts, 10 PLMS steps, both guidance branches), 2 iterations a unit; one guided
   step timed FP against fake-quant; peak GPU memory.
3. Host syncs in one call of the tfmq model (torch.cuda.set_sync_debug_mode): there should be none.

Every check runs even when an earlier one failed; the table (benchmarks/results/gpu_smoke.{md,json}) says which
passed, and the exit status is 1 if any failed. `--device cpu --unet tiny --latent-size 8 --images 4 --steps 4`
rehearses the script on a machine without a GPU (no sync check there; results go to gpu_smoke_rehearsal.*).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from full_size import build_unet, example_inputs, random_calibration  # this folder: scripts run as files

RESULTS = Path(__file__).resolve().parent / "results"
FEW_ITERATIONS = {"recon_preset": "fast", "recon_weight_iters": 2, "recon_act_iters": 2}


def _wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(unet: torch.nn.Module, inputs: dict[str, Any], repeats: int = 10) -> float:
    """Median seconds of one UNet call, the kernels waited for."""
    device = inputs["sample"].device
    times = []
    with torch.no_grad():
        unet(**inputs)
        for _ in range(repeats):
            _wait(device)
            started = time.perf_counter()
            unet(**inputs)
            _wait(device)
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def shipped_model_rows(device: torch.device, dtype: torch.dtype, images: int, steps: int) -> list[dict[str, Any]]:
    from tfmq import RTNConfig, TFMQConfig, load_model, load_quantized, quantize, sample, save_quantized
    from tfmq.quant.calibration import collect_calibration
    from tfmq.sampling import SamplerConfig

    sampler = SamplerConfig(steps=steps)
    rows = []
    cpu_model = load_model("fashion-ddpm")
    cpu_calibration = collect_calibration(cpu_model.unet, cpu_model.scheduler, 8, sampler, 2, progress=False)
    model = load_model("fashion-ddpm").to(device, dtype)
    calibration = collect_calibration(model.unet, model.scheduler, 8, sampler, 2, progress=False)
    for name, config in (("rtn", RTNConfig()),
                         ("tfmq", TFMQConfig(**FEW_ITERATIONS, temporal_cache=True, fsc_scope="all"))):
        started = time.perf_counter()
        quantized = quantize(model.unet, config, calibration, progress=False)
        seconds = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as folder:
            loaded = load_quantized(save_quantized(quantized, Path(folder) / name), model.unet)
        on_gpu = sample(loaded, model.scheduler, images, 0, sampler, progress=False)
        cpu_quantized = quantize(cpu_model.unet, config, cpu_calibration, progress=False)
        on_cpu = sample(cpu_quantized, cpu_model.scheduler, images, 0, sampler, progress=False)
        inputs = {"sample": torch.randn(64, 1, 16, 16, device=device, dtype=dtype),
                  "timestep": calibration.schedule[len(calibration.schedule) // 2].repeat(64).to(device)}
        fp_step, quantized_step = step_seconds(model.unet, inputs), step_seconds(loaded, inputs)
        rows.append({"check": f"fashion-ddpm {name} {str(dtype).removeprefix('torch.')}",
                     "quantize_s": round(seconds, 1), "max_abs_vs_cpu_fp32": float((on_gpu - on_cpu).abs().max()),
                     "fp_step_ms": fp_step * 1e3, "fake_quant_step_ms": quantized_step * 1e3,
                     "finite": bool(torch.isfinite(on_gpu).all()), "sync_free_call": _sync_free(loaded, inputs)})
    return rows


def _sync_free(model: torch.nn.Module, inputs: dict[str, Any]) -> bool | None:
    """Whether one call makes the host wait for the GPU (a second call: the first may read flags once); None
    on the CPU."""
    if inputs["sample"].device.type != "cuda":
        return None
    with torch.no_grad():
        model(**inputs)
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(**inputs)
            return True
        except RuntimeError:
            return False
        finally:
            torch.cuda.set_sync_debug_mode("default")


def stable_diffusion_rows(device: torch.device, config_name: str, latent: int) -> list[dict[str, Any]]:
    from tfmq import RTNConfig, TFMQConfig, quantize

    rows = []
    unet = build_unet(config_name, latent, device=str(device)).to(torch.float16)
    calibration = random_calibration(2, 10, latent, unet.config.cross_attention_dim, 5)
    calibration.samples = calibration.samples.half()
    calibration.conditions = {key: value.half() for key, value in calibration.conditions.items()}
    inputs = {key: value.half() if torch.is_tensor(value) and value.is_floating_point() else value
              for key, value in example_inputs(unet, 2, latent, int(calibration.schedule[3])).items()}
    for name, config in (("rtn", RTNConfig()), ("tfmq", TFMQConfig(**FEW_ITERATIONS))):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        quantized = quantize(unet, config, calibration, progress=False)
        seconds = time.perf_counter() - started
        rows.append({"check": f"{config_name} random {name} float16 {latent}x{latent}", "quantize_s": round(seconds, 1),
                     "fp_step_ms": step_seconds(unet, inputs) * 1e3,
                     "fake_quant_step_ms": step_seconds(quantized, inputs) * 1e3,
                     "peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                     "finite": bool(torch.isfinite(quantized(**inputs).sample).all()),
                     "sync_free_call": _sync_free(quantized, inputs)})
        del quantized
    return rows


def checked(name: str, run: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    try:
        rows = run()
    except Exception as exc:  # record and go on: the other checks still say something
        traceback.print_exc()
        return [{"check": name, "passed": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}]
    return [{**row, "passed": row["finite"] and row["sync_free_call"] is not False
             and row.get("max_abs_vs_cpu_fp32", 0.0) < 0.5} for row in rows]


def main() -> int:
    from tfmq.devices import resolve_device
    from tfmq.report import format_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--latent-size", type=int, default=64)
    parser.add_argument("--unet", choices=["sd14", "tiny"], default="sd14", help="tiny: SD v1.4's layout, narrow")
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = "gpu_smoke" if device.type == "cuda" else "gpu_smoke_rehearsal"
    rows = []
    for dtype in (torch.float32, torch.float16):
        rows += checked(f"fashion-ddpm {dtype}", lambda: shipped_model_rows(device, dtype, args.images, args.steps))
    rows += checked(f"{args.unet} random", lambda: stable_diffusion_rows(device, args.unet, args.latent_size))
    table = format_table(rows, markdown=True)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    (RESULTS / f"{name}.md").write_text(f"# GPU smoke ({where})\n\n{table}\n")
    (RESULTS / f"{name}.json").write_text(json.dumps({"device": where, "torch": torch.__version__, "rows": rows},
                                                     indent=2))
    return 0 if all(row["passed"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
