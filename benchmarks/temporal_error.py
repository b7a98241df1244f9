"""Where the methods differ: temporal-feature and output error per sampling timestep.

    python benchmarks/temporal_error.py --work runs/benchmark --rows rtn:4:8 qdiff:4:8 tfmq:4:8

Reads the quantized models that `method_table.py` saved in its work folder (and its calibration set) and
measures, at every timestep of the schedule: the relative error of the temporal features (all residual
blocks' `time_emb_proj` outputs together, against full precision) and the relative error of the UNet's
noise prediction on the calibration samples of that step. Prints the means over the early (t >= 500),
middle and late (t < 100) steps and writes the whole curves to benchmarks/results/temporal_error.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tfmq import load_model
from tfmq.files import write_json, write_text_atomic
from tfmq.quant.calibration import CalibrationSet
from tfmq.quant.checkpoint import load_quantized
from tfmq.quant.tib import find_tib
from tfmq.quant.timestep_table import temporal_features_by_timestep
from tfmq.report import format_table

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLES_PER_STEP = 8
COLUMNS = ("row", "temporal_all", "temporal_early", "temporal_late", "output_all", "output_early", "output_mid",
           "output_late")


def relative_errors(values: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row (timestep): ||values - reference|| / ||reference|| over all blocks' features together."""
    error = sum((values[name] - reference[name]).pow(2).sum(dim=1) for name in reference)
    norm = sum(reference[name].pow(2).sum(dim=1) for name in reference)
    return (error / norm).sqrt()


@torch.no_grad()
def output_errors(model: torch.nn.Module, full_precision: torch.nn.Module, calibration: CalibrationSet,
                  schedule: torch.Tensor) -> torch.Tensor:
    """Per timestep of `schedule`: relative error of the noise prediction on that step's samples."""
    errors = []
    for timestep in schedule:
        chosen = calibration.timesteps == timestep
        samples, timesteps = calibration.samples[chosen], calibration.timesteps[chosen]
        reference = full_precision(samples, timesteps).sample
        errors.append(((model(samples, timesteps).sample - reference).norm() / reference.norm()).item())
    return torch.tensor(errors)


def _means(curve: torch.Tensor, schedule: torch.Tensor) -> dict[str, float]:
    parts = {"all": schedule >= 0, "early": schedule >= 500, "mid": (schedule >= 100) & (schedule < 500),
             "late": schedule < 100}
    return {name: float(curve[mask].mean()) for name, mask in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fashion-ddpm")
    parser.add_argument("--work", type=Path, default=Path("runs/benchmark"), help="method_table.py's work folder")
    parser.add_argument("--rows", nargs="+", required=True, help="rows of the method table, e.g. tfmq:4:8")
    parser.add_argument("--name", default="temporal_error")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from method_table import folder_name

    base = load_model(args.model).unet
    calibration = CalibrationSet.load(args.work / "calibration.safetensors").per_step(SAMPLES_PER_STEP)
    schedule = calibration.schedule.long()
    reference = find_tib(base).temporal_features(schedule)
    results, curves = [], {"timesteps": schedule.tolist()}
    for row in args.rows:
        model = load_quantized(args.work / folder_name(row), base)
        temporal = relative_errors(temporal_features_by_timestep(model, schedule), reference)
        output = output_errors(model, base, calibration, schedule)
        curves[row] = {"temporal": temporal.tolist(), "output": output.tolist()}
        summary = {"row": row}
        summary.update({f"temporal_{k}": v for k, v in _means(temporal, schedule).items() if k != "mid"})
        summary.update({f"output_{k}": v for k, v in _means(output, schedule).items()})
        results.append(summary)
        print(format_table([summary], COLUMNS), flush=True)
    table = format_table(results, COLUMNS, markdown=True)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", {"rows": results, "curves": curves})
    command = "python benchmarks/temporal_error.py " + " ".join(sys.argv[1:])
    write_text_atomic(RESULTS / f"{args.name}.md", f"# Error per timestep\n\n`{command}`\n\nRelative errors "
                      f"(||q - fp|| / ||fp||) of the temporal features and of the noise prediction on "
                      f"{SAMPLES_PER_STEP} calibration samples per step, averaged over the steps with t >= 500 "
                      f"(early), 100 <= t < 500 (mid), t < 100 (late).\n\n{table}\n")


if __name__ == "__main__":
    main()
