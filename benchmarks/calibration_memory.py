"""Peak memory of block reconstruction against the calibration-set size and the memory budget.

    python benchmarks/calibration_memory.py --rows 64:2048 256:2048 256:32

A row is `SAMPLES:BUDGET_MB`: qdiff W4A8 (fast preset) on the shipped model with that many calibration
trajectories and `memory_budget_mb`. Every row runs in its own process (its max RSS is its own) and reports
its peak memory (max RSS, and the peak of the memory no file backs), its wall time and how many reconstruction units kept their cached inputs/targets on disk.
Writes benchmarks/results/calibration_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tfmq import SamplerConfig, load_model
from tfmq.files import write_json, write_text_atomic
from tfmq.memory import AnonymousMemoryPeak
from tfmq.quant.api import quantize
from tfmq.quant.calibration import collect_calibration
from tfmq.quant.config import QDiffusionConfig
from tfmq.report import format_table

from memory import peak_rss_mb  # this folder: scripts run as files

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ("samples", "budget_mb", "weight_samples", "units_on_disk", "quantize_s", "peak_rss_mb",
           "peak_anon_mb")


def run_row(samples: int, budget: float, steps: int) -> dict:
    model = load_model("fashion-ddpm")
    calibration = collect_calibration(model.unet, model.scheduler, samples, SamplerConfig(steps=steps, skip_type="quad"),
                                      progress=False)
    config = QDiffusionConfig(w_bits=4, a_bits=8, recon_preset="fast", memory_budget_mb=budget)
    started = time.perf_counter()
    with AnonymousMemoryPeak() as anonymous:
        quantized = quantize(model.unet, config, calibration, progress=False)
    reconstruction = quantized.tfmq_info.method_results["reconstruction"]
    return {"samples": samples, "budget_mb": budget, "weight_samples": len(calibration.for_weights()),
            "units_on_disk": f"{sum(unit['on_disk'] for unit in reconstruction)}/{len(reconstruction)}",
            "quantize_s": time.perf_counter() - started,
            "peak_rss_mb": peak_rss_mb(),
            "peak_anon_mb": anonymous.peak_kb / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=["64:2048", "256:2048", "256:32"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=1, help="rows at once (one thread each when above 1)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        samples, budget = args.worker.split(":")
        print(json.dumps(run_row(int(samples), float(budget), args.steps)))
        return

    env = dict(os.environ, OMP_NUM_THREADS="1") if args.jobs > 1 else None

    def launch(row: str) -> tuple[str, subprocess.Popen]:
        command = [sys.executable, __file__, "--worker", row, "--steps", str(args.steps)]
        return row, subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)

    running = [launch(row) for row in args.rows[:args.jobs]]
    queue, results = list(args.rows[args.jobs:]), []
    while running:
        row, process = running.pop(0)
        output, _ = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"row {row} failed with exit code {process.returncode}")
        results.append(json.loads(output.strip().splitlines()[-1]))
        print(format_table([results[-1]], COLUMNS), flush=True)
        if queue:
            running.append(launch(queue.pop(0)))
    table = format_table(results, COLUMNS, markdown=True)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "calibration_memory.json", {"steps": args.steps, "jobs": args.jobs, "rows": results})
    command = "python benchmarks/calibration_memory.py " + " ".join(sys.argv[1:])
    write_text_atomic(RESULTS / "calibration_memory.md", f"# Reconstruction memory\n\n`{command}`\n\nqdiff W4A8, "
                      f"fast preset, DDIM {args.steps} steps, reconstruction on every 5th step.\n\n{table}\n")


if __name__ == "__main__":
    main()
