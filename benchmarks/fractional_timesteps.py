"""What serving a fractional timestep at the nearest integer's row costs, on the shipped models' temporal features.

    python benchmarks/fractional_timesteps.py

A schedule-free model has a row for every integer training timestep; a continuous-time scheduler (Euler with
"linspace" spacing) calls the UNet at fractional ones, and tfmq serves those at row round(t). For random
fractional t, the full-precision temporal features of every residual block (all blocks together) at t are
compared with: the features at round(t) (what is served), a linear interpolation of those at floor(t) and
ceil(t) (the alternative), and the 8-bit cache at round(t) (what a `--temporal-cache` model serves); the
8-bit cache's own error at integer t is the yardstick. Relative L2 errors. Writes
benchmarks/results/fractional_timesteps.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tfmq import load_model
from tfmq.files import write_json, write_text_atomic
from tfmq.quant.methods.tfmq import quantize_rows
from tfmq.quant.tib import find_tib
from tfmq.report import format_table

RESULTS = Path(__file__).resolve().parent / "results"


def relative_error(values: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """||values - reference|| / ||reference||, every block's features side by side."""
    joined, joined_reference = (torch.cat([tensors[name] for name in reference], dim=1) for tensors in (values, reference))
    return float((joined - joined_reference).norm() / joined_reference.norm())


@torch.no_grad()
def measure(model_name: str, count: int, seed: int) -> dict:
    unet = load_model(model_name).unet
    tib = find_tib(unet)
    train_timesteps = load_model(model_name).scheduler.config.num_train_timesteps
    integer = tib.temporal_features(torch.arange(train_timesteps))
    timesteps = torch.rand(count, generator=torch.Generator().manual_seed(seed)) * (train_timesteps - 2) + 0.5
    exact = tib.temporal_features(timesteps)
    nearest, lower, upper = timesteps.round().long(), timesteps.floor().long(), timesteps.ceil().long()
    weight = (timesteps - timesteps.floor())[:, None]
    caches = {name: quantize_rows(values, 8).values() for name, values in integer.items()}
    return {
        "model": model_name,
        "nearest_row": relative_error({name: values[nearest] for name, values in integer.items()}, exact),
        "linear_interpolation": relative_error(
            {name: torch.lerp(values[lower], values[upper], weight) for name, values in integer.items()}, exact),
        "cache_8bit_at_nearest_row": relative_error({name: values[nearest] for name, values in caches.items()}, exact),
        "cache_8bit_at_integer_t": relative_error(caches, integer),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["fashion-ddpm", "fashion-cond", "fashion-ldm"])
    parser.add_argument("--count", type=int, default=2000, help="random fractional timesteps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(name, args.count, args.seed) for name in args.models]
    table = format_table(rows, markdown=True)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "fractional_timesteps.json", {"settings": vars(args), "rows": rows})
    write_text_atomic(RESULTS / "fractional_timesteps.md",
                      "# Fractional timesteps served at the nearest integer's row\n\n"
                      f"`python benchmarks/fractional_timesteps.py {' '.join(sys.argv[1:])}`\n\n"
                      f"Relative L2 error of the temporal features (all blocks) at {args.count} random fractional "
                      f"timesteps against the full-precision ones.\n\n{table}\n")


if __name__ == "__main__":
    main()
