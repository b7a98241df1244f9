"""A check that code puts every tensor it makes where the model is, run on a CPU-only machine.

On a GPU, a tensor made without a device lands on the CPU beside a model on CUDA: it fails there, or costs a
copy. Here the default device is made `meta` while the model and data stay on the CPU, so every tensor made
without naming a device comes out on `meta`; a torch-function mode records each such result with the line of
tfmq that made it. Tensors on the CPU are where the model is (or, named explicitly, host bookkeeping).
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten


class _OffDeviceResults(TorchFunctionMode):
    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.offenders: dict[str, str] = {}  # where -> the torch function

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        inputs = tree_flatten((args, kwargs))[0]
        if kwargs.get("device") is not None or any(isinstance(value, torch.Tensor) and value.is_meta
                                                   for value in inputs):
            return result  # a device named on purpose (a module built on `meta`), or work on such a tensor
        for value in tree_flatten(result)[0]:
            if isinstance(value, torch.Tensor) and value.device != self.device:
                self.offenders.setdefault(_tfmq_caller(), getattr(func, "__name__", repr(func)))
                break
        return result


def _tfmq_caller() -> str:
    frames = [frame for frame in traceback.extract_stack() if "/src/tfmq/" in frame.filename]
    if not frames:
        frames = [frame for frame in traceback.extract_stack() if "/site-packages/" in frame.filename] or [None]
    frame = frames[-1]
    return "outside tfmq" if frame is None else f"{frame.filename.split('/src/')[-1]}:{frame.lineno} {frame.line}"


@contextmanager
def tensors_stay_on_cpu() -> Iterator[dict[str, str]]:
    """Run the block with `meta` as the default device; yields the offenders found (where -> function)."""
    tracker = _OffDeviceResults(torch.device("cpu"))
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        with tracker:
            yield tracker.offenders
    finally:
        torch.set_default_device(previous)
