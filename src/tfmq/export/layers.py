"""The export twins of QuantConv2d/QuantLinear: frozen QDQ around the op, in the order onnxruntime fuses.

A conv becomes QLinearConv only with a QuantizeLinear on its output, which the fake-quant model does not
have: `output` is that extra 8-bit grid (None keeps the conv in float on dequantized operands, exact but
not faster). A linear needs none: onnxruntime fuses DQ -> MatMul into MatMulIntegerToFloat, whose float
output is exact. A conv with a split input (two input grids) becomes two integer convs, one per input part
over its slice of the weight, each with an output grid, added in float. An input quantizer with a timestep
table reads its grid at the graph's step (`step_rows`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from tfmq.export.qdq import DequantizedWeight, QdqActivation, WeightCodes, frozen_activation
from tfmq.quant.nn.layers import QuantConv2d, QuantLayer, QuantLinear
from tfmq.quant.nn.step_table import StepRows


class IntegerLayer(nn.Module):
    """What the twins share: frozen input quantizer(s), integer weight, float bias, optional output grid."""

    channel_dim: int

    def __init__(self, layer: QuantLayer, weight: nn.Module, output: QdqActivation | None,
                 step_rows: StepRows | None) -> None:
        super().__init__()
        step_rows = StepRows() if step_rows is None else step_rows  # read only by quantizers with tables
        self.input_quantizer = frozen_activation(layer.input_quantizer, step_rows)
        self.split = layer.split
        self.split_input_quantizer = (None if layer.split is None
                                      else frozen_activation(layer.split_input_quantizer, step_rows))
        self.weight = weight
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.output_quantizer = output

    @staticmethod
    def weight_of(layer: QuantLayer, requantize: bool, axis: int = 0, transpose: bool = False) -> nn.Module:
        """The layer's weight for the graph: integer codes (see WeightCodes for `requantize`), or float where
        its quantizer is off."""
        quantizer = layer.weight_quantizer
        if quantizer.bits is None or not quantizer.enabled:
            weight = layer.weight.detach().clone()
            return _FloatWeight(weight.t().contiguous() if transpose else weight)
        return DequantizedWeight(WeightCodes.of(layer.weight, quantizer, requantize), axis, transpose)

    def quantize_input(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.split is None:
            return inputs if self.input_quantizer is None else self.input_quantizer(inputs)
        head, tail = inputs.split([self.split, inputs.shape[self.channel_dim] - self.split], dim=self.channel_dim)
        parts = [part if quantizer is None else quantizer(part)
                 for part, quantizer in ((head, self.input_quantizer), (tail, self.split_input_quantizer))]
        return torch.cat(parts, dim=self.channel_dim)

    def quantize_output(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs if self.output_quantizer is None else self.output_quantizer(outputs)


class _FloatWeight(nn.Module):
    """A weight left in full precision (its quantizer is off): a float initializer."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("values", weight)

    def forward(self) -> torch.Tensor:
        return self.values


class IntegerConv2d(IntegerLayer):
    """A conv as DQ(input) * DQ(weight) [-> QDQ output]: QLinearConv when it has the output grid(s).

    `outputs`: None (float output), or one grid per input part: a split conv given two runs as two
    QLinearConvs whose dequantized outputs are added.
    """

    channel_dim = 1

    def __init__(self, layer: QuantConv2d, outputs: tuple[QdqActivation, ...] | None,
                 requantize_weights: bool = False, step_rows: StepRows | None = None) -> None:
        if layer.padding_mode != "zeros":
            raise ValueError(f"padding_mode={layer.padding_mode!r} has no ONNX Conv equivalent; only 'zeros'")
        parts = 1 if layer.split is None else 2
        if outputs is not None and len(outputs) != parts:
            raise ValueError(f"a conv with {parts} input part(s) takes {parts} output grid(s), got {len(outputs)}")
        super().__init__(layer, self.weight_of(layer, requantize_weights), None if outputs is None else outputs[0],
                         step_rows)
        self.split_output_quantizer = outputs[1] if outputs is not None and parts == 2 else None
        if self.split_output_quantizer is not None:
            self.split_weights = nn.ModuleList([self.weight.input_channels(0, layer.split),
                                                self.weight.input_channels(layer.split, layer.in_channels)])
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups

    def _conv(self, inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return functional.conv2d(inputs, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.split_output_quantizer is None:
            return self.quantize_output(self._conv(self.quantize_input(inputs), self.weight(), self.bias))
        head, tail = inputs.split([self.split, inputs.shape[1] - self.split], dim=1)
        head_weight, tail_weight = self.split_weights
        return (self.output_quantizer(self._conv(self.input_quantizer(head), head_weight(), self.bias))
                + self.split_output_quantizer(self._conv(self.split_input_quantizer(tail), tail_weight(), None)))


class IntegerLinear(IntegerLayer):
    """Weight stored transposed (in, out), scales along axis 1: a plain DQ -> MatMul for onnxruntime."""

    channel_dim = -1
    transposed = True  # the weight's layout: (in, out), scales along axis 1; else (out, in), scales along axis 0

    def __init__(self, layer: QuantLinear, requantize_weights: bool = False, step_rows: StepRows | None = None) -> None:
        axis = 1 if self.transposed else 0
        super().__init__(layer, self.weight_of(layer, requantize_weights, axis=axis, transpose=self.transposed), None,
                         step_rows)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs = torch.matmul(self.quantize_input(inputs), self.weight())
        return outputs if self.bias is None else outputs + self.bias
