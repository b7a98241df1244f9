"""The flags of `tfmq quantize` that make its config: each flag sets one config field and only when given,
so what is not given is the config type's default (one set of defaults for the CLI, the demo and Python),
and a flag of another method is a one-line error naming the flag."""

from __future__ import annotations

import argparse
import dataclasses
import re

from tfmq.arguments import bit_width, finite_non_negative, positive
from tfmq.errors import TfmqError
from tfmq.quant.config import (
    CONFIG_TYPES,
    FSC_FILLS,
    FSC_SCOPES,
    RANGE_INITS,
    LayerRule,
    QuantConfig,
    methods_with_field,
)
from tfmq.quant.reconstruction_settings import RECON_PRESETS

_BITS = r"(\d+|fp|none)"
_LAYER_SPEC = re.compile(rf"(?:w{_BITS})?(?:a{_BITS})?")
# argparse destination -> (config field, flag as the user typed it, value for the config)
_FLAG_FIELDS = {
    "w_bits": ("w_bits", "--w-bits", None), "a_bits": ("a_bits", "--a-bits", None),
    "weight_init": ("weight_init", "--weight-init", None), "act_init": ("act_init", "--act-init", None),
    "no_attention_quant": ("quantize_attention", "--no-attention-quant", False),
    "fsc_scope": ("fsc_scope", "--fsc-scope", None), "fsc_fill": ("fsc_fill", "--fsc-fill", None),
    "preset": ("recon_preset", "--preset", None),
    "memory_budget_mb": ("memory_budget_mb", "--memory-budget-mb", None),
    "no_tiar": ("tiar", "--no-tiar", False), "temporal_cache": ("temporal_cache", "--temporal-cache", None),
    "temporal_selection": ("temporal_selection", "--temporal-selection", None),
    "output_correction": ("output_correction", "--output-correction", None),
    "output_correction_samples": ("output_correction_samples", "--output-correction-samples", None),
}


def layer_rule(text: str) -> LayerRule:
    """PATTERN=SPEC: SPEC is `fp` (full precision) or weight and/or activation bits, e.g. `w8`, `a16`, `w8a8`."""
    pattern, _, spec = text.rpartition("=")
    match = _LAYER_SPEC.fullmatch(spec.lower())
    if not pattern or not spec or (spec.lower() != "fp" and match is None):
        raise argparse.ArgumentTypeError(f"a layer rule is PATTERN=fp or PATTERN=w<bits>a<bits> (e.g. "
                                         f"'time_embedding*=w8'), got {text!r}")
    try:
        if spec.lower() == "fp":
            return LayerRule.full_precision(pattern)
        w_text, a_text = match.groups()
        fields = {name: bit_width(value) for name, value in (("w_bits", w_text), ("a_bits", a_text)) if value}
        return LayerRule(pattern, **fields)
    except TfmqError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """The method, bit widths and method settings; their defaults are the config types'."""
    given = {"default": argparse.SUPPRESS}
    parser.add_argument("--method", choices=sorted(CONFIG_TYPES), default="rtn")
    parser.add_argument("--w-bits", type=bit_width, help="weight bits 2..8, or none (default 4; paper: --wq)",
                        **given)
    parser.add_argument("--a-bits", type=bit_width, **given,
                        help="activation bits 4..16, or none (default 8; paper: --aq; --use_aq off = none)")
    parser.add_argument("--preset", choices=list(RECON_PRESETS), **given,
                        help="reconstruction length (qdiff, tfmq): 'fast' (qdiff's default; 200 rounding steps a "
                             "block) suits a CPU (minutes); 'balanced' (2k) is closer to FP for 3-5x the time; 'auto' "
                             "(tfmq's default: 1.3k at balanced's rate on batches of 16, not 32; for tfmq 1.2k at ten "
                             "times the rate, 300 TIAR steps on batches of 128, the output correction and no FSC) "
                             "takes about twice fast's time and half balanced's (quality: see the README); 'paper' is "
                             "the authors' 20k (hours on a CPU)")
    parser.add_argument("--fsc-scope", choices=list(FSC_SCOPES), **given,
                        help="per-timestep activation ranges (FSC): for the temporal features, for every "
                             "activation, or none (default: temporal for tfmq but with --preset auto, none otherwise)")
    parser.add_argument("--schedule-free", action="store_true",
                        help="timestep tables and caches for every training timestep: sample the quantized model "
                             "with any sampler and step count, not only the calibration's")
    parser.add_argument("--fsc-fill", choices=list(FSC_FILLS), **given,
                        help="--schedule-free: an uncalibrated timestep's ranges, interpolated between the "
                             "calibrated ones around it (linear, default) or the nearest one's")
    parser.add_argument("--no-tiar", action="store_true", help="tfmq: reconstruct the TIB inside its blocks", **given)
    parser.add_argument("--temporal-cache", action="store_true", **given,
                        help="tfmq (journal): cache the quantized temporal features of every scheduled timestep")
    parser.add_argument("--temporal-selection", action="store_true", **given,
                        help="tfmq (journal): per block, keep the TIB path or the cache, whichever errs less")
    parser.add_argument("--output-correction", action=argparse.BooleanOptionalAction, **given,
                        help="after the method, take each step's mean output error against fp (per channel, "
                             "measured on the calibration set) off the model's output at that step (default: "
                             "on for tfmq --preset auto, off otherwise)")
    parser.add_argument("--output-correction-samples", type=positive, metavar="N", **given,
                        help="the output correction's mean of a step over N of its samples (default 8)")
    parser.add_argument("--memory-budget-mb", type=finite_non_negative, **given,
                        help="qdiff, tfmq: reconstruction caches beyond this go to disk (default 2048)")
    parser.add_argument("--weight-init", choices=list(RANGE_INITS), **given,
                        help="weight grid (default mse; symmetric: centred on zero, so 8-bit weights run exactly "
                             "on the integer engines' fast int8 kernels)")
    parser.add_argument("--act-init", choices=list(RANGE_INITS), **given, help="activation ranges (default mse)")
    parser.add_argument("--layer", type=layer_rule, action="append", default=[], metavar="PATTERN=SPEC",
                        help="per-layer bits by module-name glob (or re:REGEX), after the default rules that keep "
                             "the first and last layer in fp (conv_in, conv_out; a transformer's pos_embed.proj "
                             "and proj_out_2 or proj_out): e.g. 'conv_in=w8a8', 'time_embedding=w8', "
                             "'*.time_emb_proj=w8', 'mid_block=fp' (repeat for several; the last match wins)")
    parser.add_argument("--no-attention-quant", action="store_true", help="leave the attention matmuls in fp",
                        **given)


def config_from_arguments(args: argparse.Namespace, num_train_timesteps: int | None = None) -> QuantConfig:
    """The config of `--method` with the fields of the flags given; `--schedule-free` needs the model's
    `num_train_timesteps` (without it, the config is checked with the usual 1000)."""
    config_type = CONFIG_TYPES[args.method]
    known = {field.name: field for field in dataclasses.fields(config_type)}
    fields = {}
    for destination, (name, flag, fixed) in _FLAG_FIELDS.items():
        if destination not in args:
            continue
        if name not in known:
            raise TfmqError(f"{flag} applies to method {', '.join(methods_with_field(name))}, not {args.method}")
        fields[name] = getattr(args, destination) if fixed is None else fixed
    if args.layer:
        fields["layers"] = (*known["layers"].default, *args.layer)
    if args.schedule_free:
        fields["train_timesteps"] = 1000 if num_train_timesteps is None else num_train_timesteps
    elif "fsc_fill" in fields:
        raise TfmqError("--fsc-fill fills the rows of --schedule-free tables: give --schedule-free too")
    config = config_type(**fields)
    if "output_correction_samples" in fields and not config.output_correction:
        raise TfmqError("--output-correction-samples sets how the output correction measures, and this config has "
                        "none: give --output-correction too")
    return config
