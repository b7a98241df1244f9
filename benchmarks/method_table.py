"""The method table on a shipped model: FP and each quantization method, same seeds, same calibration set.

    python benchmarks/method_table.py --num 1000 --steps 100 --rows fp rtn:8:8 rtn:4:8

A row is `fp` or `METHOD:W:A[:FIELD=VALUE,...]` (bits, or `fp` for full precision: `rtn:4:fp` is weights
only; FIELDs are fields of the method's config, e.g. `tfmq:4:8:fsc_scope=all,temporal_cache=true`, `null` for None). Every row runs
in its own process, so its peak memory (max RSS) is its own; the calibration set is collected once and
shared by all methods; the FP samples are the pairing baseline for FID/PSNR/SSIM to FP. `--jobs 2` runs
two rows at a time with one thread each (the FP row first, alone). A finished row is kept in the work
folder and not run again for the same settings (the resolved preset included), so an interrupted table
resumes where it stopped.
Writes benchmarks/results/method_table.{json,md} (or --name).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tfmq import QualityMetrics, SamplerConfig, load_model, sample
from tfmq.files import write_json, write_text_atomic
from tfmq.pipeline import quantize_and_save
from tfmq.metrics import load_reference_statistics
from tfmq.quant.calibration import CalibrationSet, collect_calibration
from tfmq.quant.config import CONFIG_TYPES, QuantConfig, config_for
from tfmq.models.prompts import CLASS_WORDS, prompt_class
from tfmq.report import format_table

from machine import cpu_description  # this folder: scripts run as files
from memory import peak_rss_mb
from sampling_args import add_sampling_arguments  # this folder: scripts run as files

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ("row", "fid", "sfid", "is", "class_acc", "fid_to_fp", "psnr_to_fp", "ssim_to_fp", "rel_err", "calib_s",
           "sampling_s", "peak_rss_mb", "size_mb")
# What a text-conditional model is asked to draw at evaluation: image i shows class i mod 10.
EVALUATION_PROMPTS = [f"a photo of {names[0]}" for names in CLASS_WORDS]


def _bits(text: str) -> int | None:
    return None if text == "fp" else int(text)


def _value(text: str) -> object:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "null":  # "none" stays a string: it is a value of fsc_scope
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def row_config(row: str, preset: str) -> QuantConfig:
    """`METHOD:W:A[:FIELD=VALUE,...]` -> the method's config (its defaults, as `tfmq quantize --method METHOD`);
    reconstruction methods get `preset` unless overridden."""
    method, w_bits, a_bits, *rest = row.split(":")
    fields: dict = {"w_bits": _bits(w_bits), "a_bits": _bits(a_bits)}
    if method in CONFIG_TYPES and "recon_preset" in {field.name for field in dataclasses.fields(CONFIG_TYPES[method])}:
        fields["recon_preset"] = preset
    for item in (rest[0].split(",") if rest else []):
        key, _, value = item.partition("=")
        fields[key] = _value(value)
    return config_for(method, fields)


def sampler_config(args: argparse.Namespace) -> SamplerConfig:
    return SamplerConfig(name=args.sampler, steps=args.steps, skip_type="quad", eta=0.0)


def conditioning(model, args: argparse.Namespace, count: int, calibration: bool):
    """Conditions of a conditional model: calibration prompts of its folder, or for evaluation prompts
    (labels) asking for class i mod 10 in image i; None for unconditional models."""
    kind = model.conditioning_kind
    if kind is None:
        return None
    prompts = None
    if kind == "text":
        prompts = model.calibration_prompts() if calibration else EVALUATION_PROMPTS
    return model.conditioning(count, prompts=prompts, guidance_scale=args.guidance_scale)


def requested_classes(conditioning) -> torch.Tensor:
    if "class_labels" in conditioning.per_image:
        return conditioning.per_image["class_labels"]
    classes = [prompt_class(prompt) for prompt in EVALUATION_PROMPTS]
    return torch.as_tensor([classes[index % len(classes)] for index in range(len(conditioning))])


def run_row(row: str, args: argparse.Namespace, work: Path) -> dict:
    """One row, in this process: quantize (unless fp), sample the evaluation seeds, measure."""
    model = load_model(args.model)
    sampler = sampler_config(args)
    unet, result = model.unet, {"row": row}
    if row != "fp":
        calibration = CalibrationSet.load(work / "calibration.safetensors")
        unet, report = quantize_and_save(model, row_config(row, args.preset), calibration, work / folder_name(row),
                                         conditioning_for=lambda count: conditioning(model, args, count, True))
        result.update(calib_s=report.quantize_seconds, rel_err=report.relative_output_error,
                      size_mb=report.file_bytes / 1e6)
        method_results = unet.tfmq_info.method_results
        if "reconstruction" in method_results:  # per unit: losses, seconds, rounding steps
            result["units"] = method_results["reconstruction"]
        if "output_correction" in method_results:
            result["correction_s"] = method_results["output_correction"]["seconds"]
    else:
        result["size_mb"] = sum(p.numel() * p.element_size() for p in unet.parameters()) / 1e6
    started = time.perf_counter()
    evaluation = conditioning(model, args, args.num, calibration=False)
    images = sample(unet, model.scheduler, args.num, args.seed, sampler, batch_size=64, conditioning=evaluation,
                    decoder=model.decoder)
    result["sampling_s"] = time.perf_counter() - started
    metrics = QualityMetrics()
    scores = metrics.against_reference(images, load_reference_statistics())
    result.update(fid=scores["fid"], sfid=scores["sfid"], **{"is": scores["is"]})
    if evaluation is not None:
        result["class_acc"] = metrics.class_accuracy(images, requested_classes(evaluation))
    if row == "fp":
        save_file({"images": images}, str(work / "fp_images.safetensors"))
    else:
        paired = metrics.between(images, load_file(str(work / "fp_images.safetensors"))["images"])
        result.update(fid_to_fp=paired["fid_to_baseline"], psnr_to_fp=paired["psnr"], ssim_to_fp=paired["ssim"])
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def resolved_settings(row: str, preset: str) -> dict | None:
    """What a row runs with, as JSON: its config and, for reconstruction methods, the settings its preset
    resolves to; None for the FP row. A kept row recorded with other settings (a preset changed since) runs again."""
    if row == "fp":
        return None
    config = row_config(row, preset)
    settings = {"config": config.to_dict()}
    if hasattr(config, "reconstruction"):
        settings["reconstruction"] = dataclasses.asdict(config.reconstruction)
    if hasattr(config, "tiar_reconstruction"):
        settings["tiar_reconstruction"] = dataclasses.asdict(config.tiar_reconstruction)
    return json.loads(json.dumps(settings))


def run_worker(row: str, args: argparse.Namespace) -> dict:
    """Run `row` in a child process (or return its kept result) and print its line of the table."""
    done = args.work / "rows" / (folder_name(row) + ".json")
    settings = resolved_settings(row, args.preset)
    kept = json.loads(done.read_text()) if done.is_file() else None
    if kept is not None and kept.get("settings") == settings:
        result = kept
    else:
        if kept is not None:
            print(f"{row}: kept in {done} with other settings, run again", flush=True)
        worker = [sys.executable, __file__, "--worker", row, "--model", args.model, "--num", str(args.num),
                  "--steps", str(args.steps), "--seed", str(args.seed), "--work", str(args.work),
                  "--preset", args.preset, "--sampler", args.sampler, "--guidance-scale", str(args.guidance_scale)]
        env = dict(os.environ, OMP_NUM_THREADS="1") if args.jobs > 1 else None
        output = subprocess.run(worker, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
        result = json.loads(output.strip().splitlines()[-1]) | {"settings": settings}
        write_json(done, result)
    print(format_table([result], COLUMNS), flush=True)
    return result


def folder_name(row: str) -> str:
    return row.replace(":", "_").replace(",", "_").replace("=", "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(parser)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--interval-length", type=int, default=5)
    parser.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration trajectories")
    parser.add_argument("--rows", nargs="+", default=["fp", "rtn:8:8", "rtn:4:8"])
    parser.add_argument("--preset", default="fast", help="reconstruction preset of qdiff/tfmq rows")
    parser.add_argument("--sampler", default="ddim", help="ddim (quadratic skip, eta 0), plms, dpm-solver, ddpm")
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="conditional models only")
    parser.add_argument("--name", default="method_table")
    parser.add_argument("--jobs", type=int, default=1, help="rows run at once after the FP row (1 thread each)")
    parser.add_argument("--work", type=Path, default=Path("runs/benchmark"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    if args.worker is not None:
        print(json.dumps(run_row(args.worker, args, args.work)))
        return

    rows = ["fp"] + [row for row in args.rows if row != "fp"]
    calibration_file = args.work / "calibration.safetensors"
    settings = {"model": args.model, "sampler": args.sampler, "guidance_scale": args.guidance_scale, "steps": args.steps, "calib_samples": args.calib_samples,
                "interval_length": args.interval_length, "num": args.num, "seed": args.seed, "preset": args.preset,
                "calib_seed": args.calib_seed}
    settings_file = args.work / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) != settings:
        raise SystemExit(f"{args.work} holds rows of other settings: pass another --work")
    write_json(settings_file, settings)
    if not calibration_file.is_file():
        model = load_model(args.model)
        started = time.perf_counter()
        calibration = collect_calibration(model.unet, model.scheduler, args.calib_samples, sampler_config(args),
                                          args.interval_length, seed=args.calib_seed,
                                          conditioning=conditioning(model, args, args.calib_samples, calibration=True))
        calibration.save(calibration_file)
        write_json(args.work / "collect_calibration.json", {"seconds": time.perf_counter() - started})
    collect_seconds = json.loads((args.work / "collect_calibration.json").read_text())["seconds"]
    results = [run_worker(rows[0], args)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        # Submitted, not mapped: a failing row does not cancel the queued ones (each keeps its result).
        futures = [pool.submit(run_worker, row, args) for row in rows[1:]]
        results += [future.result() for future in futures]
    table = format_table(results, COLUMNS, markdown=True)
    guidance = "" if load_model(args.model).conditioning_kind is None else (
        f", guidance scale {args.guidance_scale}, image i asked for class i mod 10 (class_acc: our classifier agrees)")
    sampler_text = "DDIM (quadratic skip, eta 0)" if args.sampler == "ddim" else args.sampler.upper()
    setup = (f"`{args.model}`, {sampler_text} {args.steps} steps{guidance}, {args.num} images of seed "
             f"{args.seed}; calibration: {args.calib_samples} trajectories (seed {args.calib_seed}) x {args.steps} steps "
             f"(collected once in {collect_seconds:.0f} s, shared by all rows; calib_s excludes it), "
             f"torch threads per row {1 if args.jobs > 1 else torch.get_num_threads()}, {args.jobs} row(s) at a time, "
             f"CPU {cpu_description()} (the rounding, and so the quality columns, differ between torch's "
             "kernel sets)")
    print(table)
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", {"setup": setup, "collect_calibration_s": collect_seconds,
                                                "rows": results})
    command = "python benchmarks/method_table.py " + " ".join(sys.argv[1:])
    write_text_atomic(RESULTS / f"{args.name}.md", f"# Method table\n\n`{command}`\n\n{setup}\n\n{table}\n")


if __name__ == "__main__":
    main()
