"""Where a diffusion transformer's W4A8 error comes from, and two levers against it, on fashion-dit.

    python benchmarks/transformer_levers.py

Held-out relative output error ||eps_q - eps_fp|| / ||eps_fp|| (8 trajectories of other seeds than the 32 of
the calibration set, DDIM 100, guidance 3, every 10th step), default layer rules (patch embedding and final
Linear in full precision), one row per setting:

- the split of the error: RTN with only the weights quantized, only the activations, or both;
- smoothing (SmoothQuant's per-channel migration, strength alpha) of the attention's and the MLP's inputs,
  folded into each block's adaLN modulation Linear: the block scales the normalised tokens by (1 + scale)
  and shifts them, so dividing the tokens by s per channel is a change of that Linear's rows, exact in full
  precision (the script checks it), with the reading Linears' columns multiplied by s. Under RTN at alpha
  0.3 / 0.5 / 0.7, then under qdiff and tfmq at 0.5;
- a full-precision low-rank branch (rank r of the SVD of every quantized Linear's weight outside the TIB
  kept in float, the rest quantized), under RTN, with the float parameters it adds;
- per-token activations: every such Linear's input quantized per token on its own min/max at run time
  (dynamic), instead of one MSE-searched range per tensor, under RTN.

Writes benchmarks/results/transformer_levers.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional

from tfmq import load_model
from tfmq.arguments import DEFAULT_GUIDANCE_SCALE
from tfmq.denoiser import denoiser_call
from tfmq.files import write_json, write_text_atomic
from tfmq.quant.api import quantize, relative_output_error
from tfmq.quant.calibration import CalibrationSet, collect_calibration
from tfmq.quant.config import QDiffusionConfig, QuantConfig, RTNConfig, TFMQConfig
from tfmq.quant.nn.layers import QuantLinear
from tfmq.quant.tib import find_tib
from tfmq.quant.wrap import quant_layers
from tfmq.report import format_table
from tfmq.sampling import SamplerConfig

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ("row", "relative_error", "float_parameters", "seconds")
# adaLN-Zero's six chunks of a block's modulation: the (shift, scale) pair before attention starts at 0, the
# pair before the MLP at 3.
ATTENTION_CHUNK, MLP_CHUNK = 0, 3


@torch.no_grad()
def input_absmax(model: nn.Module, names: list[str], calibration: CalibrationSet) -> dict[str, torch.Tensor]:
    """The largest |input| per channel of each Linear of `names` over the calibration set."""
    maxima: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def record(_module: nn.Module, args: tuple, name: str = name) -> None:
            values = args[0].detach().abs().flatten(0, -2).amax(0)
            maxima[name] = torch.maximum(maxima[name], values) if name in maxima else values
        handles.append(model.get_submodule(name).register_forward_pre_hook(record))
    try:
        for inputs in calibration.timestep_groups(torch.device("cpu")):
            denoiser_call(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return maxima


@torch.no_grad()
def smoothed(model: nn.Module, calibration: CalibrationSet, alpha: float) -> nn.Module:
    """A copy of the DiT with its attention and MLP inputs smoothed, the factors folded into the modulation."""
    model = copy.deepcopy(model)
    readers = {}
    for index in range(len(model.transformer_blocks)):
        block = f"transformer_blocks.{index}"
        readers[(block, ATTENTION_CHUNK)] = [f"{block}.attn1.to_{part}" for part in "qkv"]
        readers[(block, MLP_CHUNK)] = [f"{block}.ff.net.0.proj"]
    maxima = input_absmax(model, [names[0] for names in readers.values()], calibration)
    for (block, chunk), names in readers.items():
        weights = torch.stack([model.get_submodule(name).weight.abs().amax(0) for name in names]).amax(0)
        factor = (maxima[names[0]].clamp_min(1e-5).pow(alpha) / weights.clamp_min(1e-5).pow(1 - alpha)).clamp(1e-2, 1e2)
        modulation = model.get_submodule(f"{block}.norm1.linear")
        width = len(factor)
        shift = slice(chunk * width, (chunk + 1) * width)
        scale = slice((chunk + 1) * width, (chunk + 2) * width)
        # x (1 + scale) + shift, divided by s: (1 + scale) / s - 1 and shift / s, both linear in the embedding
        modulation.weight[shift] /= factor[:, None]
        modulation.bias[shift] /= factor
        modulation.weight[scale] /= factor[:, None]
        modulation.bias[scale] = (modulation.bias[scale] + 1) / factor - 1
        for name in names:
            model.get_submodule(name).weight *= factor[None, :]
    return model


def add_low_rank_branches(quantized: nn.Module, rank: int) -> int:
    """Give every quantized Linear outside the TIB a float branch of its weight's rank-`rank` part and quantize
    the rest (RTN grids refitted); returns the float parameters added."""
    tib_layers = set(find_tib(quantized).linear_names)
    added = 0
    for name, layer in quant_layers(quantized):
        if not isinstance(layer, QuantLinear) or name in tib_layers or layer.weight_quantizer.bits is None:
            continue
        weight = layer.weight.detach().float()
        left, values, right = torch.linalg.svd(weight, full_matrices=False)
        low_rank = (left[:, :rank] * values[:rank]) @ right[:rank]
        layer.weight = nn.Parameter(weight - low_rank)  # a new tensor: the copy shares the FP model's storage
        layer.weight_quantizer.init_range(layer.weight)
        layer.register_forward_hook(lambda _m, args, output, low_rank=low_rank: output + functional.linear(args[0], low_rank))
        added += rank * sum(weight.shape)
    return added


def quantize_inputs_per_token(quantized: nn.Module) -> None:
    """Replace the static per-tensor input grid of every quantized Linear outside the TIB by a per-token one
    from each token's own min/max (at the same bits)."""
    tib_layers = set(find_tib(quantized).linear_names)
    for name, layer in quant_layers(quantized):
        bits = layer.input_quantizer.bits
        if not isinstance(layer, QuantLinear) or name in tib_layers or bits is None:
            continue

        def per_token(values: torch.Tensor, bits: int = bits) -> torch.Tensor:
            low = values.amin(-1, keepdim=True).clamp_max(0)
            high = values.amax(-1, keepdim=True).clamp_min(0)
            scale = ((high - low) / (2**bits - 1)).clamp_min(1e-8)
            zero_point = torch.round(-low / scale)
            return (torch.clamp(torch.round(values / scale) + zero_point, 0, 2**bits - 1) - zero_point) * scale
        layer.input_quantizer.forward = per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fashion-dit")
    parser.add_argument("--name", default="transformer_levers")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    full_precision = model.unet.eval()
    sampler = SamplerConfig(steps=100)

    def trajectories(count: int, interval: int, seed: int) -> CalibrationSet:
        return collect_calibration(full_precision, model.scheduler, count, sampler, interval, seed=seed, progress=False,
                                   conditioning=model.conditioning(count, guidance_scale=DEFAULT_GUIDANCE_SCALE))
    calibration, held_out = trajectories(32, 5, 0), trajectories(8, 10, 77)
    rows = []

    def measure(label: str, denoiser: nn.Module, config: QuantConfig, low_rank: int = 0,
                per_token: bool = False) -> None:
        started = time.perf_counter()
        quantized = quantize(denoiser, config, calibration, progress=False)
        added = add_low_rank_branches(quantized, low_rank) if low_rank else 0
        if per_token:
            quantize_inputs_per_token(quantized)
        rows.append({"row": label, "relative_error": relative_output_error(quantized, full_precision, held_out),
                     "float_parameters": added, "seconds": time.perf_counter() - started})
        print(format_table(rows[-1:], COLUMNS), flush=True)

    smoothing_error = relative_output_error(smoothed(full_precision, calibration, 0.5), full_precision, held_out)
    print(f"smoothing in full precision changes the output by {smoothing_error:.2e} (relative)", flush=True)
    for w_bits, a_bits in ((4, None), (None, 8), (None, 6), (8, 8), (4, 8), (4, 6)):
        measure(f"rtn w{w_bits}a{a_bits}", full_precision, RTNConfig(w_bits=w_bits, a_bits=a_bits))
    for alpha in (0.3, 0.5, 0.7):
        model_smoothed = smoothed(full_precision, calibration, alpha)
        for w_bits, a_bits in ((None, 6), (4, 8), (4, 6)):
            measure(f"rtn w{w_bits}a{a_bits} smoothed {alpha}", model_smoothed, RTNConfig(w_bits=w_bits, a_bits=a_bits))
    model_smoothed = smoothed(full_precision, calibration, 0.5)
    for method, config_type in (("qdiff", QDiffusionConfig), ("tfmq", TFMQConfig)):
        for w_bits, a_bits in ((4, 8), (4, 6)):
            measure(f"{method} w{w_bits}a{a_bits}", full_precision, config_type(w_bits=w_bits, a_bits=a_bits))
            measure(f"{method} w{w_bits}a{a_bits} smoothed 0.5", model_smoothed, config_type(w_bits=w_bits, a_bits=a_bits))
    for w_bits, a_bits in ((4, 8), (4, 6)):
        for rank in (4, 8, 16):
            measure(f"rtn w{w_bits}a{a_bits} low rank {rank}", full_precision, RTNConfig(w_bits=w_bits, a_bits=a_bits),
                    low_rank=rank)
    for w_bits, a_bits in ((None, 8), (None, 6), (4, 8), (4, 6)):
        measure(f"rtn w{w_bits}a{a_bits} per-token activations", full_precision, RTNConfig(w_bits=w_bits, a_bits=a_bits),
                per_token=True)
    parameters = sum(parameter.numel() for parameter in full_precision.parameters())
    table = format_table(rows, COLUMNS, markdown=True)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", {"rows": rows, "smoothing_fp_error": smoothing_error,
                                               "parameters": parameters, "threads": args.threads})
    command = "python benchmarks/transformer_levers.py " + " ".join(sys.argv[1:])
    write_text_atomic(RESULTS / f"{args.name}.md", (
        f"# Levers on a diffusion transformer's W4A8 error\n\n`{command}`\n\n`{args.model}` ({parameters:,} "
        "parameters), held-out relative output error (8 trajectories, DDIM 100, guidance 3, every 10th step) "
        f"after calibration on 32 trajectories (every 5th step). Smoothing changes the full-precision output by "
        f"{smoothing_error:.1e}.\n\n{table}\n"))


if __name__ == "__main__":
    main()
