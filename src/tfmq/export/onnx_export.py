"""`export_onnx`: a UNet or diffusion transformer as an ONNX graph for onnxruntime, integer (QDQ) or full
precision.

The integer graph takes the step index instead of the timestep (see docs/design/integer_inference.md):
the TIB is a table over the schedule, so the graph serves exactly the timesteps it was exported for.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
from torch import nn

from tfmq.errors import TfmqError
from tfmq.export.conv_outputs import UNetInputs, conv_output_grids, exact_conv_names, integer_conv_names
from tfmq.export.dependencies import require
from tfmq.export.graph import StepGraph, TimestepGraph, add_graph_error, integer_twin
from tfmq.export.metadata import (
    CLASS_LABELS,
    DATA_KEY,
    DIGEST_KEY,
    ENCODER_HIDDEN_STATES,
    FORMATS,
    OUTPUT,
    SAMPLE,
    GraphInfo,
    data_file_of,
    data_record,
    graph_digest,
    owned_data_file,
    owned_graph,
)
from tfmq.export.qdq import KERNEL_BITS
from tfmq.files import check_output_file, write_bytes_atomic
from tfmq.quant.manifest import ModelManifest
from tfmq.quant.nn.layers import QuantLayer
from tfmq.quant.nn.temporal import timestep_tables

SUPPORTED_OPSETS = range(17, 22)
DEFAULT_OPSET = 21
# torch's TorchScript exporter writes at most opset 20 (custom QDQ symbolics need it); onnx's version
# converter takes the graph further.
TORCH_MAX_OPSET = 20
# 4-bit tensors exist from opset 21 on: weights of at most 4 bits are stored packed there.
UINT4_OPSET = 21
UINT4_MAX = 15
# protobuf encodes no message past 2 GiB: a graph whose initializers and nodes come within 16 MiB of that (the
# margin covers what the count leaves out: inputs, outputs, metadata) keeps its weights in a data file beside it.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
EXTERNAL_DATA_THRESHOLD_BYTES = PROTOBUF_LIMIT_BYTES - 2**24
# Initializers of at least this many bytes go to the data file (onnx's default); scales and zero points stay.
EXTERNAL_TENSOR_MIN_BYTES = 1024
_EXAMPLE_BATCH = 2
_EXAMPLE_TOKENS = 3
# PixArt is not among them: TorchScript's exporter loses the token axis's size and writes its output squeeze as
# an If whose branch onnxruntime refuses.
EXPORTED_CLASSES = (UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel)


def export_onnx(
    unet: nn.Module,
    path: str | Path,
    *,
    format: str = "int8",
    schedule: Sequence[int] | torch.Tensor | None = None,
    calibration: Iterable[UNetInputs] | None = None,
    opset: int = DEFAULT_OPSET,
    exact_convs: bool | str | Sequence[str] = False,
    requantize_weights: bool = False,
    details: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    external_data_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD_BYTES,
) -> Path:
    """Write `unet` (a UNet or a DiT, see EXPORTED_CLASSES) to `path` as ONNX, to run with `OnnxUNet` (or
    `graph_engine`); an existing file is replaced only if tfmq exported it (or with `overwrite`). A graph of more than `external_data_threshold_bytes` (default: just under
    protobuf's 2 GB) keeps its weights in `<path>.data` beside it, under the graph's digest; the graph file
    alone is then small, and the two travel together.

    format "int8": a model from `tfmq.quantize`/`load_quantized` as a QDQ graph that onnxruntime runs on
    integer kernels. It serves the timesteps of `schedule` (the sampler's distinct timesteps; default and
    required to match: the model's timestep-table schedule). `calibration` (UNet keyword inputs, e.g.
    `trajectory_inputs(...)`) ranges the 8-bit conv outputs that integer convolution needs, and, for a model
    with an output correction, measures the mean error those grids add, which the graph's correction takes off
    too (`add_graph_error`). `exact_convs` keeps convs in float on dequantized operands instead, exact but not
    faster: all (True), or those whose names match fnmatch patterns, e.g. "up_blocks.*conv_shortcut" (a UNet's
    split shortcut convs, an output grid per input part on integer kernels: on fashion-ddpm W8A8 the convs
    whose exactness buys back the most quality for its time, see docs/design/integer_inference.md).
    Weights are exact: symmetric int8 up to 7 bits and for 8-bit weights on a grid centred on zero (weight
    init "symmetric"), otherwise uint8 with zero points at 8 bits (slower kernels);
    `requantize_weights=True` rounds 8-bit weights onto symmetric int8 instead (approximate; fast where the
    CPU's u8s8 kernels do not saturate, elsewhere `OnnxUNet` runs them exactly on u8u8 kernels).
    format "fp32": a full-precision model as it is, any timestep.
    The graph's inputs: `sample`, `step` (format "int8") or `timestep` ("fp32"), and the model's condition if it has one
    (`encoder_hidden_states` or a DiT's `class_labels`); its output: the predicted noise (a learned variance
    is left out).
    `details` (JSON values) is stored in the graph's metadata, e.g. the sampler it was exported for.
    """
    onnx = require("onnx")
    path = check_output_file(path, owned_graph, overwrite=overwrite)
    data_file = data_file_of(path)
    # the data file of the graph this export replaces, if any
    previous_data = os.path.lexists(data_file) and owned_data_file(path)
    if os.path.lexists(data_file) and not previous_data and not overwrite:
        raise TfmqError(f"{data_file} exists and was not written by tfmq: pass --overwrite to replace it, "
                        "or choose another path")
    if format not in FORMATS:
        raise TfmqError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    if opset not in SUPPORTED_OPSETS:
        raise TfmqError(f"opset {opset} is not supported; use {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}")
    if not isinstance(unet, EXPORTED_CLASSES):
        names = ", ".join(model_class.__name__ for model_class in EXPORTED_CLASSES)
        raise TfmqError(f"export takes a diffusers {names}; not a {type(unet).__name__}")
    quantized = any(isinstance(module, QuantLayer) for module in unet.modules())
    info_details = dict(details or {})
    if format == "fp32":
        if quantized:
            raise TfmqError("format 'fp32' exports a full-precision model; this one is quantized (use format 'int8')")
        if exact_convs or requantize_weights:
            raise TfmqError("exact convs (--exact-convs) and requantized weights shape the integer graph of a "
                            "quantized model; format 'fp32' has neither")
        graph, schedule_list = TimestepGraph(unet.eval(), condition_input(unet)), None
        timestep = torch.full((_EXAMPLE_BATCH,), 10, dtype=torch.int64)
    else:
        schedule_tensor = checked_schedule(unet, schedule)
        try:
            graph, counts = _integer_graph(unet, schedule_tensor, calibration, exact_convs, requantize_weights)
        except ValueError as exc:
            raise TfmqError(str(exc)) from exc
        info_details.update(counts, quant_config=unet.tfmq_info.to_dict()["quant_config"])
        schedule_list, timestep = schedule_tensor.tolist(), torch.tensor(0, dtype=torch.int64)
    info = GraphInfo(format, type(unet).__name__, _json_config(unet), schedule_list, info_details)
    # in eval mode, which the exporter restores on the graph and on the model inside it when it is done
    model = _traced(graph.eval(), unet, timestep, info, opset, onnx)
    external = _proto_bytes(model) > external_data_threshold_bytes
    if opset > TORCH_MAX_OPSET:
        model = _converted(model, opset, onnx, without_weights=external)
    if format == "int8" and opset >= UINT4_OPSET:
        info.details["uint4_weights"] = pack_uint4_weights(model, onnx)
    _compact_value_names(model)
    for key, value in info.to_props().items():
        model.metadata_props.add(key=key, value=value)
    if external:
        _write_external_data(model, data_file, onnx)
    model.metadata_props.add(key=DIGEST_KEY, value=graph_digest(model))  # last: nothing changes the graph after
    written = write_bytes_atomic(path, lambda temporary: onnx.save(model, str(temporary)))
    if previous_data and not external:
        data_file.unlink(missing_ok=True)  # the replaced graph's weights: nothing refers to them any more
    return written


def checked_schedule(unet: nn.Module, schedule: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    """The timesteps an integer engine of `unet` serves (`schedule`, or its timestep tables' own), after a
    one-line error for a model such an engine cannot run."""
    if getattr(unet, "tfmq_info", None) is None or not any(isinstance(module, QuantLayer) for module in unet.modules()):
        raise TfmqError(f"this {type(unet).__name__} was never quantized (no tfmq_info or no quantized layer): "
                        "integer inference (format 'int8') needs a model from tfmq.quantize or load_quantized; use "
                        "format 'fp32' for the full-precision model")
    # What the model is (its manifest), not what its config asked for, decides what the graph can hold.
    manifest = ModelManifest.of(unet)
    if manifest.timestep_tables is not None and manifest.timestep_tables.scope == "all":
        raise TfmqError("fsc_scope='all' gives every activation a scale per timestep, and integer kernels need "
                        "constant scales: quantize with fsc_scope 'temporal' or 'none' for integer inference")
    activation_bits = [bits for plan in manifest.plan.layers.values() for bits in (plan.a_bits,) if bits is not None]
    activation_bits += [bits for plan in manifest.plan.attentions.values() for bits in (plan.a_bits, plan.probs_bits)
                        if bits is not None]
    if activation_bits and max(activation_bits) > KERNEL_BITS:
        raise TfmqError(f"a_bits={max(activation_bits)}: integer kernels take at most {KERNEL_BITS}-bit activations")
    if getattr(unet, "class_embedding", None) is not None:
        raise TfmqError("class-conditional UNets are not supported by the integer export (the temporal table "
                        "would need a row per timestep and class)")
    if unet.config.get("time_embedding_type") == "fourier":
        raise TfmqError("UNets with fourier time embeddings divide their output by the timestep: not supported "
                        "by the integer export")
    tables = timestep_tables(unet)
    if tables is not None:
        if schedule is not None and torch.as_tensor(schedule).tolist() != tables.schedule.tolist():
            raise TfmqError("the schedule given differs from the one the model's timestep tables were "
                            "calibrated for; export with the model's own schedule")
        return tables.schedule.cpu()
    if schedule is None:
        raise TfmqError("an integer graph serves a fixed list of timesteps: pass schedule= (the sampler's, "
                        "e.g. distinct_timesteps(sampling_timesteps(scheduler, config)) from tfmq.sampling)")
    schedule = torch.as_tensor(schedule).reshape(-1).to(torch.int64)
    if len(schedule) == 0 or len(schedule.unique()) != len(schedule):
        raise TfmqError("the schedule must be a non-empty list of distinct timesteps")
    return schedule


def _integer_graph(
    unet: nn.Module, schedule: torch.Tensor, calibration: Iterable[UNetInputs] | None,
    exact_convs: bool | str | Sequence[str], requantize_weights: bool,
) -> tuple[StepGraph, dict[str, int]]:
    capable = integer_conv_names(unet)
    exact = exact_conv_names(capable, exact_convs)
    names = [name for name in capable if name not in exact]
    if names and calibration is None:
        raise ValueError("integer convolutions need calibration inputs for their 8-bit output grids: pass "
                         "calibration= (e.g. trajectory_inputs(unet, scheduler, sampler)) or exact_convs=True")
    calibration = None if calibration is None else list(calibration)  # read twice
    grids = conv_output_grids(unet, names, calibration) if names else {}
    graph, counts = integer_twin(unet, schedule, grids, condition_input(unet), requantize_weights)
    corrected = 0 if calibration is None else add_graph_error(graph, unet, schedule, calibration)
    split = sum(len(parts) == 2 for parts in grids.values())
    return graph, {**counts, "integer_convs": len(grids), "split_integer_convs": split, "exact_convs": len(exact),
                   "correction_graph_error_steps": corrected}


def condition_input(model: nn.Module) -> str | None:
    """The name of the graph's condition input: the text states of a text-conditional UNet, the class labels
    of a DiT, none for an unconditional UNet."""
    if isinstance(model, UNet2DConditionModel):
        return ENCODER_HIDDEN_STATES
    if isinstance(model, DiTTransformer2DModel):
        return CLASS_LABELS
    return None


def _example_condition(model: nn.Module) -> torch.Tensor | None:
    config = model.config
    if isinstance(model, UNet2DConditionModel):
        return torch.randn(_EXAMPLE_BATCH, _EXAMPLE_TOKENS, config.cross_attention_dim)
    if isinstance(model, DiTTransformer2DModel):
        return torch.arange(_EXAMPLE_BATCH) % config.num_embeds_ada_norm
    return None


def _json_config(unet: nn.Module) -> dict[str, Any]:
    return {key: value for key, value in dict(unet.config).items() if not key.startswith("_")}


def _traced(graph: nn.Module, unet: nn.Module, timestep: torch.Tensor, info: GraphInfo, opset: int, onnx) -> Any:
    """Trace `graph` with TorchScript's exporter (dynamic batch and text length) and load the result, at the
    exporter's opset (at most `TORCH_MAX_OPSET`). Past 2 GB the exporter writes the weights beside the graph,
    in the temporary folder, and they are loaded into memory with it."""
    config = unet.config
    sample = torch.randn(_EXAMPLE_BATCH, config.in_channels, config.sample_size, config.sample_size)
    args: tuple = (sample, timestep)
    names = [SAMPLE, info.timestep_input]
    dynamic = {SAMPLE: {0: "batch"}, OUTPUT: {0: "batch"}}
    if timestep.dim() > 0:
        dynamic[info.timestep_input] = {0: "batch"}
    condition = condition_input(unet)
    if condition is not None:
        args += (_example_condition(unet),)
        names.append(condition)
        dynamic[condition] = {0: "batch", 1: "tokens"} if condition == ENCODER_HIDDEN_STATES else {0: "batch"}
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        # diffusers' shape checks (asserts, size branches) are constant for a fixed sample size; the
        # TorchScript exporter is deprecated but the only one that takes our QDQ symbolics as they are
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced_file = Path(folder) / "graph.onnx"
        with torch.no_grad():
            torch.onnx.export(graph, args, str(traced_file), dynamo=False, opset_version=min(opset, TORCH_MAX_OPSET),
                              input_names=names, output_names=[OUTPUT], dynamic_axes=dynamic,
                              do_constant_folding=True)
        return onnx.load(str(traced_file))


def _proto_bytes(model: Any) -> int:
    """The serialised size of the graph's initializers and nodes, counted one by one: protobuf refuses to encode
    the whole past 2 GB."""
    return (sum(tensor.ByteSize() for tensor in model.graph.initializer)
            + sum(node.ByteSize() for node in model.graph.node))


def _converted(model: Any, opset: int, onnx, *, without_weights: bool) -> Any:
    """`model` at `opset` by onnx's version converter, which passes the model through one serialised proto.
    `without_weights` (a model past protobuf's 2 GB): the converter gets the graph with its initializers' bytes
    taken out (its adapters read node attributes and shapes, not weights), and the converted graph gets them
    back by name."""
    if not without_weights:
        return onnx.version_converter.convert_version(model, opset)
    weights = {}
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data"):
            weights[tensor.name] = tensor.raw_data
            tensor.ClearField("raw_data")
    converted = onnx.version_converter.convert_version(model, opset)
    for tensor in converted.graph.initializer:
        if tensor.name in weights:
            tensor.raw_data = weights.pop(tensor.name)
    if weights:
        raise TfmqError(f"onnx's version converter dropped {len(weights)} initializers (e.g. {next(iter(weights))}) "
                        f"converting to opset {opset}: export with opset {TORCH_MAX_OPSET}")
    return converted


def _write_external_data(model: Any, data_file: Path, onnx) -> None:
    """Move the graph's large initializers to `data_file` (written under a temporary name, then renamed into
    place, as the graph itself is after it) and record the file's size and SHA-256 in the graph's props, under
    its digest: a changed or mismatched data file is refused at load like a changed graph."""
    helper = onnx.external_data_helper
    moved = [tensor for tensor in model.graph.initializer
             if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_TENSOR_MIN_BYTES]

    def write(temporary: Path) -> None:
        for tensor in moved:
            helper.set_external_data(tensor, temporary.name)  # onnx appends each tensor to this file, in order
        helper.write_external_data_tensors(model, str(temporary.parent))

    write_bytes_atomic(data_file, write)
    for tensor in moved:  # the graph refers to the data file by the name it has now
        next(entry for entry in tensor.external_data if entry.key == "location").value = data_file.name
    model.metadata_props.add(key=DATA_KEY, value=data_record(data_file))


def pack_uint4_weights(model: Any, onnx) -> int:
    """Store every int8 weight whose codes span at most 16 values per channel (weights of at most 4 bits)
    as uint4 codes with a uint4 zero point per channel: exact, half the bytes. Returns how many were packed.
    `OnnxUNet` widens them back to symmetric int8 at load."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    packed = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or node.input[0] not in initializers:
            continue
        codes = initializers[node.input[0]]
        if codes.data_type != onnx.TensorProto.INT8 or len(codes.dims) < 2:
            continue
        axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1)
        centred = np.moveaxis(onnx.numpy_helper.to_array(codes).astype(np.int16), axis, 0)
        flat = centred.reshape(len(centred), -1)
        zero_point = -flat.min(axis=1)
        if int((flat.max(axis=1) + zero_point).max()) > UINT4_MAX:
            continue
        unsigned = np.moveaxis(centred + zero_point.reshape(-1, *([1] * (centred.ndim - 1))), 0, axis)
        codes.CopyFrom(_uint4_tensor(codes.name, unsigned, onnx))
        # A fresh zero point: the exporter may share one initializer between several weights.
        uint4_zero_point = _uint4_tensor(f"{codes.name}.zero_point_uint4", zero_point, onnx)
        model.graph.initializer.append(uint4_zero_point)
        node.input[2] = uint4_zero_point.name
        packed += 1
    return packed


def _uint4_tensor(name: str, values: np.ndarray, onnx) -> Any:
    """Two codes a byte, the first in the low nibble (ONNX's layout); raw bytes, not a varint list."""
    flat = values.astype(np.uint8).flatten()
    if len(flat) % 2:
        flat = np.append(flat, np.uint8(0))
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    return onnx.helper.make_tensor(name, onnx.TensorProto.UINT4, values.shape, packed.tobytes(), raw=True)


def _compact_value_names(model: Any) -> None:
    """Drop the shape annotations and give intermediate values short names: with 4-bit weights the exporter's
    scope-path names took a third of the file. Inputs, outputs, initializers and node names stay; the
    branches of an If (the exporter's squeeze of a dynamic axis) read outer values under their new names."""
    del model.graph.value_info[:]
    kept = {value.name for value in (*model.graph.input, *model.graph.output, *model.graph.initializer)}
    short: dict[str, str] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.output):
            if name and name not in kept:
                node.output[index] = short.setdefault(name, f"v{len(short)}")
    _rename_inputs(model.graph, short)


def _rename_inputs(graph: Any, names: Mapping[str, str]) -> None:
    """Every node input (and subgraph output) of `graph` and of its subgraphs under its name in `names`."""
    for node in graph.node:
        for index, name in enumerate(node.input):
            node.input[index] = names.get(name, name)
        for attribute in node.attribute:
            for subgraph in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                for output in subgraph.output:
                    output.name = names.get(output.name, output.name)
                _rename_inputs(subgraph, names)
