"""Quantize once, sample with any scheduler: one schedule-free W4A8 model against models calibrated on each
target schedule, on a shipped model.

    python benchmarks/any_schedule.py --model fashion-ddpm --num 256 --jobs 2

Models (each quantized in its own process, one torch thread each, `--jobs` at a time):
- `tfmq-free`: tfmq + temporal cache, schedule-free (`train_timesteps`), calibrated once on the dense set
  (DDIM 100 steps, uniform skip: t = 0, 10, ..., 990), uncalibrated FSC rows interpolated ("linear");
- `tfmq-all-free`: the same with FSC tables on every activation (`fsc_scope="all"`), where the fill of the
  uncalibrated rows matters (with the default "temporal" scope and the cache no table is read: the cache
  stands in for the layers that carry them); and `tfmq-all-free-nearest`, that model with its uncalibrated
  rows taken from the nearest calibrated one instead (re-filled, not re-calibrated);
- `tfmq-target`: tfmq + temporal cache calibrated on the target schedule itself (today's only option: one
  calibration per schedule);
- `qdiff`: Q-Diffusion on the dense set; it has no per-timestep parameters, so it serves any schedule;
- `tfmq-free-quad`, `qdiff-quad`: the same two calibrated once on DDIM 100 with quadratic skip instead (the
  set `tfmq-target` uses for the DDIM 100 target, dense at small t, up to t = 800), to see how much the
  choice of the one calibration set matters.

Targets: DDIM 20, 50, 100 (quadratic skip), DPM-Solver++ 20, PLMS 50. For each, FP images of the same seeds
are the baseline of PSNR / SSIM / FID to FP. Every calibration set, checkpoint and image set is kept in
`--work`, so an interrupted run continues. Writes benchmarks/results/any_schedule[_<model>].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tfmq import QDiffusionConfig, QualityMetrics, SamplerConfig, TFMQConfig, load_model, quantize, sample
from tfmq.files import write_json, write_text_atomic
from tfmq.quant.calibration import CalibrationSet, collect_calibration
from tfmq.quant.checkpoint import load_quantized, save_quantized
from tfmq.quant.nn import timestep_tables
from tfmq.quant.timestep_table import fill_uncalibrated_rows, table_quantizers
from tfmq.report import format_table

from method_table import conditioning  # this folder: scripts run as files

RESULTS = Path(__file__).resolve().parent / "results"
DENSE = SamplerConfig(steps=100, skip_type="uniform")
TARGETS = {"ddim20": SamplerConfig(steps=20), "ddim50": SamplerConfig(steps=50), "ddim100": SamplerConfig(steps=100),
           "dpm20": SamplerConfig(name="dpm-solver", steps=20), "plms50": SamplerConfig(name="plms", steps=50)}
COLUMNS = ("target", "model", "psnr_to_fp", "ssim_to_fp", "fid_to_fp", "calib_s")


def quant_config(model_name: str, num_train_timesteps: int, args: argparse.Namespace):
    length = {"recon_preset": args.preset}
    if args.weight_iters is not None:  # a quick check of the script, not a measurement
        length.update(recon_weight_iters=args.weight_iters, recon_act_iters=max(1, args.weight_iters // 4))
    if model_name == "qdiff":
        return QDiffusionConfig(w_bits=4, a_bits=8, **length)
    free = {"train_timesteps": num_train_timesteps} if model_name in ("tfmq-free", "tfmq-all-free") else {}
    scope = {"fsc_scope": "all"} if model_name == "tfmq-all-free" else {}
    return TFMQConfig(w_bits=4, a_bits=8, temporal_cache=True, **length, **free, **scope)


def calibration_file(work: Path, sampler_name: str) -> Path:
    return work / "calibration" / f"{sampler_name}.safetensors"


def collect(args: argparse.Namespace, sampler_name: str) -> None:
    path = calibration_file(args.work, sampler_name)
    if path.is_file():
        return
    model = load_model(args.model)
    sampler = DENSE if sampler_name == "dense" else TARGETS[sampler_name]
    calibration = collect_calibration(model.unet, model.scheduler, args.calib_samples, sampler, args.interval_length,
                                      conditioning=conditioning(model, args, args.calib_samples, calibration=True),
                                      progress=False)
    calibration.save(path)


def run_quantize(args: argparse.Namespace, model_name: str, calibrated_on: str) -> dict:
    """Quantize one model (in this process) and save it; returns its calibration seconds."""
    model = load_model(args.model)
    calibration = CalibrationSet.load(calibration_file(args.work, calibrated_on))
    config = quant_config(model_name, model.scheduler.config.num_train_timesteps, args)
    started = time.perf_counter()
    quantized = quantize(model.unet, config, calibration, source=model.source, progress=False)
    seconds = time.perf_counter() - started
    save_quantized(quantized, args.work / "models" / f"{model_name}-{calibrated_on}")
    return {"calib_s": seconds}


def nearest_filled(unet: torch.nn.Module, calibrated: torch.Tensor) -> torch.nn.Module:
    """`unet` (schedule-free) with every row that was not calibrated re-filled from the nearest calibrated one."""
    for _, quantizer in table_quantizers(unet):
        quantizer.table_initialized.copy_(torch.isin(timestep_tables(unet).schedule, calibrated))
        fill_uncalibrated_rows(quantizer, "nearest")
    return unet


def run_sample(args: argparse.Namespace, model_name: str, target: str) -> dict:
    """Sample the evaluation seeds of `target` with one model (in this process) and keep the images."""
    model = load_model(args.model)
    unet = model.unet
    if model_name != "fp":
        unet = load_quantized(args.work / "models" / model_folder(model_name, target), model.unet)
        if model_name == "tfmq-all-free-nearest":
            unet = nearest_filled(unet, CalibrationSet.load(calibration_file(args.work, "dense")).schedule)
    started = time.perf_counter()
    images = sample(unet, model.scheduler, args.num, args.seed, TARGETS[target], batch_size=64, progress=False,
                    conditioning=conditioning(model, args, args.num, calibration=False), decoder=model.decoder)
    save_file({"images": images}, str(images_file(args.work, model_name, target)))
    return {"sampling_s": time.perf_counter() - started}


def model_folder(model_name: str, target: str) -> str:
    """The checkpoint folder a model samples from: its method and the set it was calibrated on."""
    if model_name == "tfmq-target":
        return f"tfmq-target-{target}"
    method = model_name.removesuffix("-nearest")
    if method.endswith("-quad"):
        return f"{method.removesuffix('-quad')}-ddim100"
    return f"{method}-dense"


def images_file(work: Path, model_name: str, target: str) -> Path:
    return work / "images" / f"{model_name}-{target}.safetensors"


def in_child(args: argparse.Namespace, job: list[str], done: Path) -> dict:
    """Run `job` (a worker's arguments) in a child process with one torch thread, unless `done` exists."""
    record = done.with_suffix(".json")
    if done.exists() and record.is_file():
        return json.loads(record.read_text())
    worker = [sys.executable, __file__, "--model", args.model, "--num", str(args.num), "--seed", str(args.seed),
              "--work", str(args.work), "--preset", args.preset, "--guidance-scale", str(args.guidance_scale),
              "--calib-samples", str(args.calib_samples), "--interval-length", str(args.interval_length),
              *([] if args.weight_iters is None else ["--weight-iters", str(args.weight_iters)]), "--worker", *job]
    output = subprocess.run(worker, check=True, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1")).stdout
    result = json.loads(output.strip().splitlines()[-1])
    write_json(record, result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fashion-ddpm")
    parser.add_argument("--num", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--interval-length", type=int, default=5)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--weight-iters", type=int, default=None, help="override the preset (quick checks only)")
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="conditional models only")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--name", default=None, help="results file name (default: any_schedule[_<model>])")
    parser.add_argument("--work", type=Path, default=Path("runs/any_schedule"))
    parser.add_argument("--worker", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for folder in ("calibration", "models", "images"):
        (args.work / folder).mkdir(parents=True, exist_ok=True)

    if args.worker is not None:
        kind, *rest = args.worker
        result = {"collect": lambda: collect(args, *rest) or {}, "quantize": lambda: run_quantize(args, *rest),
                  "sample": lambda: run_sample(args, *rest)}[kind]()
        print(json.dumps(result))
        return

    settings = {key: getattr(args, key) for key in ("model", "num", "seed", "calib_samples", "interval_length",
                                                    "preset", "weight_iters", "guidance_scale")}
    settings_file = args.work / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) != settings:
        raise SystemExit(f"{args.work} holds runs of other settings: pass another --work")
    write_json(settings_file, settings)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda name: in_child(args, ["collect", name], calibration_file(args.work, name)),
                      ["dense", *TARGETS]))
        quantized = [("tfmq-all-free", "dense"), ("tfmq-free", "dense"), ("qdiff", "dense")] + [
            ("tfmq-target", target) for target in TARGETS] + [("tfmq-free", "ddim100"), ("qdiff", "ddim100")]
        calibrated = {f"{name}-{on}": seconds for (name, on), seconds in zip(quantized, pool.map(
            lambda job: in_child(args, ["quantize", *job], args.work / "models" / f"{job[0]}-{job[1]}"), quantized))}
        models = ("fp", "tfmq-free", "tfmq-target", "qdiff", "tfmq-all-free", "tfmq-all-free-nearest",
                  "tfmq-free-quad", "qdiff-quad")
        jobs = [(model_name, target) for target in TARGETS for model_name in models]
        list(pool.map(lambda job: in_child(args, ["sample", *job], images_file(args.work, *job)), jobs))
    metrics = QualityMetrics()
    rows = []
    for target in TARGETS:
        reference = load_file(str(images_file(args.work, "fp", target)))["images"]
        for model_name in models[1:]:
            images = load_file(str(images_file(args.work, model_name, target)))["images"]
            paired = metrics.between(images, reference)
            calib = calibrated[model_folder(model_name, target)]
            rows.append({"target": target, "model": model_name, "psnr_to_fp": paired["psnr"],
                         "ssim_to_fp": paired["ssim"], "fid_to_fp": paired["fid_to_baseline"],
                         "calib_s": calib["calib_s"]})
    table = format_table(rows, COLUMNS, markdown=True)
    print(table)
    name = args.name or ("any_schedule" if args.model == "fashion-ddpm"
                         else f"any_schedule_{args.model.replace('fashion-', '')}")
    guidance = "" if load_model(args.model).conditioning_kind is None else f", guidance scale {args.guidance_scale}"
    setup = (f"`{args.model}`{guidance}, W4A8, preset {args.preset}, {args.num} images of seed {args.seed} per "
             f"target; calibration {args.calib_samples} trajectories (interval {args.interval_length}); dense set: "
             f"DDIM {DENSE.steps} uniform; one torch thread per process, {args.jobs} at a time; "
             f"{time.perf_counter() - started:.0f} s in all")
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{name}.json", {"setup": setup, "settings": settings, "rows": rows})
    command = "python benchmarks/any_schedule.py " + " ".join(sys.argv[1:])
    write_text_atomic(RESULTS / f"{name}.md", f"# Quantize once, sample with any scheduler\n\n`{command}`\n\n"
                                              f"{setup}\n\n{table}\n")


if __name__ == "__main__":
    main()
