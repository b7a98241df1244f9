"""The `tfmq` command: parses arguments and calls the library; user errors end in one line and exit 2."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

from tfmq.arguments import (
    COMPILED_ENGINE,
    GRAPH_ENGINES,
    Parser,
    add_device_arguments,
    add_model_config_argument,
    add_overwrite_argument,
    add_sampler_arguments,
    finite_positive,
    non_negative,
    one_line,
    positive,
)
from tfmq.command_inputs import (base_model, bench_engines, check_timesteps_served, conditioning_of, guidance_scale,
                                 input_paths, load_engine, load_unet, prompts_of, sampler_config)
from tfmq.errors import TfmqError
from tfmq.method_arguments import add_method_arguments

REFERENCE_NAME = "fashion-mnist-test"
METRICS_FILE = "metrics.json"  # tfmq.evaluation's, named here too so `eval --json` is checked before torch loads
# The kinds of tfmq.images and tfmq.quant.checkpoint, named here so the CLI checks --out before importing torch.
IMAGES_KIND = "images"
CHECKPOINT_KIND = "quantized-model"
TRAINED_MODEL_KIND = "trained-model"
SHARDED_COMMANDS = ("sample", "quantize")  # the commands that share their work between torchrun's processes


def _output_folder(args: argparse.Namespace, path: Path, kind: str) -> Path:
    from tfmq.files import check_output_folder

    return check_output_folder(path, kind, overwrite=args.overwrite, protected=input_paths(args))


def _output_file(args: argparse.Namespace, path: Path | None, owned) -> Path | None:
    from tfmq.files import check_output_file

    if path is None:
        return None
    return check_output_file(path, owned, overwrite=args.overwrite, protected=input_paths(args))


def _cmd_sample(args: argparse.Namespace) -> None:
    from tfmq import distributed
    from tfmq.evaluation import model_identity, sample_folder
    from tfmq.files import check_output_folder
    from tfmq.images import PROGRESS_KIND, progress_folder
    from tfmq.models.loading import cycled
    from tfmq.sampling import check_sample

    _output_folder(args, args.out, IMAGES_KIND)
    check_output_folder(progress_folder(args.out), PROGRESS_KIND, protected=input_paths(args))  # absent, or a run's
    config = sampler_config(args)
    if args.engine != "torch":
        model, unet, source = load_engine(args, config)
    else:
        model, unet, source = load_unet(args)
    check_sample(unet, model.scheduler, args.num, args.seed, config, args.batch_size)  # before encoding prompts
    if args.engine == "torch":
        check_timesteps_served(unet, model.scheduler, config)
    prompts = prompts_of(args)
    conditioning = conditioning_of(args, model, args.num, prompts)
    metadata = {"model": source, "seed": args.seed, "sampler": config.to_dict()}
    if conditioning is not None:
        metadata["guidance_scale"] = conditioning.guidance_scale
        if "class_labels" in conditioning.per_image:
            metadata["class_labels"] = conditioning.per_image["class_labels"].tolist()
        else:
            metadata["prompts"] = cycled(prompts, args.num)
    identity = {"torch": unet, COMPILED_ENGINE: getattr(unet, "graph", None)}.get(args.engine, args.onnx)
    digest = model_identity(identity, model.autoencoder)
    done = sample_folder(unet, model.scheduler, args.out, args.num, args.seed, config, args.batch_size,
                         model_digest=digest, metadata=metadata, conditioning=conditioning, decoder=model.decoder,
                         progress=not args.quiet and distributed.is_main(), overwrite=args.overwrite,
                         protected=input_paths(args))
    if done is not None:  # rank 0 writes and reports
        kept = f" ({done.kept} kept from an interrupted run)" if done.kept else ""
        print(f"{done.num_images} images in {done.seconds:.1f} s{kept} -> {done.path} (grid: {done.path / 'grid.png'})")


def _cmd_export(args: argparse.Namespace) -> None:
    from tfmq.export import export_onnx, owned_graph, trajectory_inputs
    from tfmq.quant.nn import timestep_tables, training_schedule
    from tfmq.sampling import distinct_timesteps, sampling_timesteps

    _output_file(args, args.out, owned_graph)
    config = sampler_config(args)
    model, unet, source = load_unet(args)
    details = {"model": source, "base_model": model.source, "sampler": config.to_dict()}
    if "config" in model.reference:
        details["base_model_config"] = model.reference["config"]
    exact_convs = True if args.exact_convs == [] else args.exact_convs or False  # the bare flag: all
    if args.quantized is None:
        path = export_onnx(unet, args.out, format="fp32", opset=args.opset, exact_convs=exact_convs,
                           requantize_weights=args.requantize_weights, details=details, overwrite=args.overwrite)
    else:
        calibration = None if exact_convs is True else trajectory_inputs(
            unet, model.scheduler, config, num_images=args.calibration_images,
            conditioning=conditioning_of(args, model, args.calibration_images,
                                       prompts_of(args) or model.calibration_prompts()))
        schedule_free = args.schedule_free or getattr(timestep_tables(unet), "schedule_free", False)
        schedule = (training_schedule(model.scheduler.config.num_train_timesteps) if schedule_free
                    else distinct_timesteps(sampling_timesteps(model.scheduler, config)))
        path = export_onnx(unet, args.out, schedule=schedule,
                           calibration=calibration, opset=args.opset, exact_convs=exact_convs,
                           requantize_weights=args.requantize_weights, details=details,
                           overwrite=args.overwrite)
    from tfmq.export.metadata import data_file_of

    data = data_file_of(path)
    size = path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
    print(f"{path} ({size / 1e6:.2f} MB{f', weights in {data.name}' if data.is_file() else ''})")


def _cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from tfmq.export.timing import time_engines
    from tfmq.files import owned_json, stamped, write_json
    from tfmq.report import format_table

    _output_file(args, args.json, owned_json)
    model, engines, files = bench_engines(args)
    timestep, rows = time_engines(model, engines, args.batch, args.repeats)
    print(format_table(rows, ("engine", "batch", "ms_per_step", "speedup_vs_torch_fp32")))
    fp32_bytes = sum(p.numel() * p.element_size() for p in model.unet.parameters())
    for name, size in files.items():
        print(f"{name}: {size / 1e6:.2f} MB ({fp32_bytes / size:.1f}x smaller than the fp32 UNet weights)")
    if args.json is not None:
        write_json(args.json, stamped({"timestep": timestep, "threads": torch.get_num_threads(), "rows": rows,
                                       "file_bytes": files, "fp32_weight_bytes": fp32_bytes}))


def _cmd_eval(args: argparse.Namespace) -> None:
    from tfmq.devices import resolve_device
    from tfmq.evaluation import SampleFolder, check_paired, evaluate_folder
    from tfmq.files import add_to_output_folder, owned_json, stamped, write_json
    from tfmq.metrics import QualityMetrics, load_reference_statistics
    from tfmq.report import format_table

    out = _output_file(args, args.json or Path(args.images) / METRICS_FILE, owned_json)
    metrics = QualityMetrics(device=resolve_device(args.device))  # before reading images: a missing GPU fails at once
    samples = SampleFolder.load(args.images)
    baseline = None if args.baseline is None else SampleFolder.load(args.baseline)
    reference = None if args.reference == "none" else (
        load_reference_statistics() if args.reference == REFERENCE_NAME else load_reference_statistics(args.reference)
    )
    if baseline is not None:
        check_paired(samples, baseline)  # before the reference scores' minutes
    result = evaluate_folder(samples, baseline, reference, metrics)
    write_json(out, stamped(result))
    if out.absolute().parent == Path(args.images).absolute():
        add_to_output_folder(Path(args.images), out.name)
    print(format_table([{k: v for k, v in result.items() if k not in ("images", "baseline")}]))
    print(f"written to {out}")


def _cmd_quantize(args: argparse.Namespace) -> None:
    from tfmq import distributed
    from tfmq.files import check_output_folder, owned_safetensors
    from tfmq.pipeline import CalibrationSettings, calibrate, checkpoint_folder, quantize_and_save
    from tfmq.quant.config import QDiffusionConfig
    from tfmq.quant.methods.resume import RESUME_KIND, finished_units
    from tfmq.quant.calibration import CalibrationSet
    from tfmq.method_arguments import config_from_arguments
    from tfmq.quant.wrap import layers_to_quantize
    from tfmq.report import format_table
    from tfmq.sampling import sampling_timesteps

    config = config_from_arguments(args)
    _output_folder(args, args.out, CHECKPOINT_KIND)
    check_output_folder(checkpoint_folder(args.out), RESUME_KIND)  # absent, or the checkpoints of a run
    _output_file(args, args.calib_save, owned_safetensors)
    sampler = sampler_config(args)
    model = base_model(args)
    if args.schedule_free:
        config = config_from_arguments(args, model.scheduler.config.num_train_timesteps)
    if distributed.is_active():  # each rank read its own files
        from tfmq.quant.provenance import model_fingerprint

        distributed.check_same_on_all_ranks(model_fingerprint(model.unet), "the model")
    progress = not args.quiet and distributed.is_main()
    # what would fail after the calibration work fails now: the step count, layer rules that keep everything
    sampling_timesteps(model.scheduler, sampler)
    config.check_model(model.unet)
    try:
        layers_to_quantize(model.unet, config)
    except ValueError as exc:
        raise TfmqError(str(exc)) from exc
    prompts = prompts_of(args) or model.calibration_prompts()

    def conditioning_for(count: int):
        return conditioning_of(args, model, count, prompts)

    if args.calib_load is not None:
        calibration = CalibrationSet.load(args.calib_load)
        calibration.check_made_for(model.unet, sampler, guidance_scale(args, model))
    else:
        given = {field: getattr(args, field) for field in ("num_samples", "interval_length") if field in args}
        settings = CalibrationSettings(sampler=sampler, seed=args.seed, batch_size=args.batch_size,
                                       memory_budget_mb=getattr(config, "memory_budget_mb", None), **given)
        calibration = calibrate(model, settings, conditioning_for, progress=progress)
        if args.calib_save is not None and distributed.is_main():  # every rank holds the whole set
            calibration.save(args.calib_save)
    resumable = not args.no_resume and isinstance(config, QDiffusionConfig)  # the methods that reconstruct
    finished = finished_units(checkpoint_folder(args.out)) if resumable else 0
    if finished and distributed.is_main():
        print(f"continuing from {finished} finished reconstruction units in {checkpoint_folder(args.out)}",
              file=sys.stderr)
    _, report = quantize_and_save(model, config, calibration, args.out, conditioning_for=conditioning_for,
                                  overwrite=args.overwrite, progress=progress, resumable=resumable)
    if report is None:  # another rank saved the model and reports
        return
    print(format_table([report.row()]))
    out = report.out
    print(f"quantized model -> {out}")
    if getattr(config, "recon_preset", None) == "fast":
        print("(--preset fast: --preset balanced reconstructs 10x longer, for 3-5x the time, and came 3-13 dB "
              "closer to full precision on the shipped models; see the README)")


def _cmd_demo(args: argparse.Namespace) -> None:
    from tfmq.demo import COMPARISON_FILE, DEMO_KIND, REPORT_FILE, DemoSettings, run_demo
    from tfmq.report import format_table

    _output_folder(args, args.out, DEMO_KIND)
    settings = DemoSettings(**{field: getattr(args, field) for field in ("num_images", "steps", "seed") if field in args})
    summary = run_demo(args.out, settings, progress=not args.quiet, overwrite=args.overwrite)
    print(format_table(summary["rows"], ["model", "fid", "sfid", "is", "fid_to_fp", "psnr_to_fp", "ssim_to_fp"]))
    print(f"weights {summary['fp32_unet_mb']:.2f} MB fp32 -> {summary['quantized_file_mb']:.2f} MB; "
          f"quantization {summary['quantize_s']:.0f} s; total {summary['total_s']:.0f} s")
    print(f"picture: {args.out / COMPARISON_FILE}   report: {args.out / REPORT_FILE}")


def _cmd_reference_stats(args: argparse.Namespace) -> None:
    from tfmq.data import load_fashion_mnist
    from tfmq.files import owned_safetensors
    from tfmq.metrics import QualityMetrics, save_reference_statistics
    from tfmq.models.architectures import FASHION_RESOLUTION

    _output_file(args, args.out, owned_safetensors)
    images, _ = load_fashion_mnist("test", FASHION_RESOLUTION, args.data_dir)
    save_reference_statistics(QualityMetrics().reference_statistics(images), args.out)
    print(f"reference statistics of {len(images)} test images -> {args.out}")


def _cmd_train(args: argparse.Namespace) -> None:
    from tfmq.models import latent_training, training

    _output_folder(args, args.out, TRAINED_MODEL_KIND)
    common = {"steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr, "seed": args.seed,
              "data_dir": args.data_dir, "overwrite": args.overwrite}
    if args.what == "classifier":
        record = training.train_classifier(args.out, epochs=args.epochs, seed=args.seed, data_dir=args.data_dir,
                                           overwrite=args.overwrite)
        print(f"test accuracy {record['test_accuracy']:.4f}, {record['wall_seconds']} s -> {args.out}")
        return
    if args.what == "ddpm":
        out = training.train_ddpm(args.out, args.work_dir, **common)
    elif args.what == "autoencoder":
        out = latent_training.train_autoencoder(args.out, args.work_dir, **common)
    else:
        if args.autoencoder is None:
            raise TfmqError(f"training {args.what} needs --autoencoder (a folder written by `tfmq train autoencoder`)")
        if args.what == "dit":
            out = latent_training.train_dit(args.out, args.work_dir, args.autoencoder, **common)
        else:
            out = latent_training.train_latent_diffusion(args.out, args.work_dir, args.autoencoder,
                                                         conditional=args.what == "cond", **common)
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tfmq", description="Post-training quantization of diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)

    sample = commands.add_parser("sample", help="sample images (PNGs, a grid, samples.json) from a model")
    sample.add_argument("--model", default=None,
                        help="shipped model name, diffusers-layout folder or single-file checkpoint (default "
                             "fashion-ddpm, or the base model recorded in --quantized)")
    add_model_config_argument(sample)
    add_device_arguments(sample)
    sample.add_argument("--quantized", type=Path, default=None, help="a folder written by `tfmq quantize`")
    sample.add_argument("--num", type=positive, default=64, help="number of images")
    sample.add_argument("--out", type=Path, required=True,
                        help="output folder (written whole when done; the finished batches wait in OUT.tfmq-progress, "
                             "and the same command continues an interrupted run)")
    add_overwrite_argument(sample)
    sample.add_argument("--quiet", action="store_true", help="no progress bars")
    sample.add_argument("--engine", choices=("torch", *GRAPH_ENGINES, COMPILED_ENGINE), default="torch",
                        help="run the graph of `tfmq export` (--onnx) on onnxruntime or openvino (its extra), or "
                             "--quantized compiled onto oneDNN's integer kernels (inductor)")
    sample.add_argument("--onnx", type=Path, default=None, help="the exported graph (--engine onnxruntime/openvino)")
    sample.add_argument("--threads", type=positive, default=None, help="integer engine threads (default: torch's)")
    add_sampler_arguments(sample)
    sample.set_defaults(func=_cmd_sample)

    export = commands.add_parser("export", help="export a quantized UNet or DiT (or with no folder the FP32 one) to "
                                 "ONNX QDQ for onnxruntime's integer kernels")
    export.add_argument("quantized", type=Path, nargs="?", default=None,
                        help="a folder written by `tfmq quantize` (omit: the FP32 graph of --model)")
    export.add_argument("--model", default=None, help="base model (default: the one recorded in the folder)")
    add_model_config_argument(export)
    export.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    add_overwrite_argument(export)
    export.add_argument("--opset", type=int, default=21)
    export.add_argument("--exact-convs", nargs="*", default=None, metavar="PATTERN",
                        help="convs in float on dequantized operands (exact, not faster): all, or those whose "
                             "names match, e.g. 'up_blocks.*conv_shortcut'")
    export.add_argument("--requantize-weights", action="store_true", help="8-bit weights onto int8: fast "
                        "kernels, approximate (exact: quantize with --weight-init symmetric)")
    export.add_argument("--calibration-images", type=positive, default=8,
                        help="trajectories that calibrate the integer convs' output grids")
    export.add_argument("--schedule-free", action="store_true",
                        help="a temporal table for every training timestep, so the graph serves any sampler "
                             "(implied for a model quantized with --schedule-free)")
    add_sampler_arguments(export)
    export.set_defaults(func=_cmd_export)

    bench = commands.add_parser("bench", help="time one denoiser step: FP32 torch against fake-quant and exported "
                                "graphs, same process, as ratios")
    bench.add_argument("--model", default=None, help="base model (default fashion-ddpm, or --quantized's)")
    add_model_config_argument(bench)
    add_device_arguments(bench, dtype=False)
    bench.add_argument("--quantized", type=Path, default=None, help="also time the fake-quant model of this folder")
    bench.add_argument("--onnx", type=Path, nargs="*", default=[], help="graphs written by `tfmq export`")
    bench.add_argument("--batch", type=positive, nargs="+", default=[1, 64])
    bench.add_argument("--repeats", type=positive, default=10, help="calls per engine per round (3 rounds)")
    bench.add_argument("--runtimes", nargs="+", choices=GRAPH_ENGINES, default=["onnxruntime"],
                       help="the runtimes that run each --onnx graph (openvino: the openvino extra)")
    bench.add_argument("--threads", type=positive, default=None, help="graph engine threads (default: torch's)")
    bench.add_argument("--inductor", action="store_true", help="also time --quantized compiled onto oneDNN's integer "
                       "kernels, for the schedule of the first --onnx graph (default: the model's, else the sampler's)")
    bench.add_argument("--json", type=Path, default=None, help="also write the table here")
    add_overwrite_argument(bench)
    bench.set_defaults(func=_cmd_bench)

    quantize = commands.add_parser("quantize", help="quantize a model's UNet (calibrating on its own samples)")
    quantize.add_argument("--model", default="fashion-ddpm",
                          help="shipped model name, diffusers-layout folder, or single-file checkpoint")
    add_model_config_argument(quantize)
    add_device_arguments(quantize)
    add_method_arguments(quantize)
    quantize.add_argument("--calib-samples", dest="num_samples", type=positive, default=argparse.SUPPRESS,
                          help="calibration trajectories (seeds; default 64); every step of each is recorded")
    quantize.add_argument("--interval-length", type=positive, default=argparse.SUPPRESS,
                          help="weight reconstruction uses every n-th sampling step (default 5; paper: "
                               "--interval_length)")
    quantize.add_argument("--calib-save", type=Path, default=None,
                          help="save the calibration set (paper: --cali_save_path)")
    quantize.add_argument("--calib-load", type=Path, default=None,
                          help="reuse a saved calibration set (paper: --cali_data_path)")
    quantize.add_argument("--out", type=Path, required=True, help="output folder (written whole when done)")
    add_overwrite_argument(quantize)
    quantize.add_argument("--quiet", action="store_true", help="no progress bars")
    quantize.add_argument("--no-resume", action="store_true",
                          help="keep no per-unit checkpoints (default: qdiff/tfmq checkpoint each reconstruction "
                               "unit in OUT.tfmq-checkpoints, and the same command continues an interrupted run)")
    add_sampler_arguments(quantize)
    quantize.set_defaults(func=_cmd_quantize)

    demo = commands.add_parser("demo", help="quantize the shipped model with TFMQ W4A8 and compare it with FP")
    demo.add_argument("--out", type=Path, default=Path("tfmq-demo"), help="output folder (written whole when done)")
    add_overwrite_argument(demo)
    demo.add_argument("--num", dest="num_images", type=positive, default=argparse.SUPPRESS,
                      help="images per model (same seeds; default 256)")
    demo.add_argument("--steps", type=positive, default=argparse.SUPPRESS, help="DDIM steps (default 100)")
    demo.add_argument("--seed", type=non_negative, default=argparse.SUPPRESS, help="default 0")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    evaluate = commands.add_parser("eval", help="FID/sFID/IS vs the test set; FID/PSNR/SSIM vs a baseline set")
    evaluate.add_argument("images", type=Path, help="folder of generated images")
    evaluate.add_argument("baseline", type=Path, nargs="?", help="folder of full-precision images, same seeds")
    evaluate.add_argument("--reference", default=REFERENCE_NAME,
                          help=f"'{REFERENCE_NAME}' (shipped statistics), a statistics file, or 'none'")
    evaluate.add_argument("--json", type=Path, default=None, help="where to write the metrics (IMAGES/metrics.json)")
    add_device_arguments(evaluate, dtype=False)
    add_overwrite_argument(evaluate)
    evaluate.set_defaults(func=_cmd_eval)

    reference = commands.add_parser("reference-stats", help="recompute the shipped test-set statistics for FID")
    reference.add_argument("--out", type=Path, required=True)
    add_overwrite_argument(reference)
    reference.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST idx folder")
    reference.set_defaults(func=_cmd_reference_stats)

    train = commands.add_parser("train", help="train a shipped model (fashion-ddpm, the autoencoder, fashion-ldm, "
                                "fashion-cond, or the metrics classifier)")
    train.add_argument("what", choices=["ddpm", "autoencoder", "ldm", "cond", "dit", "classifier"])
    train.add_argument("--autoencoder", type=Path, default=None, help="ldm/cond/dit: the trained autoencoder folder")
    train.add_argument("--out", type=Path, required=True)
    add_overwrite_argument(train)
    train.add_argument("--work-dir", type=Path, default=Path("runs/train"), help="resume checkpoint and loss log")
    train.add_argument("--steps", type=positive, default=20_000)
    train.add_argument("--epochs", type=positive, default=15)
    train.add_argument("--batch-size", type=positive, default=64)
    train.add_argument("--lr", type=finite_positive, default=5e-4)
    train.add_argument("--seed", type=non_negative, default=0)
    train.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST idx folder")
    train.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a bad argument (exit 2, already reported in one line) or --help (exit 0)
        return exc.code if isinstance(exc.code, int) else 2
    # A one-line error stays one line: the libraries' warnings and log lines are not the user's business.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched; never even try
    warnings.simplefilter("ignore")
    if getattr(args, "engine", "torch") in GRAPH_ENGINES or args.command == "bench":
        # torch's OpenMP threads spin-wait and steal the graph engine's cores (measured 49 vs 50-97 ms a step);
        # must be set before torch starts its thread pool (the CLI imports torch lazily)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        with contextlib.ExitStack() as stack:
            if os.environ.get("WORLD_SIZE", "1") != "1":  # started by torchrun (tfmq.distributed imports torch)
                from tfmq.distributed import launched_command

                stack.enter_context(launched_command(args, SHARDED_COMMANDS))
            args.func(args)
    except TfmqError as exc:
        print(f"tfmq: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine said no: a full disk, a vanished folder, a permission
        where = f": {exc.filename}" if exc.filename else ""
        print(f"tfmq: error: {exc.strerror or one_line(str(exc))}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tfmq: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
