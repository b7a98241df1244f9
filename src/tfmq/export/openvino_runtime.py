"""`OpenVinoUNet`: an exported graph in OpenVINO's CPU runtime, called like `OnnxUNet`.

OpenVINO reads the same QDQ graph (tfmq's calibrated grids and per-step tables, as exported) and runs it on
its own int8 kernels; on a diffusion transformer it is the faster runtime on this project's CPU
(`benchmarks/results/integer_inference_dit.md`), on the shipped UNet onnxruntime is.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from tfmq.export.dependencies import OPENVINO_HINT, require
from tfmq.export.runtime import ExportedGraph

# The float parts in float32, so the engine computes what the fake-quant model computes (OpenVINO's default
# on a CPU with bf16 would run them in bf16).
PRECISION = "f32"


class OpenVinoUNet(ExportedGraph):
    """An exported graph compiled by OpenVINO for the CPU (see ExportedGraph for what it serves and checks).
    `threads` defaults to torch's intra-op thread count."""

    def __init__(self, path: str | Path, *, threads: int | None = None, widen_4bit: bool = True) -> None:
        openvino = require("openvino", "the OpenVINO engine needs the openvino extra", OPENVINO_HINT)
        onnx = require("onnx")
        super().__init__(path, widen_4bit=widen_4bit)
        core = openvino.Core()
        with tempfile.TemporaryDirectory() as folder:
            # OpenVINO reads ONNX from a file: the graph as widened here, its weights beside it past 2 GB
            widened = Path(folder) / "graph.onnx"
            onnx.save(self.model, str(widened), save_as_external_data=bool(self.external))
            del self.model
            self.compiled = core.compile_model(core.read_model(str(widened)), "CPU", {
                "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(), "INFERENCE_PRECISION_HINT": PRECISION,
                "PERFORMANCE_HINT": "LATENCY"})
        self._request = self.compiled.create_infer_request()

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self._request.infer(feeds)[0].copy()  # the request reuses its output buffer
