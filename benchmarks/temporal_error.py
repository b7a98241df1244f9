"""Where the methods differ: temporal-feature and output error per sampling timestep, and how far the
sampling trajectories drift from full precision's.

    python benchmarks/temporal_error.py --work runs/benchmark --rows rtn:4:8 qdiff:4:8 tfmq:4:8

Reads the quantized models that `method_table.py` saved in its work folder (its calibration set and sampler
settings too) and measures, at every timestep of the schedule: the relative error of the temporal features
(all residual blocks' `time_emb_proj` outputs together, against full precision), the relative error of the
UNet's noise prediction on the calibration samples of that step (each step on full-precision inputs) and the
share of that error all of them have in common (`output_shared`), and the drift: the relative distance
between the quantized and the full-precision sampler state on the same seeds, where every step's error has
carried into the next. Prints the means over the early (t >= 500),
middle and late (t < 100) steps, the drift halfway and at the end, and writes the whole curves to
benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tfmq import load_model, sample
from tfmq.files import write_json, write_text_atomic
from tfmq.quant.calibration import CalibrationSet
from tfmq.quant.checkpoint import load_quantized
from tfmq.quant.nn.temporal import temporal_features_by_timestep
from tfmq.quant.tib import find_tib
from tfmq.report import format_table

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLES_PER_STEP = 8
DRIFT_IMAGES = 32
COLUMNS = ("row", "temporal_all", "temporal_early", "temporal_late", "output_all", "output_early", "output_mid",
           "output_late", "output_shared", "drift_half", "drift_end")


def relative_errors(values: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row (timestep): ||values - reference|| / ||reference|| over all blocks' features together."""
    error = sum((values[name] - reference[name]).pow(2).sum(dim=1) for name in reference)
    norm = sum(reference[name].pow(2).sum(dim=1) for name in reference)
    return (error / norm).sqrt()


@torch.no_grad()
def output_errors(model: torch.nn.Module, full_precision: torch.nn.Module, calibration: CalibrationSet,
                  schedule: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per timestep of `schedule`: the relative error of the noise prediction on that step's samples, and the
    share of the error that all of them have in common (||mean error||^2 over the mean ||error||^2: 1 when every
    sample errs alike, about 1/n for n independent errors). A shared error is a bias the sampler adds at every
    step; independent ones partly cancel, so two models of equal error can drift apart by very different amounts."""
    errors, shared = [], []
    for timestep in schedule:
        chosen = calibration.timesteps == timestep
        samples, timesteps = calibration.samples[chosen], calibration.timesteps[chosen]
        reference = full_precision(samples, timesteps).sample
        error = model(samples, timesteps).sample - reference
        errors.append((error.norm() / reference.norm()).item())
        shared.append((error.mean(dim=0).pow(2).sum() / error.flatten(1).pow(2).sum(dim=1).mean()).item())
    return torch.tensor(errors), torch.tensor(shared)


@torch.no_grad()
def trajectory(unet: torch.nn.Module, model, settings: argparse.Namespace) -> torch.Tensor:
    """The sampler state the UNet sees at every step, for the first DRIFT_IMAGES evaluation seeds."""
    from method_table import conditioning, sampler_config

    states = []
    sample(unet, model.scheduler, DRIFT_IMAGES, settings.seed, sampler_config(settings), DRIFT_IMAGES, False,
           observer=lambda step, t, x, kwargs: states.append(x.clone()),
           conditioning=conditioning(model, settings, DRIFT_IMAGES, calibration=False))
    return torch.stack(states)


def drift(states: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per step: ||x_q - x_fp|| / ||x_fp|| of the sampler state, averaged over the images."""
    return ((states - reference).flatten(2).norm(dim=2) / reference.flatten(2).norm(dim=2)).mean(dim=1)


def _means(curve: torch.Tensor, schedule: torch.Tensor) -> dict[str, float]:
    parts = {"all": schedule >= 0, "early": schedule >= 500, "mid": (schedule >= 100) & (schedule < 500),
             "late": schedule < 100}
    return {name: float(curve[mask].mean()) for name, mask in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/benchmark"), help="method_table.py's work folder")
    parser.add_argument("--rows", nargs="+", required=True, help="rows of the method table, e.g. tfmq:4:8")
    parser.add_argument("--name", default="temporal_error")
    parser.add_argument("--samples-per-step", type=int, default=SAMPLES_PER_STEP,
                        help="calibration samples per step for the output errors (output_shared's floor is 1/n)")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from method_table import folder_name

    settings = argparse.Namespace(**{"sampler": "ddim", "guidance_scale": 3.0,
                                     **json.loads((args.work / "settings.json").read_text())})
    model = load_model(settings.model)
    base = model.unet
    reference_states = trajectory(base, model, settings)
    calibration = CalibrationSet.load(args.work / "calibration.safetensors").per_step(args.samples_per_step)
    schedule = calibration.schedule.long()
    reference = find_tib(base).temporal_features(schedule)
    results, curves = [], {"timesteps": schedule.tolist()}
    for row in args.rows:
        quantized = load_quantized(args.work / folder_name(row), base)
        temporal = relative_errors(temporal_features_by_timestep(quantized, schedule), reference)
        output, shared = output_errors(quantized, base, calibration, schedule)
        drifted = drift(trajectory(quantized, model, settings), reference_states)
        curves[row] = {"temporal": temporal.tolist(), "output": output.tolist(), "output_shared": shared.tolist(),
                       "drift": drifted.tolist()}
        summary = {"row": row}
        summary.update({f"temporal_{k}": v for k, v in _means(temporal, schedule).items() if k != "mid"})
        summary.update({f"output_{k}": v for k, v in _means(output, schedule).items()})
        summary["output_shared"] = float(shared.mean())
        summary.update(drift_half=float(drifted[len(drifted) // 2]), drift_end=float(drifted[-1]))
        results.append(summary)
        print(format_table([summary], COLUMNS), flush=True)
    table = format_table(results, COLUMNS, markdown=True)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", {"rows": results, "curves": curves})
    command = "python benchmarks/temporal_error.py " + " ".join(sys.argv[1:])
    write_text_atomic(RESULTS / f"{args.name}.md", f"# Error per timestep\n\n`{command}`\n\nRelative errors "
                      f"(||q - fp|| / ||fp||) of the temporal features and of the noise prediction on "
                      f"{args.samples_per_step} calibration samples per step, averaged over the steps with t >= 500 "
                      f"(early), 100 <= t < 500 (mid), t < 100 (late); output_shared: the share of the output error "
                      f"common to a step's samples, averaged over the steps (1/{args.samples_per_step} for independent "
                      f"errors); drift: ||x_q - x_fp|| / ||x_fp|| of the sampler "
                      f"state on the first {DRIFT_IMAGES} evaluation seeds, halfway and at the last step.\n\n{table}\n")


if __name__ == "__main__":
    main()
