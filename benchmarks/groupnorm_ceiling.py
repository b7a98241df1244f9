"""How fast the integer engine could get with GroupNorm + SiLU fused into the quantize before each integer conv,
the one lever left in sight for its speed (README, "Integer inference"), bounded without building that op.

    python benchmarks/groupnorm_ceiling.py

Exports fashion-ddpm's W8A8 graph as integer_inference.py does (RTN, 8-bit weights on the symmetric grid, the
output correction), then two variants whose values are wrong but whose cost bounds a fused op's:
"no norms", every GroupNorm and the SiLU after it gone, as if the fused op cost nothing beyond the quantize it
joins; "one pass", each replaced by one per-channel scale and shift over the tensor, about the fused op's
normalising pass without its statistics pass. Times them beside FP32 torch, one denoiser call at batch 64, in one
process, blocks of `--repeats` calls per engine, three rounds, the median call; speed-ups are FP32 torch time /
engine time. Writes benchmarks/results/groupnorm_ceiling.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import onnx
import torch
from onnx import helper

from tfmq import SamplerConfig, load_model
from tfmq.export import OnnxUNet
from tfmq.export.metadata import DIGEST_KEY, graph_digest
from tfmq.export.timing import time_steps
from tfmq.files import write_json, write_text_atomic
from tfmq.quant.api import quantize
from tfmq.quant.calibration import collect_calibration
from tfmq.quant.config import RTNConfig
from tfmq.report import format_table
from tfmq.sampling import distinct_timesteps, sampling_timesteps

from integer_inference import export_graph, step_inputs  # this folder: scripts run as files
from machine import cpu_description

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ("engine", "ms_per_step", "speedup_vs_torch_fp32", "speedup_vs_graph")
BATCH = 64


def without_group_norms(model: onnx.ModelProto, one_pass: bool) -> int:
    """Cut every GroupNorm of an exported graph (Reshape, InstanceNormalization, ..., BatchNormalization, and a
    SiLU reading it) out of `model`, in place: its readers read the norm's input instead, or with `one_pass` that
    input through the norm's BatchNormalization alone. Re-stamps the digest so tfmq's engines load the result;
    returns how many norms were cut."""
    graph = model.graph
    producer = {output: node for node in graph.node for output in node.output}
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    rerouted: dict[str, str] = {}
    kept: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []
    for norm in [node for node in graph.node if node.op_type == "InstanceNormalization"]:
        source = producer[norm.input[0]].input[0]  # the Reshape into groups reads the GroupNorm's input
        affine = norm
        while affine.op_type != "BatchNormalization":
            (affine,) = readers[affine.output[0]]
        output = affine.output[0]
        after = readers[output]
        if {node.op_type for node in after} == {"Sigmoid", "Mul"}:  # SiLU: x * sigmoid(x)
            output = next(node for node in after if node.op_type == "Mul").output[0]
        if one_pass:
            pass_output = f"{affine.name}/one_pass"
            kept.append((affine, helper.make_node("BatchNormalization", [source, *affine.input[1:]],
                                                  [pass_output], name=pass_output, epsilon=0.0)))
            source = pass_output
        rerouted[output] = source
    nodes = list(graph.node)
    for node in nodes:
        node.input[:] = [rerouted.get(name, name) for name in node.input]
    for affine, node in kept:  # where the norm's own affine was: its inputs are made by then, its readers after
        nodes.insert(nodes.index(affine), node)
    needed = {output.name for output in graph.output}
    live = []
    for node in reversed(nodes):  # drop what nothing reads any more: the cut norms and their constants
        if any(name in needed for name in node.output):
            live.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(live))
    for prop in model.metadata_props:
        if prop.key == DIGEST_KEY:
            prop.value = graph_digest(model)
    return len(rerouted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (quadratic skip) of the exported schedule")
    parser.add_argument("--calibration-images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("runs/groupnorm_ceiling"), help="where the .onnx go")
    parser.add_argument("--name", default="groupnorm_ceiling")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model("fashion-ddpm")
    unet, scheduler = model.unet.eval(), model.scheduler
    sampler = SamplerConfig(steps=args.steps, skip_type="quad")
    schedule = distinct_timesteps(sampling_timesteps(scheduler, sampler))
    calibration = collect_calibration(unet, scheduler, args.calibration_images, sampler, progress=False)
    config = RTNConfig(w_bits=8, a_bits=8, weight_init="symmetric", output_correction=True)
    quantized = quantize(unet, config, calibration, progress=False)
    args.work.mkdir(parents=True, exist_ok=True)
    files = {"w8a8 graph": export_graph(quantized, args.work / "w8a8.onnx", model, sampler, schedule)}
    for name, one_pass in (("no norms", False), ("one pass", True)):
        variant = onnx.load(str(files["w8a8 graph"]))
        cut = without_group_norms(variant, one_pass)
        files[name] = args.work / f"w8a8_{name.replace(' ', '_')}.onnx"
        onnx.save(variant, str(files[name]))
    engines = {"torch fp32": unet, **{name: OnnxUNet(path, threads=args.threads) for name, path in files.items()}}
    seconds = time_steps(engines, step_inputs(model, BATCH, int(schedule[len(schedule) // 2])), args.repeats)
    rows = [{"engine": name, "ms_per_step": value * 1000, "speedup_vs_torch_fp32": seconds["torch fp32"] / value,
             "speedup_vs_graph": seconds["w8a8 graph"] / value} for name, value in seconds.items()]
    print(format_table(rows, COLUMNS), flush=True)
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", {"rows": rows, "norms_cut": cut, "threads": args.threads,
                                                "batch": BATCH, "steps": args.steps})
    command = "python benchmarks/groupnorm_ceiling.py " + " ".join(sys.argv[1:])
    write_text_atomic(RESULTS / f"{args.name}.md", (
        f"# Ceiling of a fused GroupNorm + SiLU + quantize\n\n`{command}`\n\nfashion-ddpm, RTN W8A8 (symmetric "
        f"weights, output correction), CPU {cpu_description()}, {args.threads} threads, batch {BATCH}; {cut} "
        f"GroupNorms cut (\"no norms\": with the SiLU after each; \"one pass\": each a per-channel scale and "
        f"shift). The variants' values are wrong: only their time counts. Median of 3 rounds of {args.repeats} "
        f"calls per engine.\n\n{format_table(rows, COLUMNS, markdown=True)}\n"))


if __name__ == "__main__":
    main()
