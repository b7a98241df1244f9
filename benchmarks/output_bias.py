"""Subtract each step's shared output error while sampling: tfmq's output correction, and a per-element variant.

    python benchmarks/output_bias.py --work runs/cost/seed4 --rows tfmq:4:8:recon_preset=auto

Reads quantized models that `method_table.py` saved in its work folder (its calibration set, sampler settings
and FP images too). For every step of the schedule it measures the quantized model's mean noise-prediction
error against full precision over all of that step's calibration samples: per output channel ("channel": one
number per channel and step, tfmq's `output_correction`, `tfmq.quant.output_correction`) or per output
element ("element": a whole (C, H, W) map per step, this script's own). Then it
samples the evaluation seeds again with that mean subtracted from the quantized model's output at each step
("none" subtracts nothing and reproduces the method table's row) and scores the images against the FP ones.
The calibration trajectories and the evaluation seeds are different draws, so the correction is measured on
images it was not fitted to.

Why: two models of equal one-step error can drift apart by very different amounts when part of the error is
the same for every sample of a step (`temporal_error.py`'s `output_shared`); that part is what a per-step
table can remove. Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tfmq import QualityMetrics, load_model, sample
from tfmq.files import write_json, write_text_atomic
from tfmq.quant.calibration import CalibrationSet
from tfmq.quant.checkpoint import load_quantized
from tfmq.quant.output_correction import calibrate_output_correction
from tfmq.report import format_table

from method_table import RESULTS, folder_name, sampler_config  # this folder: scripts run as files

MODES = ("none", "channel", "element")
COLUMNS = ("row", "correction", "psnr_to_fp", "fid_to_fp", "ssim_to_fp", "table_values", "fit_s")


@torch.no_grad()
def element_errors(model: torch.nn.Module, full_precision: torch.nn.Module,
                   calibration: CalibrationSet) -> dict[int, torch.Tensor]:
    """{timestep: the mean error map (1, C, H, W) of the model's output over that step's calibration samples}."""
    return {int(inputs["timestep"][0]): (model(**inputs).sample - full_precision(**inputs).sample).mean(dim=0, keepdim=True)
            for inputs in calibration.timestep_groups()}


def subtract_step_errors(model: torch.nn.Module, errors: dict[int, torch.Tensor]) -> None:
    """Make every call of `model` return its output less the error of the call's timestep."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        output.sample = output.sample - errors[int(kwargs["timestep"].reshape(-1)[0])]
        return output

    model.register_forward_hook(hook, with_kwargs=True)


def correct(model: torch.nn.Module, full_precision: torch.nn.Module, calibration: CalibrationSet, mode: str,
            samples_per_step: int | None = None) -> int:
    """Give `model` the correction `mode` measured on `calibration` (the channel means on `samples_per_step`
    samples of a step, None: all); how many numbers its table holds."""
    if mode == "channel":
        return calibrate_output_correction(model, full_precision, calibration, samples_per_step=samples_per_step,
                                           progress=False).offsets.numel()
    if mode == "element":
        errors = element_errors(model, full_precision, calibration)
        subtract_step_errors(model, errors)
        return sum(error.numel() for error in errors.values())
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="method_table.py's work folder")
    parser.add_argument("--rows", nargs="+", required=True, help="rows of the method table, e.g. tfmq:4:8")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--samples-per-step", type=int, default=None,
                        help="channel mode: each step's mean over this many of its samples (default: all)")
    parser.add_argument("--name", default="output_bias")
    args = parser.parse_args()

    settings = argparse.Namespace(**{"sampler": "ddim", "guidance_scale": 3.0,
                                     **json.loads((args.work / "settings.json").read_text())})
    model = load_model(settings.model)
    if model.conditioning_kind is not None:
        raise SystemExit("output_bias.py samples unconditional models only")
    calibration = CalibrationSet.load(args.work / "calibration.safetensors")
    fp_images = load_file(str(args.work / "fp_images.safetensors"))["images"]
    results = []
    for row in args.rows:
        for mode in args.modes:
            quantized = load_quantized(args.work / folder_name(row), model.unet)
            started = time.perf_counter()
            table_values = correct(quantized, model.unet, calibration, mode, args.samples_per_step)
            fit_seconds = time.perf_counter() - started
            images = sample(quantized, model.scheduler, settings.num, settings.seed, sampler_config(settings), 64,
                            False)
            paired = QualityMetrics().between(images, fp_images)
            results.append({"row": row, "correction": mode, "psnr_to_fp": paired["psnr"],
                            "fid_to_fp": paired["fid_to_baseline"], "ssim_to_fp": paired["ssim"],
                            "table_values": table_values, "fit_s": fit_seconds})
            print(format_table(results[-1:], COLUMNS), flush=True)
    table = format_table(results, COLUMNS, markdown=True)
    print(table)
    command = "python benchmarks/output_bias.py " + " ".join(sys.argv[1:])
    write_json(RESULTS / f"{args.name}.json", {"work_settings": vars(settings), "rows": results})
    write_text_atomic(RESULTS / f"{args.name}.md", (
        f"# Subtracting each step's shared output error\n\n`{command}`\n\n`{settings.model}`, calibration set "
        f"seed {settings.calib_seed} ({len(calibration)} samples over {len(calibration.schedule)} steps: the mean "
        f"error of each step is taken over {args.samples_per_step or 'all'} of them, the element means over all), {settings.num} images of seed {settings.seed}, DDIM "
        f"{settings.steps}; `table_values`: how many numbers the correction table holds; `fit_s`: seconds to "
        f"measure it (both models over those samples).\n\n{table}\n"))


if __name__ == "__main__":
    main()
