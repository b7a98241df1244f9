"""`CompiledUNet`: a quantized UNet on oneDNN's integer kernels through `torch.compile`, in the process and with
no exported file; the third integer engine, beside onnxruntime and OpenVINO running an exported graph.

It runs the export twin (`integer_twin`: the TIB and the output correction as tables read at the step,
activations and weights frozen) with its quantize/dequantize written in the ops of torch's
`quantized_decomposed` library. That is the form whose patterns TorchInductor's freezing passes lower onto
oneDNN: a dequantized uint8 input and a dequantized int8 weight around a conv or a linear become one integer
`qconv_pointwise` / `qlinear_pointwise`, and the float ops between them (GroupNorm, SiLU, adds, the next
quantize) are fused into generated C++ loops. oneDNN's integer conv writes a float output, so unlike
onnxruntime's QLinearConv no conv needs an extra 8-bit output grid: the engine computes what the fake-quant
model computes, up to float summation order (design note: docs/design/integer_inference.md).
"""

from __future__ import annotations

import contextlib
import platform
import warnings
from collections.abc import Sequence

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.configuration_utils import FrozenDict
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn
from torch.nn import functional

from tfmq.devices import module_device
from tfmq.errors import TfmqError
from tfmq.export.graph import integer_twin
from tfmq.export.layers import IntegerConv2d, IntegerLinear
from tfmq.export.norms import ChannelMomentsGroupNorm
from tfmq.export.onnx_export import checked_schedule, condition_input
from tfmq.export.qdq import INT8_MAX, INT8_MIN, KERNEL_BITS, DequantizedWeight, QdqActivation, WeightCodes
from tfmq.export.runtime import ScheduleRows
from tfmq.quant.nn.layers import QuantConv2d
from tfmq.quant.nn.step_table import StepRows

COMPILED_CLASSES = (UNet2DModel, UNet2DConditionModel)
# Inductor's passes that lower the quantized patterns onto oneDNN run only when it freezes the weights into
# constants; the C++ wrapper calls the kernels without a Python step between them.
INDUCTOR_OPTIONS = {"freezing": True, "cpp_wrapper": True}
UINT8_MAX = 2**KERNEL_BITS - 1


def _decomposed_ops():
    """torch's `quantized_decomposed` library, registered by importing its module."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the ops)

    return torch.ops.quantized_decomposed


class DecomposedActivation(QdqActivation):
    """A frozen per-tensor uint8 quantizer as quantize_per_tensor -> dequantize_per_tensor, the input that
    Inductor's integer conv and linear patterns read."""

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        ops = _decomposed_ops()
        if self.bits < KERNEL_BITS:
            values = values.clamp(-self.zero_point * self.scale, (2**self.bits - 1 - self.zero_point) * self.scale)
        codes = ops.quantize_per_tensor(values, self.scale, self.zero_point, 0, UINT8_MAX, torch.uint8)
        return ops.dequantize_per_tensor(codes, self.scale, self.zero_point, 0, UINT8_MAX, torch.uint8)


class DecomposedWeight(DequantizedWeight):
    """Weight codes as dequantize_per_channel, which Inductor folds into oneDNN's prepacked integer weight
    (int8 codes; uint8 codes with zero points stay a float weight, dequantized once at freezing)."""

    def forward(self) -> torch.Tensor:
        if self.codes.dtype != torch.int8:  # oneDNN's integer kernels take int8 weights only
            return super().forward()
        return _decomposed_ops().dequantize_per_channel(self.codes, self.scale, self.zero_point.to(torch.int64),
                                                        self.axis, INT8_MIN, INT8_MAX, torch.int8)


class CompiledConv2d(IntegerConv2d):
    """A conv with a float output (no output grid). A split conv (two input grids) runs as one integer conv
    per input part over its slice of the weight, their float outputs added: exact, where onnxruntime needs an
    output grid per part."""

    def __init__(self, layer: QuantConv2d, outputs: None = None, requantize_weights: bool = False,
                 step_rows: StepRows | None = None) -> None:
        super().__init__(layer, None, requantize_weights, step_rows)
        self.parts = None
        if (layer.split is not None and isinstance(self.weight, DequantizedWeight) and layer.groups == 1
                and self.split_input_quantizer is not None):
            self.parts = nn.ModuleList([self.weight.input_channels(0, layer.split),
                                        self.weight.input_channels(layer.split, layer.in_channels)])

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.parts is None:
            return self._conv(self.quantize_input(inputs), self.weight(), self.bias)
        head, tail = inputs.split([self.split, inputs.shape[1] - self.split], dim=1)
        head_weight, tail_weight = self.parts
        return (self._conv(self.input_quantizer(head), head_weight(), self.bias)
                + self._conv(self.split_input_quantizer(tail), tail_weight(), None))


class CompiledLinear(IntegerLinear):
    """A linear over the flattened leading axes (Inductor's integer linear pattern is a 2-D matmul), its
    weight (out, in) with scales along axis 0."""

    transposed = False

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs = functional.linear(self.quantize_input(inputs.reshape(-1, inputs.shape[-1])), self.weight(),
                                    self.bias)
        return outputs.reshape(*inputs.shape[:-1], outputs.shape[-1])


def decomposed(model: nn.Module) -> nn.Module:
    """Every frozen activation and integer weight of `model` (a twin) in `quantized_decomposed` form, in place."""
    for name, module in list(model.named_modules()):
        if type(module) is QdqActivation:
            model.set_submodule(name, DecomposedActivation(module.scale, module.zero_point, module.bits))
        elif type(module) is DequantizedWeight:
            codes = WeightCodes(module.codes, module.scale, module.zero_point)
            model.set_submodule(name, DecomposedWeight(codes, module.axis))
    return model


def check_compilable(model: nn.Module) -> None:
    """A one-line error unless `model` can run on this machine's oneDNN integer kernels."""
    if not isinstance(model, COMPILED_CLASSES):
        names = ", ".join(model_class.__name__ for model_class in COMPILED_CLASSES)
        raise TfmqError(f"the inductor engine takes a quantized diffusers {names}, not a {type(model).__name__} "
                        "(a diffusion transformer: export it and use --engine openvino)")
    if module_device(model).type != "cpu":
        raise TfmqError("the inductor engine runs oneDNN's integer kernels on the CPU: move the model to the CPU")
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        raise TfmqError(f"the inductor engine needs an x86 CPU with oneDNN (this is {platform.machine()}): "
                        "export the model and use --engine onnxruntime")
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as exc:  # torch raises its own error types, or a RuntimeError, for a missing compiler
        raise TfmqError("the inductor engine compiles C++: install a C++ compiler (g++ or clang++, or name one in "
                        f"$CXX) ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc


class CompiledUNet:
    """A quantized UNet (from `tfmq.quantize` / `load_quantized`) compiled onto oneDNN's integer kernels,
    called like a diffusers UNet: `engine(sample, timestep, encoder_hidden_states=None)` -> object with
    `.sample`, `.config` the model's, so `tfmq.sampling.sample` runs the whole loop on it.

    It serves the timesteps of `schedule` (as `export_onnx`: default and required to match, the model's
    timestep-table schedule), one timestep per batch. Compilation happens at the first call of each batch
    size (40-60 s for fashion-ddpm on two cores); later calls run the compiled code. Needs a C++ compiler, as
    any torch.compile on the CPU.
    """

    def __init__(self, model: nn.Module, schedule: Sequence[int] | torch.Tensor | None = None) -> None:
        check_compilable(model)
        schedule_tensor = checked_schedule(model, schedule)
        graph, self.counts = integer_twin(model.eval(), schedule_tensor, {}, condition_input(model),
                                          group_norm_form=ChannelMomentsGroupNorm,
                                          layer_twins=(CompiledConv2d, CompiledLinear))
        graph.row_shape = (1,)
        self.graph = decomposed(graph).eval()
        self.rows = ScheduleRows(schedule_tensor.tolist())
        self.config = FrozenDict(model.config)
        # a new batch size compiles anew: code for dynamic shapes ran 1.5x slower on fashion-ddpm
        self._compiled = torch.compile(self.graph, dynamic=False)
        self._compiled_shapes: set[tuple] = set()

    def __repr__(self) -> str:
        return f"CompiledUNet({type(self.graph.model).__name__}, steps={len(self.rows.schedule)})"

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | int | float,
                 encoder_hidden_states: torch.Tensor | None = None,
                 return_dict: bool = True) -> UNet2DOutput | tuple[torch.Tensor]:
        conditional = self.graph.condition is not None
        if conditional and encoder_hidden_states is None:
            raise TfmqError("this UNet is text-conditional: pass encoder_hidden_states")
        if not conditional and encoder_hidden_states is not None:
            raise TfmqError("this UNet takes no encoder_hidden_states (it is not text-conditional)")
        step = torch.tensor([self.rows.row(torch.as_tensor(timestep).detach().cpu())])
        condition = None if encoder_hidden_states is None else encoder_hidden_states.float().cpu()
        shapes = (tuple(sample.shape), None if condition is None else tuple(condition.shape))
        # once these shapes are compiled, Dynamo checks only the guards that tell its compiled graphs apart: the
        # graph is frozen, and its full guards re-read every module attribute at each call
        warm = shapes in self._compiled_shapes
        # (set_stance applies itself when made, so it is made where the with statement enters it)
        with (torch.no_grad(), torch._inductor.config.patch(INDUCTOR_OPTIONS), warnings.catch_warnings(),
              torch.compiler.set_stance(skip_guard_eval_unsafe=True) if warm else contextlib.nullcontext()):
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")  # its notes to itself
            noise = self._compiled(sample.detach().float().cpu(), step, condition)
        self._compiled_shapes.add(shapes)
        noise = noise.to(sample.device, sample.dtype)
        return UNet2DOutput(sample=noise) if return_dict else (noise,)
