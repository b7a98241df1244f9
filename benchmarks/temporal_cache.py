"""What the journal version's temporal-feature cache costs in memory and saves in time per sampling run.

    python benchmarks/temporal_cache.py --work runs/benchmark --plain tfmq:4:8 --cached tfmq:4:8:temporal_cache=true

Loads two quantized models that `method_table.py` saved (the same method without and with the cache) and
times whole DDIM sampling runs with each, interleaved and repeated (the median counts), at a large and at a
small batch: the time MLP and the blocks' projections are a fixed cost per UNet call, so the cache matters
most when the batch is small. Also reports the cache's bytes against the TIB weights it replaces.
Writes benchmarks/results/temporal_cache.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from tfmq import SamplerConfig, load_model, sample
from tfmq.files import write_json, write_text_atomic
from tfmq.quant.checkpoint import WEIGHTS_FILE, load_quantized
from tfmq.quant.methods.tfmq import temporal_cache_stats
from tfmq.quant.tib import find_tib
from tfmq.report import format_table

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ("batch", "images", "plain_s", "cached_s", "cached/plain")


def tib_file_bytes(folder: Path, linear_names: tuple[str, ...]) -> int:
    """Bytes the TIB's linears take in a saved model: packed weight codes, biases, quantizer parameters."""
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as weights:
        return sum(weights.get_tensor(key).nbytes for key in weights.keys()
                   if any(key.startswith(name + ".") for name in linear_names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fashion-ddpm")
    parser.add_argument("--work", type=Path, default=Path("runs/benchmark"), help="method_table.py's work folder")
    parser.add_argument("--plain", default="tfmq:4:8")
    parser.add_argument("--cached", default="tfmq:4:8:temporal_cache=true")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="temporal_cache")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from method_table import folder_name

    model = load_model(args.model)
    folders = {kind: args.work / folder_name(row) for kind, row in (("plain", args.plain), ("cached", args.cached))}
    unets = {kind: load_quantized(folder, model.unet) for kind, folder in folders.items()}
    sampler = SamplerConfig(steps=args.steps, skip_type="quad")
    rows = []
    for batch, images in ((64, 64), (1, 4)):
        timings: dict[str, list[float]] = {"plain": [], "cached": []}
        for _ in range(args.repeats):
            for kind, unet in unets.items():
                started = time.perf_counter()
                sample(unet, model.scheduler, images, 0, sampler, batch_size=batch, progress=False)
                timings[kind].append(time.perf_counter() - started)
        plain, cached = statistics.median(timings["plain"]), statistics.median(timings["cached"])
        rows.append({"batch": batch, "images": images, "plain_s": plain, "cached_s": cached,
                     "cached/plain": cached / plain})
        print(format_table([rows[-1]], COLUMNS), flush=True)
    stats = temporal_cache_stats(unets["cached"])
    tib = find_tib(model.unet)
    memory = {"cache_blocks": stats.blocks, "cache_steps": stats.steps, "cache_bytes": stats.bytes,
              "tib_file_bytes": tib_file_bytes(folders["plain"], tib.linear_names),
              "tib_fp32_weight_bytes": sum(p.numel() * 4 for name in tib.linear_names
                                           for p in model.unet.get_submodule(name).parameters()),
              "plain_file_bytes": (folders["plain"] / WEIGHTS_FILE).stat().st_size,
              "cached_file_bytes": (folders["cached"] / WEIGHTS_FILE).stat().st_size}
    table = format_table(rows, COLUMNS, markdown=True)
    memory_table = format_table([memory], tuple(memory), markdown=True)
    print(table)
    print(memory_table)
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", {"timings": rows, "memory": memory, "threads": torch.get_num_threads()})
    command = "python benchmarks/temporal_cache.py " + " ".join(sys.argv[1:])
    write_text_atomic(RESULTS / f"{args.name}.md", f"# Temporal feature cache\n\n`{command}`\n\nDDIM {args.steps} "
                      f"steps, median of {args.repeats} interleaved runs, {torch.get_num_threads()} torch "
                      f"threads.\n\n{table}\n\n{memory_table}\n")


if __name__ == "__main__":
    main()
