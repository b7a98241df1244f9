"""Real low-bit inference of a shipped model: speed of one denoiser step, file sizes, and image agreement.

    python benchmarks/integer_inference.py --steps 20
    python benchmarks/integer_inference.py --model fashion-dit --steps 20 --name integer_inference_dit

Quantizes the model (default fashion-ddpm) by RTN at W8A8 (8-bit weights on a grid centred on zero, the
`symmetric` weight init, and on the default asymmetric one) and W4A8, with the output correction (off with
`--no-output-correction`; calibration on its own trajectories; a class-conditional model's guided by scale 3
over every class in turn, as `tfmq sample` does by default),
exports the full-precision denoiser and the quantized ones to ONNX, and times one denoiser call at batch 1 and
64 (a conditional model's with class labels) for:
FP32 torch, FP32 onnxruntime, W8A8 onnxruntime with its symmetric weights (exact int8), the same with a UNet's
split shortcut convs exact (`exact_convs=SPLIT_SHORTCUTS`: no output grid per input part) and with asymmetric
weights (exact uint8: slower kernels), W4A8 onnxruntime (4-bit file, int8 kernels), the W4A8 graph as stored (4-bit
weights that onnxruntime dequantizes to float every call), and the fake-quant torch W8A8 model - all in
this process, in blocks of `--repeats` calls, three rounds, the median call; speed-ups are FP32 torch time /
engine time.
Then times a full sampling run at batch 1 and 64 with each engine in its own process (with its peak
memory), samples `--images` images with each integer engine and with its fake-quant torch model from the same
seeds (PSNR between them), and profiles the W4A8 engine (all-s8 weights) per op type at batch 64.
With `--openvino` (the `bench` extra), OpenVINO's CPU runtime joins the per-step table and the image
comparison: the fp32 graph at f32 and at bf16 precision, NNCF's own INT8 post-training quantization of the
fp32 graph (calibrated on the model's trajectories; first and last conv and the time embedding float, transformer
model type: NNCF's defaults give images ~24 dB from fp32) with its float parts at f32 and at bf16 (OpenVINO's
default on a CPU with bf16 units, such as AMX), and our W8A8 (symmetric) and W4A8 QDQ graphs in
tfmq's OpenVINO engine (`tfmq sample --engine openvino`).
Writes benchmarks/results/integer_inference.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
import sys
from collections import defaultdict
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path

import torch

from diffusers.models.unets.unet_2d import UNet2DOutput

from tfmq import SamplerConfig, load_model, sample
from tfmq.arguments import DEFAULT_GUIDANCE_SCALE
from tfmq.export import ExportedGraph, OnnxUNet, export_onnx, trajectory_inputs
from tfmq.export.conv_outputs import integer_conv_names
from tfmq.export.openvino_runtime import OpenVinoUNet
from tfmq.export.timing import time_steps
from tfmq.files import write_json, write_text_atomic
from tfmq.metrics import paired_similarity
from tfmq.quant.api import quantize
from tfmq.quant.calibration import collect_calibration
from tfmq.quant.config import RTNConfig
from tfmq.report import format_table
from tfmq.sampling import distinct_timesteps, sampling_timesteps

from machine import cpu_description  # this folder: scripts run as files
from memory import peak_rss_mb

RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = (1, 64)
SPEED_COLUMNS = ("engine", "batch", "ms_per_step", "speedup_vs_torch_fp32")
QUALITY_COLUMNS = ("engine", "reference", "images", "psnr_db", "ssim")
# A diffusers UNet's up-block shortcuts: the convs whose input is split (upsampled features and skip), two
# output grids each on integer kernels.
SPLIT_SHORTCUTS = "up_blocks.*conv_shortcut"


def step_inputs(model, batch: int, timestep: int) -> dict:
    """One denoiser call of `model` at `batch`: random x_t, the timestep per sample, and for a class-conditional
    model labels cycling through its classes."""
    config = model.unet.config
    inputs = {"sample": torch.randn(batch, config.in_channels, config.sample_size, config.sample_size),
              "timestep": torch.full((batch,), timestep)}
    if model.conditioning_kind == "class":
        inputs["class_labels"] = torch.arange(batch) % model.num_classes
    return inputs


def conditioning_of(model, images: int):
    """What `tfmq sample` conditions `images` images on by default: None, or every class in turn at scale 3."""
    if model.conditioning_kind is None:
        return None
    return model.conditioning(images, guidance_scale=DEFAULT_GUIDANCE_SCALE)


def export_graph(quantized, path: Path, model, sampler: SamplerConfig, schedule: Sequence[int],
                 exact_convs: bool | str = False) -> Path:
    """The integer graph of a fake-quant model for `schedule`, its graph error measured on 8 of its own
    trajectories (conditioned as `tfmq sample` conditions them)."""
    return export_onnx(quantized, path, schedule=schedule, exact_convs=exact_convs,
                       calibration=trajectory_inputs(quantized, model.scheduler, sampler, num_images=8,
                                                     conditioning=conditioning_of(model, 8)),
                       details={"sampler": sampler.to_dict()})


def profile_by_op(engine_path: Path, inputs: dict, threads: int, calls: int = 10) -> list[dict]:
    """onnxruntime's per-node profile of `calls` calls on `inputs`, summed by op type, largest first."""
    engine = OnnxUNet(engine_path, threads=threads, profile=True)
    for _ in range(calls):
        engine(**inputs)
    trace_file = Path(engine.end_profiling())
    trace = json.loads(trace_file.read_text())
    trace_file.unlink()
    totals: dict[str, float] = defaultdict(float)
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
    whole = sum(totals.values())
    return [{"op": op, "ms_per_call": micros / calls / 1000, "share": micros / whole}
            for op, micros in sorted(totals.items(), key=lambda item: -item[1])]


RUN_COLUMNS = ("engine", "images", "batch", "sampling_s", "speedup_vs_torch_fp32", "peak_rss_mb")


def _engine(kind: str, path: str, threads: int):
    """An engine by kind: "torch" (the base model's FP32 UNet; `path` is the model name) or "onnx" (a graph)."""
    if kind == "torch":
        return load_model(path).unet.eval()
    return OnnxUNet(path, threads=threads)


def sampling_run(kind: str, path: str, args: argparse.Namespace, images: int) -> dict:
    """One full sampling run of `images` images in one batch, in this process: seconds and peak RSS (the
    process holds nothing else, so its peak is the engine's)."""
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    engine = _engine(kind, path, args.threads)
    sampler = SamplerConfig(steps=args.steps, skip_type="quad")
    sample(engine, model.scheduler, 1, 0, sampler, progress=False, conditioning=conditioning_of(model, 1))  # warm-up
    started = time.perf_counter()
    sample(engine, model.scheduler, images, 0, sampler, batch_size=images, progress=False,
           conditioning=conditioning_of(model, images))
    return {"sampling_s": time.perf_counter() - started,
            "peak_rss_mb": peak_rss_mb()}


def measured_run(kind: str, path: str, args: argparse.Namespace, images: int) -> dict:
    """`sampling_run` in a child process (for its own peak memory)."""
    worker = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--threads",
              str(args.threads), "--run", kind, path, str(images)]
    output = subprocess.run(worker, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def add_run_arguments(parser: argparse.ArgumentParser, threads: int) -> None:
    """What the inference benchmarks share: the model, its schedule and calibration, the images compared, the
    calls timed and the threads (default `threads`)."""
    parser.add_argument("--model", default="fashion-ddpm")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (quadratic skip) of the exported schedule")
    parser.add_argument("--calibration-images", type=int, default=16)
    parser.add_argument("--images", type=int, default=128, help="images sampled per engine for the PSNR")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, threads=torch.get_num_threads())
    parser.add_argument("--work", type=Path, default=Path("runs/integer_inference"), help="where the .onnx go")
    parser.add_argument("--name", default="integer_inference")
    parser.add_argument("--openvino", action="store_true", help="add OpenVINO engines (needs the bench extra)")
    parser.add_argument("--output-correction", action=argparse.BooleanOptionalAction, default=True,
                        help="take the per-step mean output error off (a Gather and a Sub in the graph)")
    parser.add_argument("--run", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.run is not None:
        kind, path, images = args.run
        print(json.dumps(sampling_run(kind, path, args, int(images))))
        return

    model = load_model(args.model)
    unet, scheduler = model.unet.eval(), model.scheduler
    sampler = SamplerConfig(steps=args.steps, skip_type="quad")
    schedule = distinct_timesteps(sampling_timesteps(scheduler, sampler))
    calibration = collect_calibration(unet, scheduler, args.calibration_images, sampler, progress=False,
                                      conditioning=conditioning_of(model, args.calibration_images))
    correction = {"output_correction": args.output_correction}
    configs = {"w8a8": RTNConfig(w_bits=8, a_bits=8, weight_init="symmetric", **correction),
               "w8a8 asymmetric": RTNConfig(w_bits=8, a_bits=8, **correction),
               "w4a8": RTNConfig(w_bits=4, a_bits=8, **correction)}
    fake_quant = {name: quantize(unet, config, calibration, progress=False) for name, config in configs.items()}
    # graph name: (its fake-quant model, its exact convs)
    graphs = {name: (name, False) for name in fake_quant}
    if any(fnmatchcase(name, SPLIT_SHORTCUTS) for name in integer_conv_names(fake_quant["w8a8"])):
        graphs["w8a8 split exact"] = ("w8a8", SPLIT_SHORTCUTS)
    args.work.mkdir(parents=True, exist_ok=True)
    files = {"fp32": export_onnx(unet, args.work / "fp32.onnx", format="fp32")}
    for name, (quantized, exact_convs) in graphs.items():
        files[name] = export_graph(fake_quant[quantized], args.work / f"{name.replace(' ', '_')}.onnx", model,
                                   sampler, schedule, exact_convs)
    engines = {
        "torch fp32": unet,
        "ort fp32": OnnxUNet(files["fp32"], threads=args.threads),
        "ort w8a8 (symmetric, s8 weights)": OnnxUNet(files["w8a8"], threads=args.threads),
        **({"ort w8a8 split shortcuts exact": OnnxUNet(files["w8a8 split exact"], threads=args.threads)}
           if "w8a8 split exact" in files else {}),
        "ort w8a8 asymmetric (u8 weights)": OnnxUNet(files["w8a8 asymmetric"], threads=args.threads),
        "ort w4a8 (u4 file, s8 at load)": OnnxUNet(files["w4a8"], threads=args.threads),
        "ort w4a8 as stored (u4 DQ to float)": OnnxUNet(files["w4a8"], threads=args.threads, widen_4bit=False),
        "torch fake-quant w8a8": fake_quant["w8a8"],
    }
    openvino_engines = {}
    if args.openvino:
        nncf_int8 = nncf_int8_model(files["fp32"], trajectory_inputs(unet, scheduler, sampler, 8,
                                                                    conditioning=conditioning_of(model, 8)))
        openvino_engines = {
            "openvino fp32 (f32)": OpenVinoBaseline(files["fp32"], args.threads),
            "openvino fp32 (bf16 hint)": OpenVinoBaseline(files["fp32"], args.threads, "bf16"),
            "openvino nncf int8 of fp32 graph": OpenVinoBaseline(files["fp32"], args.threads, model=nncf_int8),
            "openvino nncf int8, bf16 hint": OpenVinoBaseline(files["fp32"], args.threads, "bf16", model=nncf_int8),
            # tfmq's own OpenVINO engine (`--engine openvino`): the graph as onnxruntime's engine runs it
            "openvino tfmq w8a8 graph (s8 weights)": OpenVinoUNet(files["w8a8"], threads=args.threads),
            "openvino tfmq w4a8 graph (s8 at load)": OpenVinoUNet(files["w4a8"], threads=args.threads),
        }
        engines.update(openvino_engines)
    timestep = int(schedule[len(schedule) // 2])
    speed_rows = []
    for batch in BATCHES:
        inputs = step_inputs(model, batch, timestep)
        seconds = time_steps(engines, inputs, args.repeats)
        for name, value in seconds.items():
            speed_rows.append({"engine": name, "batch": batch, "ms_per_step": value * 1000,
                               "speedup_vs_torch_fp32": seconds["torch fp32"] / value})
        print(format_table(speed_rows[-len(seconds):], SPEED_COLUMNS), flush=True)

    sizes = {name: path.stat().st_size for name, path in files.items()}
    size_row = {**{f"{name.replace(' ', '_')}_bytes": size for name, size in sizes.items()},
                "fp32/w8a8": sizes["fp32"] / sizes["w8a8"], "fp32/w4a8": sizes["fp32"] / sizes["w4a8"]}

    quality_rows = []
    run = {"batch_size": args.images, "progress": False, "conditioning": conditioning_of(model, args.images),
           "decoder": model.decoder}
    full_precision = sample(unet, scheduler, args.images, 0, sampler, **run)
    references = {name: sample(quantized, scheduler, args.images, 0, sampler, **run)
                  for name, quantized in fake_quant.items()}
    for name, (quantized, _) in graphs.items():
        engine = OnnxUNet(files[name], threads=args.threads)
        images = sample(engine, scheduler, args.images, 0, sampler, **run)
        quality_rows.append({"engine": f"ort {name}", "reference": f"torch fake-quant {quantized}",
                             "images": args.images, **_similarity(images, references[quantized])})
        quality_rows.append({"engine": f"ort {name}", "reference": "torch fp32", "images": args.images,
                             **_similarity(images, full_precision)})
    for name, engine in openvino_engines.items():
        images = sample(engine, scheduler, args.images, 0, sampler, **run)
        if isinstance(engine, OpenVinoUNet):
            graph = "w8a8" if "w8a8" in name else "w4a8"
            quality_rows.append({"engine": name, "reference": f"torch fake-quant {graph}", "images": args.images,
                                 **_similarity(images, references[graph])})
        quality_rows.append({"engine": name, "reference": "torch fp32", "images": args.images,
                             **_similarity(images, full_precision)})
    for name, images in references.items():
        quality_rows.append({"engine": f"torch fake-quant {name}", "reference": "torch fp32", "images": args.images,
                             **_similarity(images, full_precision)})
    print(format_table(quality_rows, QUALITY_COLUMNS), flush=True)

    run_rows = []
    for batch in BATCHES:
        runs = {"torch fp32": measured_run("torch", args.model, args, batch)}
        runs.update({f"ort {graph}": measured_run("onnx", str(path), args, batch) for graph, path in files.items()})
        for name, run in runs.items():
            run_rows.append({"engine": name, "images": batch, "batch": batch, **run,
                             "speedup_vs_torch_fp32": runs["torch fp32"]["sampling_s"] / run["sampling_s"]})
    print(format_table(run_rows, RUN_COLUMNS), flush=True)

    profile = profile_by_op(files["w4a8"], step_inputs(model, 64, timestep), args.threads)
    details = {name: OnnxUNet(path, threads=1).info.details for name, path in files.items() if name != "fp32"}

    speed_table = format_table(speed_rows, SPEED_COLUMNS, markdown=True)
    size_table = format_table([size_row], tuple(size_row), markdown=True)
    quality_table = format_table(quality_rows, QUALITY_COLUMNS, markdown=True)
    run_table = format_table(run_rows, RUN_COLUMNS, markdown=True)
    profile_table = format_table(profile[:12], ("op", "ms_per_call", "share"), markdown=True)
    print(speed_table, size_table, quality_table, profile_table, sep="\n\n")
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", {
        "speed": speed_rows, "sampling_runs": run_rows, "sizes": size_row, "quality": quality_rows,
        "profile_w4a8_b64": profile,
        "export_details": details, "threads": args.threads, "steps": args.steps, "timestep": timestep,
        "output_correction": args.output_correction})
    command = "python benchmarks/integer_inference.py " + " ".join(sys.argv[1:])
    guided = ("" if model.conditioning_kind is None else
              f"; steps timed with class labels, images sampled with guidance scale {DEFAULT_GUIDANCE_SCALE} "
              "over every class in turn")
    write_text_atomic(RESULTS / f"{args.name}.md", (
        f"# Integer inference (onnxruntime{' and OpenVINO' if args.openvino else ''})\n\n`{command}`\n\n"
        f"{args.model}, RTN quantization{' with the output correction' if args.output_correction else ''}, "
        f"CPU {cpu_description()}, "
        f"DDIM {args.steps} "
        f"steps (quad), {args.threads} threads for torch and onnxruntime, timestep {timestep}; median of 3 "
        f"rounds of {args.repeats} calls per engine{guided}.\n\n## Time per denoiser step\n\n{speed_table}\n\n"
        f"## Full sampling runs ({args.steps} steps, one batch, each engine in its own process)\n\n{run_table}\n\n"
        f"## File sizes\n\n{size_table}\n\n"
        f"## Images vs the fake-quant model and vs fp32 (same seeds)\n\n{quality_table}\n\n"
        f"## Where the W4A8 engine spends its time (batch 64, onnxruntime profile)\n\n{profile_table}\n"))


def nncf_int8_model(path: Path, calibration: list):
    """NNCF's INT8 post-training quantization of the fp32 graph at `path`, calibrated on `calibration` (UNet
    keyword inputs), tuned as a user would: first and last conv float (tfmq's default rules keep conv_in and
    conv_out), the time embedding float (quantized per tensor over all timesteps it ruins the images), and the
    transformer model type (its attention handling); a DiT's time MLPs and final Linear likewise."""
    ov, nncf = _openvino()
    reference = ExportedGraph(path)
    feeds = [reference.feeds(inputs["sample"], inputs["timestep"], class_labels=inputs.get("class_labels"))
             for inputs in calibration]
    model = ov.Core().read_model(str(path))
    convs = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    float_scope = nncf.IgnoredScope(names=[convs[0], convs[-1]], validate=False,
                                    patterns=[".*time_emb.*", ".*timestep_embedder.*", ".*proj_out_2.*"])
    return nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds), ignored_scope=float_scope,
                         model_type=nncf.ModelType.TRANSFORMER)


class OpenVinoBaseline:
    """What a user gets from OpenVINO without tfmq: the fp32 graph at `path` (or `model`, NNCF's INT8 of it)
    compiled at a precision hint, called like `OnnxUNet` (`ExportedGraph.feeds` makes the graph's inputs)."""

    def __init__(self, path: Path, threads: int, precision: str = "f32", model=None):
        ov, _ = _openvino()
        self.reference = ExportedGraph(path)  # the graph's inputs, schedule and model config
        self.config = self.reference.config
        self.compiled = ov.Core().compile_model(model or ov.Core().read_model(str(path)), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"})

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | int, class_labels: torch.Tensor | None = None,
                 return_dict: bool = True):
        feeds = self.reference.feeds(sample, timestep, class_labels=class_labels)
        noise = torch.from_numpy(self.compiled(feeds)[0].copy())
        return UNet2DOutput(sample=noise) if return_dict else (noise,)


def _openvino():
    """OpenVINO and NNCF, or an exit that names the extra that installs them."""
    try:
        import nncf
        import openvino
    except ImportError as exc:
        raise SystemExit(f"--openvino needs OpenVINO and NNCF: pip install -e '.[bench]' ({exc})") from exc
    return openvino, nncf


def _similarity(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    scores = paired_similarity(images, reference)
    return {"psnr_db": scores["psnr"], "ssim": scores["ssim"]}


if __name__ == "__main__":
    main()
