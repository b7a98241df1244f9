"""`OnnxUNet`: an exported graph in onnxruntime, called like a diffusers UNet so the sampler runs unchanged
(whether the graph is a UNet's or a diffusion transformer's); `ExportedGraph`: what it shares with the other
engines that run such graphs (`tfmq.export.openvino_runtime`)."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.unets.unet_2d import UNet2DOutput

from tfmq.arguments import GRAPH_ENGINES
from tfmq.errors import TfmqError
from tfmq.export.dependencies import require
from tfmq.export.metadata import (
    CLASS_LABELS,
    ENCODER_HIDDEN_STATES,
    SAMPLE,
    STEP,
    GraphInfo,
    check_digest,
    check_external_data,
)
from tfmq.export.qdq import INT8_MAX

# The largest int8 weight code whose products with uint8 activations never leave int16 in pairs:
# 255 * (64 + 64) < 2^15 (onnxruntime's reduce_range bound).
U8S8_SAFE_MAX = 64


class ExportedGraph:
    """A graph written by `export_onnx`, read and checked, and called like a diffusers UNet: what every engine
    running such a graph shares. `engine(sample, timestep, encoder_hidden_states=None, class_labels=None)` ->
    object with `.sample` (the predicted noise), and `.config` as the exported model's, so
    `tfmq.sampling.sample(engine, scheduler, ...)` runs the whole loop on the engine.

    The graph's digest (and its data file's, for a graph exported with external data, read from beside it) is
    checked before anything runs; `files` lists what the export is made of. An integer graph serves the
    timesteps of its schedule only (`info.schedule`), one timestep per batch; a schedule-free one (every
    training timestep) serves any timestep of that range, a fractional one at the nearest integer's row, as
    the torch model does.
    4-bit stored weights are widened to int8 in memory at load: the runtimes fuse int8 QDQ into integer
    kernels, 4-bit not (measured: onnxruntime dequantizes them to float on every call); `widen_4bit=False`
    runs the graph as stored, for comparison. On a CPU whose u8s8 kernels saturate (`u8s8_saturates`), int8
    weights beyond +-64 are moved to uint8 with a zero point (exact, the slower u8u8 kernels): their
    integer sums would otherwise be clipped.
    """

    def __init__(self, path: str | Path, *, widen_4bit: bool = True) -> None:
        onnx = require("onnx")
        path = Path(path)
        if not path.is_file():
            raise TfmqError(f"{path} does not exist or is not a file")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf raises DecodeError, onnx its own errors
            raise TfmqError(f"cannot read {path} as ONNX: {str(exc).splitlines()[0]}") from exc
        check_digest(model, str(path))
        data_file = check_external_data(model, path)
        self.info = GraphInfo.from_props({prop.key: prop.value for prop in model.metadata_props}, str(path))
        self.config = FrozenDict(self.info.unet_config)
        self.path = path
        self.files = [path] if data_file is None else [path, data_file]
        # the initializers kept in the data file
        self.external = {tensor.name for tensor in model.graph.initializer
                         if onnx.external_data_helper.uses_external_data(tensor)}
        if self.external:
            try:
                onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
            except (OSError, ValueError) as exc:
                raise TfmqError(f"cannot read {data_file}: {str(exc).splitlines()[0]}") from exc
        if widen_4bit:
            widen_uint4_weights(model, onnx)
        if u8s8_saturates():
            widen_saturating_int8_weights(model, onnx)
        self.model = model  # the graph as the engine runs it; an engine may drop it once it has built its own
        self.rows = None if self.info.schedule is None else ScheduleRows(self.info.schedule)
        self.schedule_free = self.rows is not None and self.rows.schedule_free
        initializers = {tensor.name for tensor in model.graph.initializer}
        self._input_names = {entry.name for entry in model.graph.input} - initializers

    def __repr__(self) -> str:
        steps = "" if self.info.schedule is None else f", steps={len(self.info.schedule)}"
        return f"{type(self).__name__}({self.path.name}, format={self.info.format}, {self.info.unet_class}{steps})"

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The graph's output for `feeds` (the engine's runtime)."""
        raise NotImplementedError

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor | int | float,
        encoder_hidden_states: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        noise = torch.from_numpy(self.run(self.feeds(sample, timestep, encoder_hidden_states, class_labels)))
        noise = noise.to(sample.device, sample.dtype)
        return UNet2DOutput(sample=noise) if return_dict else (noise,)

    def feeds(self, sample: torch.Tensor, timestep: torch.Tensor | int | float,
              encoder_hidden_states: torch.Tensor | None = None,
              class_labels: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """The graph's inputs for one denoiser call: the sample, the timestep or its schedule row, and the text
        states of a text-conditional graph or the labels of a class-conditional one (any runtime reading the
        graph takes these)."""
        feeds: dict[str, np.ndarray] = {SAMPLE: sample.detach().float().cpu().numpy()}
        timesteps = torch.as_tensor(timestep).detach().reshape(-1).cpu()
        if self.rows is None:
            feeds[self.info.timestep_input] = timesteps.to(torch.int64).expand(len(sample)).numpy().copy()
        else:
            feeds[STEP] = np.array(self.rows.row(timesteps), dtype=np.int64)
        if ENCODER_HIDDEN_STATES in self._input_names:
            if encoder_hidden_states is None:
                raise TfmqError("this graph is text-conditional: pass encoder_hidden_states")
            feeds[ENCODER_HIDDEN_STATES] = encoder_hidden_states.detach().float().cpu().numpy()
        elif encoder_hidden_states is not None:
            raise TfmqError("this graph takes no encoder_hidden_states (it is not text-conditional)")
        if CLASS_LABELS in self._input_names:
            if class_labels is None:
                raise TfmqError("this graph is class-conditional: pass class_labels")
            labels = torch.as_tensor(class_labels).detach().reshape(-1).cpu().to(torch.int64)
            null_label = self.config.get("num_embeds_ada_norm")  # a DiT's label table: its classes, then the null
            if null_label is not None and not bool(((labels >= 0) & (labels <= null_label)).all()):
                raise TfmqError(f"class label {int(labels[(labels < 0) | (labels > null_label)][0])} is outside "
                                f"0..{null_label} ({null_label} classes, then the null label)")
            feeds[CLASS_LABELS] = labels.expand(len(sample)).numpy().copy() if len(labels) == 1 else labels.numpy()
        elif class_labels is not None:
            raise TfmqError("this graph takes no class_labels (it is not class-conditional)")
        return feeds


class ScheduleRows:
    """The table rows of an integer engine's schedule: which row serves a batch's timestep. A schedule-free one
    (a row for every training timestep 0..T-1) serves any sampler's timesteps, a fractional one at the nearest
    integer's row, as the torch model does."""

    def __init__(self, schedule: list[int]) -> None:
        self.schedule = list(schedule)
        self._rows = {t: row for row, t in enumerate(self.schedule)}
        self.schedule_free = self.schedule == list(range(len(self.schedule)))

    def row(self, timesteps: torch.Tensor) -> int:
        """The row of the schedule a batch's timestep selects; an error for mixed or unscheduled timesteps."""
        values = sorted(set(timesteps.reshape(-1).tolist()))
        if len(values) != 1:
            raise TfmqError(f"an integer engine takes one timestep per batch, got {len(values)} different ones")
        value = values[0]
        if self.schedule_free:
            if not 0 <= round(value) < len(self.schedule):
                raise TfmqError(f"timestep {value} is outside the training range 0..{len(self.schedule) - 1} that "
                                "this schedule-free engine serves")
            return round(value)  # row t is timestep t; a fractional timestep takes the nearest integer's row
        row = self._rows.get(int(value)) if float(value).is_integer() else None
        if row is None:
            raise TfmqError(f"timestep {value} is not in the exported schedule ({len(self.schedule)} steps, "
                            f"{max(self.schedule)}..{min(self.schedule)}): sample with the schedule the engine "
                            "was built for")
        return row


class OnnxUNet(ExportedGraph):
    """An exported graph in onnxruntime (see ExportedGraph). `threads` defaults to torch's intra-op thread
    count; `profile` makes onnxruntime record per-op times (see `end_profiling`)."""

    def __init__(self, path: str | Path, *, threads: int | None = None, profile: bool = False,
                 widen_4bit: bool = True) -> None:
        super().__init__(path, widen_4bit=widen_4bit)
        onnx = require("onnx")
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.enable_profiling = profile
        options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "tfmq_onnxruntime_profile")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # warnings about initializers the optimizer folded away are noise
        self.session = _session(self.model, self.external, options, ort, onnx)
        del self.model  # the session holds the weights

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, feeds)[0]

    def end_profiling(self) -> str:
        """Stop onnxruntime's profiler (when `profile=True`) and return its JSON trace file (in the temporary
        folder; the caller removes it)."""
        return self.session.end_profiling()


def graph_engine(path: str | Path, engine: str = "onnxruntime", *, threads: int | None = None) -> ExportedGraph:
    """The exported graph at `path` in the runtime named `engine` (one of GRAPH_ENGINES)."""
    if engine == "onnxruntime":
        return OnnxUNet(path, threads=threads)
    if engine == "openvino":
        from tfmq.export.openvino_runtime import OpenVinoUNet  # its module imports this one

        return OpenVinoUNet(path, threads=threads)
    raise TfmqError(f"unknown graph engine {engine!r}; use one of {', '.join(GRAPH_ENGINES)}")


def _session(model: Any, external: set[str], options: Any, ort, onnx) -> Any:
    """onnxruntime takes the graph as one serialised proto, which protobuf limits to 2 GB: the initializers named
    in `external` (those the file kept in its data file) go to it as OrtValues instead, and the proto keeps only
    their names, shapes and types (`add_external_initializers` replaces such external tensors)."""
    names, values = [], []
    for tensor in model.graph.initializer:
        # numpy has no 4-bit type: 4-bit codes (run as stored) stay in the proto, half a byte a weight
        if tensor.name in external and tensor.data_type not in (onnx.TensorProto.UINT4, onnx.TensorProto.INT4):
            names.append(tensor.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(onnx.numpy_helper.to_array(tensor)))
            onnx.external_data_helper.set_external_data(tensor, "tfmq-in-memory")
            tensor.ClearField("raw_data")
    if names:
        options.add_external_initializers(names, values)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def widen_uint4_weights(model: Any, onnx) -> int:
    """Turn uint4 weight codes q and zero points z back into symmetric int8 codes q - z, in place (exact):
    the graph then fuses into integer kernels. Returns how many weights were widened."""
    widened = 0
    for node, codes, zero_point, axis in _dequantized_weights(model, onnx.TensorProto.UINT4, onnx):
        shape = [1] * codes.ndim
        shape[axis] = -1
        _replace_weight(model, node, (codes - zero_point.reshape(shape)).astype(np.int8),
                        np.zeros(len(zero_point), np.int8), onnx)
        widened += 1
    return widened


def widen_saturating_int8_weights(model: Any, onnx) -> int:
    """Move int8 weights with a code beyond +-U8S8_SAFE_MAX to uint8 codes and zero points, both shifted by 128,
    in place (exact): onnxruntime then runs them on its u8u8 kernels, which sum in int32. Returns how many."""
    widened = 0
    for node, codes, zero_point, _ in _dequantized_weights(model, onnx.TensorProto.INT8, onnx):
        if int(np.abs(codes).max(initial=0)) > U8S8_SAFE_MAX:
            _replace_weight(model, node, (codes + 128).astype(np.uint8), (zero_point + 128).astype(np.uint8), onnx)
            widened += 1
    return widened


def _dequantized_weights(model: Any, data_type: int, onnx) -> Iterator[tuple[Any, np.ndarray, np.ndarray, int]]:
    """(DequantizeLinear node, its codes, its zero point, as int16, and its axis) for every weight initializer
    of `data_type` that a DequantizeLinear reads."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}

    def initializer(name: str) -> Any:
        # The exporter shares equal constants: a zero point may be an Identity of another weight's.
        while name not in initializers and producers[name].op_type == "Identity":
            name = producers[name].input[0]
        return initializers[name]

    for node in list(model.graph.node):
        codes = initializers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if codes is None or codes.data_type != data_type or len(node.input) < 3:
            continue
        axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1)
        yield (node, onnx.numpy_helper.to_array(codes).astype(np.int16),
               onnx.numpy_helper.to_array(initializer(node.input[2])).astype(np.int16), axis)


def _replace_weight(model: Any, node: Any, codes: np.ndarray, zero_point: np.ndarray, onnx) -> None:
    """New codes in place of `node`'s, and a fresh zero point (the exporter may share one between weights)."""
    codes_name = node.input[0]
    tensor = next(tensor for tensor in model.graph.initializer if tensor.name == codes_name)
    tensor.CopyFrom(onnx.numpy_helper.from_array(codes, codes_name))
    fresh = onnx.numpy_helper.from_array(zero_point, f"{codes_name}.zero_point_{zero_point.dtype}")
    model.graph.initializer.append(fresh)
    node.input[2] = fresh.name


@functools.cache
def u8s8_saturates() -> bool:
    """Whether onnxruntime's u8s8 integer kernels on this CPU clip their sums: on x86 without VNNI (AVX2,
    AVX-512 without VNNI) they add each pair of uint8 x int8 products in int16 with saturation (VPMADDUBSW),
    so 255 * 127 + 255 * 127 comes out as 32767. Measured once per process on a one-op graph."""
    onnx = require("onnx")
    ort = require("onnxruntime")
    helper = onnx.helper
    weights = onnx.numpy_helper.from_array(np.full((2, 1), INT8_MAX, np.int8), "weights")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["activations", "weights"], ["sums"])], "u8s8_probe",
        [helper.make_tensor_value_info("activations", onnx.TensorProto.UINT8, [1, 2])],
        [helper.make_tensor_value_info("sums", onnx.TensorProto.INT32, [1, 1])], [weights])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                   .SerializeToString(), options, providers=["CPUExecutionProvider"])
    sums = session.run(None, {"activations": np.full((1, 2), 255, np.uint8)})[0]
    return int(sums[0, 0]) != 2 * 255 * INT8_MAX
