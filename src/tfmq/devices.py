"""Where a run computes and in which dtype: the device a user names, and the device and dtype a model is on.

Everything tfmq creates for a model (quantizer ranges, step tables, caches, calibration batches, AdaRound
variables) goes where the model is, so a model moved to a GPU quantizes there with nothing else to say.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tfmq.errors import TfmqError

DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"
_DEVICE_SPEC = re.compile(r"cpu|auto|cuda(?::(\d+))?")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """The torch device of `spec` ("cpu", "cuda", "cuda:N", "auto": the first GPU if there is one), once it
    exists on this machine; None is the CPU."""
    if spec is None:
        return torch.device("cpu")
    if isinstance(spec, torch.device):
        spec = str(spec)
    match = _DEVICE_SPEC.fullmatch(spec.strip().lower())
    if match is None:
        raise TfmqError(f"device must be {DEVICE_CHOICES}; got {spec!r}")
    name = match.group(0)
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TfmqError(f"device {spec!r}: this machine has no CUDA GPU (torch {torch.__version__}"
                        f"{'' if torch.version.cuda else ', a CPU-only build'}); use --device cpu")
    count = torch.cuda.device_count()
    index = 0 if match.group(1) is None else int(match.group(1))
    if index >= count:
        raise TfmqError(f"device {spec!r}: there is no GPU {index}, this machine has {count} "
                        f"(cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype of `name` (float32, float16, bfloat16); None stays None (the model's own)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise TfmqError(f"dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """'float16' for torch.float16: the name checkpoints record."""
    return str(dtype).removeprefix("torch.")


def module_device(module: nn.Module | object) -> torch.device:
    """The device of `module`'s first parameter or buffer (the CPU for a module with neither, or for an engine
    that is no torch module, such as onnxruntime's)."""
    if not isinstance(module, nn.Module):
        return torch.device("cpu")
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def module_dtype(module: nn.Module | object) -> torch.dtype:
    """The dtype of `module`'s first floating-point parameter: what its inputs must be cast to (float32 for
    a module without one, or an engine that is no torch module)."""
    if not isinstance(module, nn.Module):
        return torch.float32
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def on_device(inputs: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Keyword inputs with their tensors moved to `device` (a no-op for those already there)."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}
