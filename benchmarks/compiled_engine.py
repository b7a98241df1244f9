"""The inductor engine (`CompiledUNet`, `tfmq sample --engine inductor`) against FP32 torch, onnxruntime's integer
graphs and OpenVINO, on one machine, in one process: issue 16's inference targets.

    OMP_NUM_THREADS=1 python benchmarks/compiled_engine.py

Quantizes fashion-ddpm by RTN at W8A8 (8-bit weights on the `symmetric` grid) and W4A8, with the output
correction, as integer_inference.py does, then times one denoiser call at batch 64 (blocks of `--repeats` calls per
engine, three rounds, the median call) for: FP32 torch; the W8A8 and W4A8 models compiled onto oneDNN's integer
kernels (the first call, which compiles, timed apart); onnxruntime running the exported W8A8 graph (all
integer, and with its split shortcut convs exact) and the W4A8 graph; OpenVINO running the FP32 graph at its
bf16 precision hint, and NNCF's INT8 of it at that hint (its default on a CPU with bf16 units; without
`--no-openvino`, which needs the bench extra). Then samples `--images` images (DDIM `--steps`, same seeds) with
every engine and compares them with FP32 torch's and with the fake-quant model's. Speed-ups are ratios of
times in this run. Writes benchmarks/results/compiled_engine.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from tfmq import SamplerConfig, load_model, sample
from tfmq.export import CompiledUNet, OnnxUNet, export_onnx, trajectory_inputs
from tfmq.export.timing import time_steps
from tfmq.files import write_json, write_text_atomic
from tfmq.quant.api import quantize
from tfmq.quant.calibration import collect_calibration
from tfmq.quant.config import RTNConfig
from tfmq.report import format_table
from tfmq.sampling import distinct_timesteps, sampling_timesteps

from integer_inference import (SPLIT_SHORTCUTS, OpenVinoBaseline, _similarity, add_run_arguments,  # this folder
                               export_graph, nncf_int8_model, step_inputs)
from machine import cpu_description

RESULTS = Path(__file__).resolve().parent / "results"
SPEED_COLUMNS = ("engine", "ms_per_step", "speedup_vs_torch_fp32", "speedup_vs_openvino_bf16",
                 "speedup_vs_nncf_int8_bf16")
QUALITY_COLUMNS = ("engine", "reference", "images", "psnr_db", "ssim")
OPENVINO_BF16, NNCF_INT8 = "openvino fp32 (bf16 hint)", "openvino nncf int8 (bf16 hint)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, threads=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--openvino", action=argparse.BooleanOptionalAction, default=True,
                        help="OpenVINO bf16 and NNCF INT8 rows (the bench extra)")
    parser.add_argument("--work", type=Path, default=Path("runs/compiled_engine"), help="where the .onnx go")
    parser.add_argument("--name", default="compiled_engine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.model)
    unet, scheduler = model.unet.eval(), model.scheduler
    sampler = SamplerConfig(steps=args.steps, skip_type="quad")
    schedule = distinct_timesteps(sampling_timesteps(scheduler, sampler))
    calibration = collect_calibration(unet, scheduler, args.calibration_images, sampler, progress=False)
    configs = {"w8a8": RTNConfig(w_bits=8, a_bits=8, weight_init="symmetric", output_correction=True),
               "w4a8": RTNConfig(w_bits=4, a_bits=8, output_correction=True)}
    fake_quant = {name: quantize(unet, config, calibration, progress=False) for name, config in configs.items()}
    args.work.mkdir(parents=True, exist_ok=True)
    graphs = {"ort w8a8": ("w8a8", False), "ort w8a8 split shortcuts exact": ("w8a8", SPLIT_SHORTCUTS),
              "ort w4a8": ("w4a8", False)}
    files = {name: export_graph(fake_quant[quantized], args.work / f"{name.replace(' ', '_')}.onnx", model, sampler,
                                schedule, exact) for name, (quantized, exact) in graphs.items()}
    compiled = {f"inductor {name}": CompiledUNet(quantized, schedule) for name, quantized in fake_quant.items()}
    inputs = step_inputs(model, args.batch, int(schedule[len(schedule) // 2]))
    compile_seconds = {}
    for name, engine in compiled.items():
        started = time.perf_counter()
        engine(**inputs)
        compile_seconds[name] = time.perf_counter() - started
    engines = {"torch fp32": unet, **compiled, **{name: OnnxUNet(path, threads=args.threads)
                                                  for name, path in files.items()}}
    if args.openvino:
        fp32 = export_onnx(unet, args.work / "fp32.onnx", format="fp32", overwrite=True)
        nncf = nncf_int8_model(fp32, trajectory_inputs(unet, scheduler, sampler, 8))
        engines[OPENVINO_BF16] = OpenVinoBaseline(fp32, args.threads, "bf16")
        engines[NNCF_INT8] = OpenVinoBaseline(fp32, args.threads, "bf16", model=nncf)
    seconds = time_steps(engines, inputs, args.repeats)
    speed_rows = [{"engine": name, "ms_per_step": value * 1000, "speedup_vs_torch_fp32": seconds["torch fp32"] / value,
                   "speedup_vs_openvino_bf16": seconds[OPENVINO_BF16] / value if args.openvino else None,
                   "speedup_vs_nncf_int8_bf16": seconds[NNCF_INT8] / value if args.openvino else None}
                  for name, value in seconds.items()]
    print(format_table(speed_rows, SPEED_COLUMNS), flush=True)

    run = {"batch_size": args.batch, "progress": False}
    full_precision = sample(unet, scheduler, args.images, 0, sampler, **run)
    references = {name: sample(quantized, scheduler, args.images, 0, sampler, **run)
                  for name, quantized in fake_quant.items()}
    quality_rows = []
    for name, engine in engines.items():
        if name == "torch fp32":
            continue
        images = sample(engine, scheduler, args.images, 0, sampler, **run)
        quantized = next((graph for graph in references if graph in name), None)
        if quantized is not None:
            quality_rows.append({"engine": name, "reference": f"torch fake-quant {quantized}", "images": args.images,
                                 **_similarity(images, references[quantized])})
        quality_rows.append({"engine": name, "reference": "torch fp32", "images": args.images,
                             **_similarity(images, full_precision)})
    print(format_table(quality_rows, QUALITY_COLUMNS), flush=True)

    speed_table = format_table(speed_rows, SPEED_COLUMNS, markdown=True)
    quality_table = format_table(quality_rows, QUALITY_COLUMNS, markdown=True)
    compile_line = ", ".join(f"{name} {value:.0f} s" for name, value in compile_seconds.items())
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", {"speed": speed_rows, "quality": quality_rows,
                                                "compile_seconds": compile_seconds, "threads": args.threads,
                                                "batch": args.batch, "steps": args.steps})
    command = "python benchmarks/compiled_engine.py " + " ".join(sys.argv[1:])
    write_text_atomic(RESULTS / f"{args.name}.md", (
        f"# The inductor engine against onnxruntime and OpenVINO\n\n`{command}`\n\n{args.model}, RTN with the output "
        f"correction, CPU {cpu_description()}, {args.threads} threads, batch {args.batch}, DDIM {args.steps} steps "
        f"(quad), timestep {int(inputs['timestep'][0])}; median of 3 rounds of {args.repeats} calls per engine. "
        f"First call at this batch (compiling): {compile_line}.\n\n## Time per denoiser step\n\n{speed_table}\n\n"
        f"## Images vs FP32 torch and the fake-quant model (same seeds)\n\n{quality_table}\n"))


if __name__ == "__main__":
    main()
