"""Calibration cost: quality against wall time for qdiff and tfmq at each reconstruction preset.

    pip install -c .ci/constraints.txt -e '.[bench]'
    python benchmarks/calibration_cost.py --num 256 --steps 100 --jobs 2 --calib-seeds 0 1 2 --work runs/cost

Runs the rows `METHOD:W:A:recon_preset=PRESET` (every --methods x --presets, at --bits) through
`method_table.py`, once per calibration set (--calib-seeds, each in its own work folder: same evaluation
seeds, finished rows kept), then writes benchmarks/results/calibration_cost.{json,md} (or --name): the
means over the sets and every set's rows, and a PNG of PSNR to FP against calibration seconds. One set is
not enough to rank presets a few dB apart at W4A8: calibrations on different sets differ by more.
Each row's time is split into capturing the units' inputs and targets, learning (AdaRound and LSQ), the
output correction's pass, and the rest (activation ranges, FSC tables, the temporal cache); `time_x` is the
row's calibration time over the reference row's (--reference, qdiff at `balanced` by default).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from tfmq.files import write_json, write_text_atomic
from tfmq.report import format_table

from method_table import RESULTS  # this folder: scripts run as files
from sampling_args import add_sampling_arguments  # this folder: scripts run as files

COLUMNS = ("row", "method", "preset", "psnr_to_fp", "fid_to_fp", "ssim_to_fp", "fid", "calib_s", "time_x",
           "capture_s", "learn_s", "correction_s", "other_s", "rounding_steps", "units")
MEAN_COLUMNS = ("psnr_to_fp", "fid_to_fp", "ssim_to_fp", "fid", "calib_s", "time_x", "capture_s", "learn_s",
                "correction_s", "other_s", "rounding_steps")


def row_name(method: str, bits: str, preset: str) -> str:
    return f"{method}:{bits}:recon_preset={preset}"


def cost_row(result: dict, method: str, preset: str) -> dict:
    """The quality columns of a method-table row, and where its calibration time went."""
    units = result.get("units", [])
    capture = sum(unit.get("capture_seconds") or 0.0 for unit in units)
    in_units = sum(unit["seconds"] for unit in units)
    correction = result.get("correction_s") or 0.0
    return {key: result.get(key) for key in ("row", "psnr_to_fp", "fid_to_fp", "ssim_to_fp", "fid", "calib_s")} | {
        "method": method, "preset": preset, "capture_s": capture, "learn_s": in_units - capture,
        "correction_s": correction, "other_s": result["calib_s"] - in_units - correction, "units": len(units),
        "rounding_steps": sum(unit.get("rounding_steps") or 0 for unit in units),
    }


def plot(per_seed: list[dict], means: list[dict], path: Path, title: str) -> None:
    """PSNR to FP against calibration seconds: each calibration set's row faint, the means labelled."""
    import matplotlib  # the bench extra; imported here so that --help works without it

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6.4, 4.4))
    for (method, marker), color in zip((("qdiff", "o"), ("tfmq", "s")), ("tab:blue", "tab:orange")):
        each = [row for row in per_seed if row["method"] == method]
        axes.plot([row["calib_s"] for row in each], [row["psnr_to_fp"] for row in each], marker, color=color,
                  alpha=0.3)
        chosen = [row for row in means if row["method"] == method]
        axes.plot([row["calib_s"] for row in chosen], [row["psnr_to_fp"] for row in chosen], marker, color=color,
                  label=f"{method} (mean)")
        for row in chosen:
            axes.annotate(row["preset"], (row["calib_s"], row["psnr_to_fp"]), textcoords="offset points",
                          xytext=(5, -10))
    axes.set_xlabel("calibration wall time (s)")
    axes.set_ylabel("PSNR to full precision (dB)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def seed_rows(args: argparse.Namespace, seed: int, grid: list[tuple[str, str]]) -> tuple[str, list[dict]]:
    """The cost rows of one calibration set (seed `seed`), run by method_table.py in its own work folder,
    each with its time over the reference row of the same run; and the set-up line of that run."""
    rows = [row_name(method, args.bits, preset) for method, preset in grid]
    table_name = f"{args.name}_rows_seed{seed}"
    command = [sys.executable, str(Path(__file__).with_name("method_table.py")), "--model", args.model,
               "--num", str(args.num), "--steps", str(args.steps), "--seed", str(args.seed), "--jobs", str(args.jobs),
               "--calib-seed", str(seed), "--work", str(args.work / f"seed{seed}"), "--name", table_name,
               "--rows", *rows]
    subprocess.run(command, check=True)
    table = json.loads((RESULTS / f"{table_name}.json").read_text())
    by_row = {result["row"]: result for result in table["rows"]}
    missing = [row for row in rows if row not in by_row]
    if missing:
        raise SystemExit(f"method_table.py left out {', '.join(missing)} (see {args.work / f'seed{seed}' / 'rows'})")
    results = [cost_row(by_row[row], method, preset) | {"calib_seed": seed} for row, (method, preset) in zip(rows, grid)]
    reference_method, _, reference_preset = args.reference.partition(":")
    reference = next((row for row in results if (row["method"], row["preset"]) == (reference_method, reference_preset)),
                     None)
    for row in results:
        row["time_x"] = None if reference is None else row["calib_s"] / reference["calib_s"]
    return table["setup"], results


def mean_rows(per_seed: list[dict], grid: list[tuple[str, str]]) -> list[dict]:
    """Each (method, preset)'s mean over the calibration sets, with the lowest and highest PSNR to FP."""
    means = []
    for method, preset in grid:
        rows = [row for row in per_seed if (row["method"], row["preset"]) == (method, preset)]
        mean = {key: (None if any(row[key] is None for row in rows) else sum(row[key] for row in rows) / len(rows))
                for key in MEAN_COLUMNS}
        psnrs = [row["psnr_to_fp"] for row in rows]
        means.append({"row": rows[0]["row"], "method": method, "preset": preset, **mean, "psnr_min": min(psnrs),
                      "psnr_max": max(psnrs), "sets": len(rows)})
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(parser)
    parser.add_argument("--methods", nargs="+", default=["qdiff", "tfmq"])
    parser.add_argument("--presets", nargs="+", default=["auto", "balanced", "fast"])
    parser.add_argument("--bits", default="4:8", help="W:A")
    parser.add_argument("--reference", default="qdiff:balanced", help="METHOD:PRESET the time ratio is to")
    parser.add_argument("--calib-seeds", type=int, nargs="+", default=[0],
                        help="one calibration set per seed, every row calibrated on each")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("runs/calibration_cost"))
    parser.add_argument("--name", default="calibration_cost")
    args = parser.parse_args()

    # Interleaved by preset, so that the two long rows of a preset do not end the run alone.
    grid = [(method, preset) for preset in args.presets for method in args.methods]
    setups, per_seed = [], []
    for seed in args.calib_seeds:
        setup, rows = seed_rows(args, seed, grid)
        setups.append(setup)
        per_seed += rows
    means = mean_rows(per_seed, grid)
    text = format_table(means, ("row", "method", "preset", "sets", *MEAN_COLUMNS, "psnr_min", "psnr_max"),
                        markdown=True)
    per_seed_text = format_table(per_seed, ("calib_seed", *COLUMNS), markdown=True)
    print(text)
    invocation = "python benchmarks/calibration_cost.py " + " ".join(sys.argv[1:])
    setup = (f"{setups[0]}; calibration seeds {', '.join(map(str, args.calib_seeds))}, each a run of its own; "
             f"rows kept in `{args.work}/seed*/rows`")
    write_json(RESULTS / f"{args.name}.json", {"setup": setup, "rows": means, "per_calibration_set": per_seed,
                                                "reference": args.reference})
    plot(per_seed, means, RESULTS / f"{args.name}.png",
         f"{args.model} W{args.bits.replace(':', 'A')}, {args.num} images, {len(args.calib_seeds)} calibration set(s)")
    write_text_atomic(RESULTS / f"{args.name}.md",
                      f"# Calibration cost\n\n`{invocation}`\n\n{setup}\n\nMeans over the calibration sets "
                      f"(`time_x`: calibration time over {args.reference}'s in the same run, averaged):\n\n{text}\n\n"
                      f"Each calibration set:\n\n{per_seed_text}\n\n"
                      f"![PSNR to FP against calibration time]({args.name}.png)\n")


if __name__ == "__main__":
    main()
