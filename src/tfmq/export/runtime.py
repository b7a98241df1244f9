"""`OnnxUNet`: an exported graph in onnxruntime, called like a diffusers UNet so the sampler runs unchanged."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.unets.unet_2d import UNet2DOutput

from tfmq.errors import TfmqError
from tfmq.export.dependencies import require
from tfmq.export.metadata import ENCODER_HIDDEN_STATES, SAMPLE, STEP, GraphInfo


class OnnxUNet:
    """`engine(sample, timestep, encoder_hidden_states=None)` -> object with `.sample`, and `.config` as the
    UNet's, so `tfmq.sampling.sample(engine, scheduler, ...)` runs the whole loop in onnxruntime.

    An integer graph serves the timesteps of its schedule only (`info.schedule`), one timestep per batch.
    4-bit stored weights are widened to int8 in memory at load: onnxruntime fuses int8 QDQ into integer
    kernels, 4-bit not (measured: it dequantizes them to float on every call); `widen_4bit=False` runs
    the graph as stored, for comparison. `threads` defaults to torch's
    intra-op thread count; `profile` makes onnxruntime record per-op times (see `end_profiling`).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None, profile: bool = False,
                 widen_4bit: bool = True) -> None:
        onnx = require("onnx")
        ort = require("onnxruntime")
        path = Path(path)
        if not path.is_file():
            raise TfmqError(f"{path} does not exist or is not a file")
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # protobuf raises DecodeError, onnx its own errors
            raise TfmqError(f"cannot read {path} as ONNX: {str(exc).splitlines()[0]}") from exc
        self.info = GraphInfo.from_props({prop.key: prop.value for prop in model.metadata_props}, str(path))
        self.config = FrozenDict(self.info.unet_config)
        self.path = path
        if widen_4bit:
            widen_uint4_weights(model, onnx)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.enable_profiling = profile
        options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "tfmq_onnxruntime_profile")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # warnings about initializers the optimizer folded away are noise
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self._rows = None if self.info.schedule is None else {t: row for row, t in enumerate(self.info.schedule)}
        self._input_names = {entry.name for entry in self.session.get_inputs()}

    def __repr__(self) -> str:
        steps = "" if self.info.schedule is None else f", steps={len(self.info.schedule)}"
        return f"OnnxUNet({self.path.name}, format={self.info.format}, {self.info.unet_class}{steps})"

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor | int | float,
        encoder_hidden_states: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        if class_labels is not None:
            raise TfmqError("class labels are not supported by exported graphs")
        feeds: dict[str, np.ndarray] = {SAMPLE: sample.detach().float().cpu().numpy()}
        timesteps = torch.as_tensor(timestep).detach().reshape(-1).cpu()
        if self._rows is None:
            feeds[self.info.timestep_input] = timesteps.to(torch.int64).expand(len(sample)).numpy().copy()
        else:
            feeds[STEP] = np.array(self.step_index(timesteps), dtype=np.int64)
        if ENCODER_HIDDEN_STATES in self._input_names:
            if encoder_hidden_states is None:
                raise TfmqError("this graph is text-conditional: pass encoder_hidden_states")
            feeds[ENCODER_HIDDEN_STATES] = encoder_hidden_states.detach().float().cpu().numpy()
        elif encoder_hidden_states is not None:
            raise TfmqError("this graph takes no encoder_hidden_states (it is not text-conditional)")
        noise = torch.from_numpy(self.session.run(None, feeds)[0]).to(sample.device, sample.dtype)
        return UNet2DOutput(sample=noise) if return_dict else (noise,)

    def step_index(self, timesteps: torch.Tensor) -> int:
        """The row of the schedule a batch's timestep selects; an error for mixed or unscheduled timesteps."""
        values = sorted(set(timesteps.tolist()))
        if len(values) != 1:
            raise TfmqError(f"an integer graph takes one timestep per batch, got {len(values)} different ones")
        value = values[0]
        row = self._rows.get(int(value)) if float(value).is_integer() else None
        if row is None:
            schedule = self.info.schedule
            raise TfmqError(f"timestep {value} is not in the exported schedule ({len(schedule)} steps, "
                            f"{max(schedule)}..{min(schedule)}): sample with the schedule the graph was exported for")
        return row

    def end_profiling(self) -> str:
        """Stop onnxruntime's profiler (when `profile=True`) and return its JSON trace file (in the temporary
        folder; the caller removes it)."""
        return self.session.end_profiling()


def widen_uint4_weights(model: Any, onnx) -> int:
    """Turn uint4 weight codes q and zero points z back into symmetric int8 codes q - z, in place (exact):
    the graph then fuses into integer kernels. Returns how many weights were widened."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    widened = 0
    for node in model.graph.node:
        codes = initializers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if codes is None or codes.data_type != onnx.TensorProto.UINT4:
            continue
        axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1)
        unsigned = onnx.numpy_helper.to_array(codes).astype(np.int16)
        zero_point = onnx.numpy_helper.to_array(initializers[node.input[2]]).astype(np.int16)
        shape = [1] * unsigned.ndim
        shape[axis] = -1
        codes.CopyFrom(onnx.numpy_helper.from_array((unsigned - zero_point.reshape(shape)).astype(np.int8), codes.name))
        zeros = onnx.numpy_helper.from_array(np.zeros(len(zero_point), np.int8), f"{codes.name}.zero_point_int8")
        model.graph.initializer.append(zeros)
        node.input[2] = zeros.name
        widened += 1
    return widened
