"""The command line's value types and shared argument groups: argparse types that refuse what a float or an
int would let through (NaN, negatives), and a parser that reports a bad argument in one line."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

DEFAULT_GUIDANCE_SCALE = 3.0  # for conditional models when --guidance-scale is not given
GRAPH_ENGINES = ("onnxruntime", "openvino")  # the runtimes of exported graphs (`tfmq.export.graph_engine`)
COMPILED_ENGINE = "inductor"  # a quantized folder compiled onto oneDNN's integer kernels (`tfmq.export.CompiledUNet`)


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def finite_non_negative(text: str) -> float:
    """A float that is finite and >= 0 (argparse's float takes 'nan' and 'inf')."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def finite_positive(text: str) -> float:
    value = finite_non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def bit_width(text: str) -> int | None:
    """A bit width, or full precision as 'none', 'fp' or '32' (the paper's W4A32 means weights only)."""
    return None if text.lower() in ("none", "fp", "32") else int(text)


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sampler", choices=["ddim", "ddpm", "plms", "dpm-solver"], default="ddim",
                        help="plms: Stable Diffusion's sampler in the paper; dpm-solver: DPM-Solver++ 2nd order")
    parser.add_argument("--steps", type=positive, default=100, help="sampling steps (paper: --timesteps)")
    parser.add_argument("--eta", type=finite_non_negative, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    parser.add_argument("--skip-type", choices=["quad", "uniform"], default="quad", help="DDIM timestep spacing")
    parser.add_argument("--seed", type=non_negative, default=0, help="image i starts from noise seeded by (seed, i)")
    parser.add_argument("--batch-size", type=positive, default=64)
    parser.add_argument("--prompt", action="append", default=None,
                        help="text-conditional models: a prompt (repeat for several; images cycle through them)")
    parser.add_argument("--prompts", type=Path, default=None,
                        help="prompts file: one a line, or an MS-COCO captions_*.json (paper: 128 COCO captions)")
    parser.add_argument("--num-prompts", type=positive, default=128, help="prompts taken from --prompts")
    parser.add_argument("--class-label", type=non_negative, action="append", default=None,
                        help="class-conditional models: a label (repeat for several; default: all in turn)")
    parser.add_argument("--guidance-scale", type=finite_non_negative, default=None,
                        help=f"classifier-free guidance (default {DEFAULT_GUIDANCE_SCALE} for conditional models; "
                             "1 runs no unconditional branch)")


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output path that tfmq did not write (never the current folder, the root, "
                             "the home folder or one of the inputs); without it, only tfmq's own outputs are replaced")


def add_model_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-config", type=Path, default=None,
                        help="with a single-file Stable Diffusion v1 checkpoint (.ckpt/.safetensors) as --model: "
                             "a folder of its pipeline's diffusers configs (model_index.json, unet/, vae/, "
                             "text_encoder/, tokenizer/, scheduler/; no weights)")


def add_device_arguments(parser: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, or auto (the first GPU if there is one; default)")
    if dtype:
        parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                            help="the UNet's dtype (default float32, or the one a --quantized folder records); "
                                 "quantizer grids stay float32")


def one_line(message: str) -> str:
    return " ".join(message.split())


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage dump), still with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
