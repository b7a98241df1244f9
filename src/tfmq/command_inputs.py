"""What a command reads, from its arguments: its input paths, the model (full precision, quantized or an
exported graph), the sampler, the prompts and the conditioning. Heavy modules load only when asked for."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tfmq.arguments import COMPILED_ENGINE, DEFAULT_GUIDANCE_SCALE
from tfmq.errors import TfmqError

ONNX_DATA_SUFFIX = ".data"  # tfmq.export.metadata's DATA_SUFFIX: a graph's external weights, protected unloaded


def input_paths(args: argparse.Namespace) -> list[Path]:
    """Every existing path the command reads (the model, its configs, a checkpoint, images...): an output may
    never overlap one of them, whatever --overwrite says."""
    from tfmq import __file__ as package_file

    paths = []
    for name in ("model", "model_config", "quantized", "onnx", "prompts", "calib_load", "images", "baseline",
                 "autoencoder", "data_dir", "reference"):
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if value is None:
                continue
            zoo = Path(package_file).parent / "zoo" / str(value)
            # a graph's external weights are read with it
            beside = [Path(f"{value}{ONNX_DATA_SUFFIX}")] if name == "onnx" else []
            for path in (Path(value), zoo, *beside):
                if os.path.lexists(path):
                    paths.append(path)
    return paths


def sampler_config(args: argparse.Namespace):
    from tfmq.sampling import SamplerConfig

    return SamplerConfig(name=args.sampler, steps=args.steps, eta=args.eta, skip_type=args.skip_type)


def guidance_scale(args: argparse.Namespace, model) -> float:
    if args.guidance_scale is not None:
        return args.guidance_scale
    return DEFAULT_GUIDANCE_SCALE if model.conditioning_kind is not None else 1.0


def conditioning_of(args: argparse.Namespace, model, num_images: int, prompts: list[str] | None):
    """The per-image conditions of a conditional model from `prompts`, --class-label and --guidance-scale
    (None for an unconditional model)."""
    return model.conditioning(num_images, prompts=prompts, labels=args.class_label,
                              guidance_scale=guidance_scale(args, model))


def base_model(args: argparse.Namespace, recorded: dict | None = None):
    """--model (a single-file checkpoint with --model-config), else the base model a quantized folder or an
    exported graph recorded, else fashion-ddpm."""
    from tfmq.devices import resolve_device, resolve_dtype
    from tfmq.models.loading import load_model

    device = resolve_device(getattr(args, "device", "cpu"))  # before loading: a missing GPU fails at once
    dtype = resolve_dtype(getattr(args, "dtype", None) or (recorded or {}).get("dtype"))
    if args.model is not None:
        model = load_model(args.model, config=args.model_config)
    else:
        recorded = recorded or {"source": "fashion-ddpm"}
        model = load_model(recorded["source"], config=args.model_config or recorded.get("config") or None)
    return model.to(device, dtype)


def load_unet(args: argparse.Namespace):
    """The model to sample from: the full-precision one, or a quantized checkpoint on its base model."""
    from tfmq.quant.checkpoint import load_quantized, read_metadata

    if args.quantized is None:
        model = base_model(args)
        return model, model.unet, model.source
    model = base_model(args, read_metadata(args.quantized)["provenance"]["base_model"])
    return model, load_quantized(args.quantized, model.unet), str(args.quantized)


def check_timesteps_served(unet, scheduler, config) -> None:
    """A TfmqError unless the quantized `unet`'s timestep tables (if any) serve every timestep `config` visits."""
    from tfmq.quant.nn import timestep_tables
    from tfmq.sampling import sampling_timesteps

    tables = timestep_tables(unet)
    if tables is not None:
        try:
            tables.check_serves(sampling_timesteps(scheduler, config))
        except ValueError as exc:
            raise TfmqError(str(exc)) from exc


def load_engine(args: argparse.Namespace, config):
    """An exported graph in the runtime of --engine, with the model it was exported from (for its scheduler,
    decoder and conditioning); the sampler must be the one the graph's timestep table was exported for, unless
    the graph is schedule-free. --engine inductor: the --quantized folder compiled for the sampler's timesteps."""
    from tfmq.export import graph_engine

    if args.engine == COMPILED_ENGINE:
        return _compiled_engine(args, config)
    if args.onnx is None:
        raise TfmqError(f"--engine {args.engine} needs --onnx unet.onnx (written by `tfmq export`)")
    if args.quantized is not None:
        raise TfmqError(f"--engine {args.engine} runs the exported graph: give --onnx, not --quantized")
    engine = graph_engine(args.onnx, args.engine, threads=args.threads)
    exported_with = engine.info.details.get("sampler")
    if (engine.info.schedule is not None and not engine.schedule_free and exported_with is not None
            and exported_with != config.to_dict()):
        raise TfmqError(f"{args.onnx} serves the timesteps of sampler {exported_with}; sample with those settings")
    details = engine.info.details
    model = base_model(args, {"source": details.get("base_model", "fashion-ddpm"),
                               "config": details.get("base_model_config")})
    return model, engine, str(args.onnx)


def _compiled_engine(args: argparse.Namespace, config):
    if args.onnx is not None or args.quantized is None:
        raise TfmqError(f"--engine {COMPILED_ENGINE} compiles a quantized model: give --quantized (a folder written "
                        "by `tfmq quantize`), not --onnx")
    if args.threads is not None:  # the engine runs on torch's own threads
        import torch

        torch.set_num_threads(args.threads)
    model, unet, source = load_unet(args)
    check_timesteps_served(unet, model.scheduler, config)
    return model, compiled_engine(unet, model, config=config), source


def bench_engines(args: argparse.Namespace) -> tuple:
    """What `tfmq bench` times: the model, its engines by name (FP32 torch first), and the bytes of each --onnx
    graph's files."""
    from tfmq.export import graph_engine

    if args.inductor and args.quantized is None:  # before loading the model and its graphs
        raise TfmqError(f"the {COMPILED_ENGINE} engine compiles a quantized model: give --quantized (a folder "
                        "written by `tfmq quantize`)")
    model, quantized, _ = load_unet(args)
    engines: dict = {"torch fp32": model.unet}
    files = {}
    if args.quantized is not None:
        engines["torch fake-quant"] = quantized
    for path in args.onnx:
        for runtime in args.runtimes:
            engine = graph_engine(path, runtime, threads=args.threads)
            engines[f"{runtime} {engine.info.format} {path.name}"] = engine
        files[path.name] = sum(file.stat().st_size for file in engine.files)
    if args.inductor:
        engines[f"{COMPILED_ENGINE} int8"] = compiled_engine(quantized, model, engines.values())
    return model, engines, files


def compiled_engine(unet, model, engines=(), config=None):
    """The quantized `unet` compiled onto oneDNN's integer kernels (`sample --engine inductor`, `bench --inductor`)
    for the schedule of the first integer engine among `engines`, else its timestep tables' (which serve any
    sampler they were checked against), else the timesteps of `config`'s sampler (default settings if None)."""
    from tfmq.export import CompiledUNet
    from tfmq.quant.nn import timestep_tables
    from tfmq.sampling import SamplerConfig, distinct_timesteps, sampling_timesteps

    schedules = [engine.rows.schedule for engine in engines if getattr(engine, "rows", None) is not None]
    if schedules:
        schedule = schedules[0]
    elif timestep_tables(unet) is not None:
        schedule = None
    else:
        schedule = distinct_timesteps(sampling_timesteps(model.scheduler, config or SamplerConfig()))
    return CompiledUNet(unet, schedule)


def prompts_of(args: argparse.Namespace) -> list[str]:
    """--prompt values, then the prompts of the --prompts file."""
    from tfmq.data.captions import read_prompts

    return list(args.prompt or []) + (read_prompts(args.prompts, args.num_prompts) if args.prompts else [])
