"""onnx and onnxruntime are optional: only export and integer inference need them."""

from __future__ import annotations

import importlib
from types import ModuleType

from tfmq.errors import TfmqError


def require(module_name: str) -> ModuleType:
    """Import `module_name`, or tell the user in one line what to install."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise TfmqError(f"{module_name} cannot be imported ({exc}); ONNX export and integer inference need "
                        "`pip install onnx onnxruntime`") from exc
