"""The quantization ops of a QDQ graph, as torch modules that export to exactly those ONNX nodes.

In torch they compute what the fake-quant model computes (up to float rounding), so an export twin built
from them can be checked against the fake-quant model before ONNX is involved; in ONNX they become the
QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses with the op between them into integer kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tfmq.quant.nn.quantizer import MIN_SCALE, UniformQuantizer
from tfmq.quant.nn.step_table import StepRows, selected_rows

# Integer kernels of onnxruntime read 8-bit operands: uint8 activations, int8 weights.
KERNEL_BITS = 8
INT8_MIN, INT8_MAX = -128, 127


class _DequantizeWeight(torch.autograd.Function):
    """(codes - zero point) * scale per slice along `axis`: one DequantizeLinear of integer initializers."""

    @staticmethod
    def forward(ctx, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
        shape = [1] * codes.dim()
        shape[axis] = -1
        return (codes.float() - zero_point.float().view(shape)) * scale.view(shape)

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis: int):
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=axis)


class QdqActivation(nn.Module):
    """A per-tensor activation quantizer frozen into constants (a QDQ pair in ONNX)."""

    def __init__(self, scale: float, zero_point: int, bits: int) -> None:
        super().__init__()
        if bits > KERNEL_BITS:
            raise ValueError(f"integer kernels take at most {KERNEL_BITS}-bit activations, got {bits} bits")
        self.scale, self.zero_point, self.bits = scale, zero_point, bits

    @classmethod
    def of(cls, quantizer: UniformQuantizer) -> QdqActivation | None:
        """The frozen twin of a calibrated per-tensor quantizer; None for one that passes values through."""
        if quantizer.bits is None or not quantizer.enabled:
            return None
        if quantizer.has_timestep_table:
            raise ValueError("a quantizer with a timestep table has no single scale to freeze")
        scale = float(quantizer.scale.detach().clamp_min(MIN_SCALE).reshape(()))
        return cls(scale, int(quantizer.zero_point.reshape(())), quantizer.bits)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, zero_point={self.zero_point}, bits={self.bits}"

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        # torch's own fake quantization exports as a uint8 QuantizeLinear/DequantizeLinear pair (a custom
        # autograd op feeding attention's shape arithmetic breaks TorchScript's exporter); a grid narrower
        # than uint8's gets a Clip to its range first.
        if self.bits < KERNEL_BITS:
            values = values.clamp(-self.zero_point * self.scale, (2**self.bits - 1 - self.zero_point) * self.scale)
        return torch.fake_quantize_per_tensor_affine(values, self.scale, self.zero_point, 0, 2**KERNEL_BITS - 1)


class StepQdqActivation(nn.Module):
    """A quantizer with a timestep table frozen into one scale and zero point per scheduled step, read at the
    graph's step (a Gather feeding a QDQ pair in ONNX). onnxruntime runs such a pair as it stands, not fused
    into an integer kernel (its scale is not a constant): for the small modulation Linears of a transformer's
    TIB, whose input depends on the class as well as the step and so cannot become a table."""

    def __init__(self, quantizer: UniformQuantizer, step_rows: StepRows) -> None:
        super().__init__()
        if quantizer.bits > KERNEL_BITS:
            raise ValueError(f"integer kernels take at most {KERNEL_BITS}-bit activations, got {quantizer.bits} bits")
        self.register_buffer("scale", quantizer.table_scale.detach().clamp_min(MIN_SCALE).float().cpu().clone())
        self.register_buffer("zero_point", quantizer.table_zero_point.detach().round().to(torch.int32).cpu().clone())
        self.bits = quantizer.bits
        self.step_rows = step_rows

    def extra_repr(self) -> str:
        return f"steps={len(self.scale)}, bits={self.bits}"

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        row = selected_rows(self.step_rows, self).reshape(())
        scale, zero_point = self.scale[row], self.zero_point[row]
        if self.bits < KERNEL_BITS:
            values = torch.clamp(values, -zero_point * scale, (2**self.bits - 1 - zero_point) * scale)
        return torch.fake_quantize_per_tensor_affine(values, scale, zero_point, 0, 2**KERNEL_BITS - 1)


def frozen_activation(quantizer: UniformQuantizer, step_rows: StepRows) -> QdqActivation | StepQdqActivation | None:
    """The graph's twin of an activation quantizer: constant QDQ, a QDQ read per step for one with a timestep
    table (`step_rows`: the graph's), or None for one that passes values through."""
    if quantizer.bits is not None and quantizer.enabled and quantizer.has_timestep_table:
        return StepQdqActivation(quantizer, step_rows)
    return QdqActivation.of(quantizer)


@dataclass(frozen=True)
class WeightCodes:
    """A fake-quant weight as integer codes, a scale and a zero point per output channel, exactly.

    The asymmetric b-bit codes q of the quantizer become symmetric int8 codes q - z (zero point 0: what
    onnxruntime's fast u8s8 kernels take) whenever every q - z fits int8: always so up to 7 bits, and at 8 bits
    on a grid centred on zero (zero point 128: the `symmetric` range init). Otherwise (8 bits) they stay uint8
    q with their zero points z: still exact, on the slower u8u8 kernels; or, with
    `requantize`, the fake-quant weight is rounded again onto a symmetric int8 grid per channel (max |w| /
    127): fast kernels, at up to half an int8 step of extra error per weight.
    """

    codes: torch.Tensor       # int8 or uint8, the weight's shape
    scale: torch.Tensor       # float32, (out_channels,)
    zero_point: torch.Tensor  # codes' dtype, (out_channels,)

    @classmethod
    def of(cls, weight: torch.Tensor, quantizer: UniformQuantizer, requantize: bool = False) -> WeightCodes:
        with torch.no_grad():
            codes = quantizer.integer_values(weight)
            zero_point = quantizer.zero_point.detach().round()
            scale = quantizer.scale.detach().clamp_min(MIN_SCALE).float()
            channel_shape = (-1,) + (1,) * (weight.dim() - 1)
            centred = codes.float() - zero_point.view(channel_shape)
            symmetric_zero_point = torch.zeros_like(zero_point, dtype=torch.int8)
            if INT8_MIN <= float(centred.min()) and float(centred.max()) <= INT8_MAX:
                return cls(centred.to(torch.int8), scale, symmetric_zero_point)
            if not requantize:
                return cls(codes, scale, zero_point.to(torch.uint8))
            values = centred * scale.view(channel_shape)
            new_scale = values.flatten(1).abs().amax(dim=1).clamp_min(MIN_SCALE) / INT8_MAX
            requantized = torch.round(values / new_scale.view(channel_shape)).to(torch.int8)
            return cls(requantized, new_scale, symmetric_zero_point)


class DequantizedWeight(nn.Module):
    """Weight codes, scales and zero points as buffers (integer initializers in ONNX), dequantized along `axis`."""

    def __init__(self, weight: WeightCodes, axis: int = 0, transpose: bool = False) -> None:
        super().__init__()
        codes = weight.codes.t().contiguous() if transpose else weight.codes
        self.register_buffer("codes", codes)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("zero_point", weight.zero_point)
        self.axis = axis

    def input_channels(self, start: int, stop: int) -> DequantizedWeight:
        """The weight of input channels start..stop-1 (dimension 1 of a conv weight), for a conv split by input
        part; the scales stay per output channel."""
        if self.axis != 0:
            raise ValueError("input channels slice a conv weight (scales along axis 0)")
        return DequantizedWeight(WeightCodes(self.codes[:, start:stop].contiguous(), self.scale, self.zero_point))

    def forward(self) -> torch.Tensor:
        return _DequantizeWeight.apply(self.codes, self.scale, self.zero_point, self.axis)
