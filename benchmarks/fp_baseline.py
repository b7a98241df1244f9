"""Full-precision baseline of the shipped model: quality vs the test set, UNet speed, peak memory.

    python benchmarks/fp_baseline.py --num 1000 --steps 100

Writes benchmarks/results/fp_baseline.{json,md}. Timing and memory come from this same process, so the
figures are comparable as ratios with later rows, not as absolute numbers on a noisy machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tfmq import QualityMetrics, SamplerConfig, load_model, sample
from tfmq.metrics import load_reference_statistics
from tfmq.files import write_json, write_text_atomic
from tfmq.report import format_table

from memory import peak_rss_mb  # this folder: scripts run as files
from sampling_args import add_sampling_arguments  # this folder: scripts run as files

RESULTS = Path(__file__).resolve().parent / "results"


def seconds_per_forward(unet: torch.nn.Module, batch: int, repeats: int = 10) -> float:
    """Median wall time of one UNet call at `batch`, after a warm-up call."""
    size = unet.config.sample_size
    x, t = torch.randn(batch, unet.config.in_channels, size, size), torch.full((batch,), 500)
    timings = []
    with torch.no_grad():
        unet(x, t)
        for _ in range(repeats):
            started = time.perf_counter()
            unet(x, t)
            timings.append(time.perf_counter() - started)
    return sorted(timings)[len(timings) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(parser)
    args = parser.parse_args()

    model = load_model(args.model)
    config = SamplerConfig(steps=args.steps, skip_type="quad")
    forward = seconds_per_forward(model.unet, 64)
    started = time.perf_counter()
    images = sample(model.unet, model.scheduler, args.num, args.seed, config)
    sampling_seconds = time.perf_counter() - started
    scores = QualityMetrics().against_reference(images, load_reference_statistics())
    row = {
        "model": args.model, "images": args.num, "sampler": f"DDIM {args.steps} quad, eta 0",
        "fid": scores["fid"], "sfid": scores["sfid"], "is": scores["is"],
        "s_per_forward_b64": forward, "sampling_s": sampling_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "params_m": sum(p.numel() for p in model.unet.parameters()) / 1e6,
        "torch_threads": torch.get_num_threads(),
    }
    table = format_table([row], markdown=True)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "fp_baseline.json", row)
    write_text_atomic(RESULTS / "fp_baseline.md", f"# Full-precision baseline\n\n`python benchmarks/fp_baseline.py "
                      f"--num {args.num} --steps {args.steps}`\n\n{table}\n")


if __name__ == "__main__":
    main()
