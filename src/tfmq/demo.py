"""`tfmq demo`: the whole job on the shipped model in minutes: quantize, sample both, compare, report."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from tfmq.files import atomic_directory, write_json, write_text_atomic
from tfmq.images import make_grid, save_image_folder
from tfmq.metrics import QualityMetrics, load_reference_statistics
from tfmq.models.loading import load_model
from tfmq.pipeline import CalibrationSettings, calibrate, quantize_and_save
from tfmq.quant.config import QuantConfig, TFMQConfig
from tfmq.report import format_table
from tfmq.sampling import SamplerConfig, sample

COMPARISON_FILE = "comparison.png"
REPORT_FILE = "report.md"


@dataclass(frozen=True)
class DemoSettings:
    model: str = "fashion-ddpm"
    num_images: int = 256
    calib_samples: int = 64
    steps: int = 100
    seed: int = 0
    config: QuantConfig = TFMQConfig(recon_preset="fast")  # the conference method at a length the demo's minutes fit


def side_by_side(left: torch.Tensor, right: torch.Tensor, gap: int = 12) -> Image.Image:
    """Two grids of the same seeds, full precision on the left, quantized on the right."""
    first, second = make_grid(left), make_grid(right)
    canvas = Image.new("L", (first.width + gap + second.width, max(first.height, second.height)), 255)
    canvas.paste(first, (0, 0))
    canvas.paste(second, (first.width + gap, 0))
    return canvas


DEMO_KIND = "demo"


def run_demo(out: str | Path, settings: DemoSettings = DemoSettings(), progress: bool = True, *,
             overwrite: bool = False) -> dict:
    """Run the demo into the folder `out`, written whole at the end (an earlier demo folder is replaced, anything
    else only with `overwrite`); returns the metrics rows (also written as report.json and report.md)."""
    with atomic_directory(out, kind=DEMO_KIND, overwrite=overwrite) as staging:
        return _run_demo(staging, settings, progress)


def _unconditional(count: int) -> None:
    """The demo's model is unconditional: no condition for any number of trajectories."""
    return None


def _run_demo(out: Path, settings: DemoSettings, progress: bool) -> dict:
    started = time.perf_counter()
    model = load_model(settings.model)
    sampler = SamplerConfig(steps=settings.steps, skip_type="quad")
    calibration_settings = CalibrationSettings(settings.calib_samples, sampler, seed=settings.seed)
    calibration = calibrate(model, calibration_settings, _unconditional, progress)
    quantized, report = quantize_and_save(model, settings.config, calibration, out / "quantized_model",
                                          conditioning_for=_unconditional, progress=progress)

    timings, images = {}, {}
    for name, unet in (("fp", model.unet), ("quantized", quantized)):
        begin = time.perf_counter()
        images[name] = sample(unet, model.scheduler, settings.num_images, settings.seed, sampler, progress=progress)
        timings[name] = time.perf_counter() - begin
        save_image_folder(images[name], out / f"{name}_images", {"model": settings.model, "seed": settings.seed,
                                                                 "sampler": sampler.to_dict()})
    metrics = QualityMetrics()
    reference = load_reference_statistics()
    rows = []
    for name in ("fp", "quantized"):
        row = {"model": "full precision" if name == "fp" else
               f"{settings.config.method} W{settings.config.w_bits}A{settings.config.a_bits}"}
        row.update(metrics.against_reference(images[name], reference))
        if name == "quantized":
            paired = metrics.between(images["quantized"], images["fp"])
            row.update(fid_to_fp=paired["fid_to_baseline"], psnr_to_fp=paired["psnr"], ssim_to_fp=paired["ssim"])
        row["sampling_s"] = timings[name]
        rows.append(row)
    fp_mb = report.fp32_bytes / 1e6
    size_mb = report.file_bytes / 1e6
    summary = {
        "settings": {"model": settings.model, "num_images": settings.num_images, "steps": settings.steps,
                     "seed": settings.seed, "calib_samples": settings.calib_samples,
                     "config": settings.config.to_dict()},
        "rows": rows, "calibration_collect_s": report.collect_seconds, "quantize_s": report.quantize_seconds,
        "relative_output_error": report.relative_output_error,
        "fp32_unet_mb": fp_mb, "quantized_file_mb": size_mb, "total_s": time.perf_counter() - started,
    }
    side_by_side(images["fp"][:64], images["quantized"][:64]).save(out / COMPARISON_FILE)
    write_json(out / "report.json", summary)
    columns = ["model", "fid", "sfid", "is", "fid_to_fp", "psnr_to_fp", "ssim_to_fp", "sampling_s"]
    write_text_atomic(out / REPORT_FILE, "\n".join([
        f"# tfmq demo: {settings.model}, {rows[1]['model']}", "",
        f"DDIM {settings.steps} steps (quadratic skip, eta 0), {settings.num_images} images of seed {settings.seed}, "
        f"the same noise for both models. Calibration: {settings.calib_samples} trajectories, "
        f"{summary['calibration_collect_s']:.0f} s to collect, {summary['quantize_s']:.0f} s to quantize "
        f"(preset {settings.config.summary()['preset']}). Weights: {fp_mb:.2f} MB fp32 -> {size_mb:.2f} MB.", "",
        format_table(rows, columns, markdown=True), "",
        f"![full precision (left) and quantized (right), same seeds]({COMPARISON_FILE})", "",
        "FID, sFID and IS use tfmq's own Fashion-MNIST feature network: compare them with each other, not with "
        "papers' Inception figures. With a few hundred images FID carries sampling noise; "
        "`benchmarks/method_table.py` measures 1000.", "",
    ]))
    return summary
