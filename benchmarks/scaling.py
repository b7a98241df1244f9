"""One process against several (torchrun, gloo on the CPU) for the three parallel parts of a run: evaluation
sampling, calibration-data generation and block reconstruction, on the shipped fashion-ddpm.

    python benchmarks/scaling.py --processes 1 2 --num 128 --steps 20
    python benchmarks/scaling.py --parts sample --num 512 --name scaling_sampling

Each row is a `tfmq` command run under `torchrun --nproc_per_node N` with one thread a process, so N processes
use N cores; the 1-process row also runs with N threads (what one process makes of the same cores). Wall
seconds include each process's start-up (imports, loading the model), and `sampling_loop_s` is what `tfmq
sample` reports for its sampling loop alone (gathering and writing included); `tfmq quantize` also reports the
seconds of its calibration-data generation and of its quantization, read from the checkpoint's provenance.
Outputs are compared with the 1-process ones: sampled images byte for byte, quantized weights exactly and
within float tolerance. Writes benchmarks/results/scaling.{json,md} (or --name).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from tfmq.files import write_json, write_text_atomic
from tfmq.report import format_table

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("sample", "quantize")


def run(command: list[str], processes: int, threads: int, work: Path) -> tuple[float, str]:
    """Wall seconds and standard output of `tfmq COMMAND` under torchrun with `processes` processes of
    `threads` threads."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                "-m", "tfmq.cli", "--"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run([*launcher, *command, "--quiet"], env=env, cwd=work, check=True, stdout=subprocess.PIPE,
                          text=True)
    return time.perf_counter() - started, done.stdout


def sampling_seconds(output: str) -> float:
    """The seconds `tfmq sample` reports for its sampling loop ("N images in X s"): without start-up."""
    match = re.search(r"images in ([0-9.]+) s", output)
    if match is None:
        raise SystemExit(f"tfmq sample did not report its seconds: {output!r}")
    return float(match.group(1))


def same_images(folder: Path, reference: Path) -> bool:
    names = sorted(path.name for path in reference.glob("*.png"))
    return names == sorted(path.name for path in folder.glob("*.png")) and all(
        (folder / name).read_bytes() == (reference / name).read_bytes() for name in names)


def weight_difference(folder: Path, reference: Path) -> float:
    """Largest absolute difference between two checkpoints' tensors (0.0: identical)."""
    first, second = load_file(str(folder / "quantized.safetensors")), load_file(str(reference / "quantized.safetensors"))
    if first.keys() != second.keys():
        return float("inf")
    return max(float((first[key].double() - second[key].double()).abs().max()) for key in first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num", type=int, default=128, help="images sampled")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--work", type=Path, default=Path("runs/scaling"))
    parser.add_argument("--name", default="scaling")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="which commands to time (sampling alone takes a larger --num in the same time)")
    args = parser.parse_args()
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    cores = max(args.processes)
    common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    rows: list[dict[str, Any]] = []
    settings = [(1, 1), (1, cores)] + [(count, 1) for count in args.processes if count > 1]
    for processes, threads in settings:
        tag = f"{processes}p{threads}t"
        row: dict[str, Any] = {"processes": processes, "threads_each": threads}
        if "sample" in args.parts:
            sample_s, sample_output = run(["sample", "--num", str(args.num), "--out", f"img-{tag}", *common],
                                          processes, threads, args.work)
            row |= {"sample_s": sample_s, "sampling_loop_s": sampling_seconds(sample_output),
                    "images_equal_1p": same_images(args.work / f"img-{tag}", args.work / "img-1p1t")}
        if "quantize" in args.parts:
            quantize_s, _ = run(["quantize", "--method", "qdiff", "--preset", "fast", "--calib-samples",
                                 str(args.calib_samples), "--no-resume", "--out", f"q-{tag}", *common], processes,
                                threads, args.work)
            recorded = json.loads((args.work / f"q-{tag}" / "quantization.json").read_text())["provenance"]
            row |= {"quantize_command_s": quantize_s, "calibration_data_s": recorded["calibration"]["collect_seconds"],
                    "quantize_s": recorded["calibration"]["quantize_seconds"],
                    "max_weight_diff_1p": weight_difference(args.work / f"q-{tag}", args.work / "q-1p1t")}
        rows.append(row)
    base = rows[0]
    for row in rows:
        for key in ("sample_s", "sampling_loop_s", "calibration_data_s", "quantize_s"):
            if key in base:
                row[f"{key.removesuffix('_s')}_speedup"] = base[key] / row[key]
    table = format_table(rows, markdown=True)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", {"settings": vars(args) | {"work": str(args.work)}, "rows": rows})
    write_text_atomic(RESULTS / f"{args.name}.md", f"# Processes: 1 against {cores} (gloo, CPU)\n\n"
                      f"`python benchmarks/scaling.py {' '.join(sys.argv[1:])}`\n\n{table}\n")


if __name__ == "__main__":
    main()
