"""Per-call overhead of the fake-quantized torch UNet: its call time over the FP UNet's, in the same process.

    python benchmarks/call_overhead.py --label after
    PYTHONPATH=<checkout of an older commit>/src python benchmarks/call_overhead.py --label before

Quantizes the shipped model with rtn W8A8 and per-timestep ranges on every activation (`fsc_scope=all`: every
quantizer selects its row of the step table at every call, the case the per-call cost is about), then times
UNet calls at each --batch, FP and quantized interleaved, the median of --repeats each. The ratio is what a
run compares: the machine's noise moves both timings. Each --label's rows are kept in
benchmarks/results/{--name}.{json,md}, so two runs on two versions of the code end up in one table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import tfmq
from tfmq import SamplerConfig, collect_calibration, load_model

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ("label", "batch", "fp_ms", "quantized_ms", "ratio")


def rtn_config(**fields: object):
    """rtn's config in this version of tfmq or an older one (one QuantConfig with a `method` field)."""
    if hasattr(tfmq, "RTNConfig"):
        return tfmq.RTNConfig(**fields)
    return tfmq.QuantConfig(method="rtn", **fields)


def median_ms(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="the version of the code measured, e.g. before / after")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="call_overhead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model("fashion-ddpm")
    sampler = SamplerConfig(name="ddim", steps=20, skip_type="quad", eta=0.0)
    calibration = collect_calibration(model.unet, model.scheduler, 8, sampler, 5, progress=False)
    quantized = tfmq.quantize(model.unet, rtn_config(w_bits=8, a_bits=8, fsc_scope="all"), calibration,
                              progress=False)
    size = model.unet.config.sample_size
    channels = model.unet.config.in_channels
    timestep = calibration.schedule[len(calibration.schedule) // 2]
    rows = []
    with torch.no_grad():
        for batch in args.batch:
            sample = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0))
            timesteps = torch.full((batch,), int(timestep))
            calls = {"fp": lambda: model.unet(sample, timesteps), "quantized": lambda: quantized(sample, timesteps)}
            for call in calls.values():
                call()  # warm-up
            timings: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(3):  # interleaved rounds: a slow spell of the machine hits both
                for name, call in calls.items():
                    timings[name].append(median_ms(call, max(args.repeats // 3, 1)))
            fp, fake = statistics.median(timings["fp"]), statistics.median(timings["quantized"])
            rows.append({"label": args.label, "batch": batch, "fp_ms": fp, "quantized_ms": fake, "ratio": fake / fp})
            print(rows[-1], flush=True)

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    kept = [row for row in (json.loads(path.read_text())["rows"] if path.is_file() else []) if row["label"] != args.label]
    all_rows = kept + rows
    command = "python benchmarks/call_overhead.py " + " ".join(sys.argv[1:])
    path.write_text(json.dumps({"rows": all_rows, "threads": args.threads}, indent=1))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS) + " |"
              for row in all_rows]
    table = "\n".join(lines)
    print(table)
    (RESULTS / f"{args.name}.md").write_text(
        f"# Per-call overhead of the fake-quantized UNet\n\nLast run: `{command}`\n\n"
        f"fashion-ddpm, rtn W8A8 with fsc_scope=all, one UNet call at a mid-schedule timestep, {args.threads} "
        f"torch thread(s), median of {args.repeats} calls in 3 interleaved rounds.\n\n{table}\n")


if __name__ == "__main__":
    main()
