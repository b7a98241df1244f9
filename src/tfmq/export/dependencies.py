"""onnx and onnxruntime are optional (the `onnx` extra): only export and integer inference need them; the
OpenVINO engine needs the `openvino` extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from tfmq.errors import TfmqError

INSTALL_HINT = "pip install 'tfmq[onnx]'"
OPENVINO_HINT = "pip install 'tfmq[openvino]'"


def require(module_name: str, purpose: str = "ONNX export and integer inference need the onnx extra",
            hint: str = INSTALL_HINT) -> ModuleType:
    """Import `module_name`, or tell the user in one line which extra to install."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        reason = next(iter(str(exc).splitlines()), "") or type(exc).__name__
        raise TfmqError(f"{module_name} cannot be imported ({reason}); {purpose}: {hint}") from exc
