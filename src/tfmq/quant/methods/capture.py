"""Capturing a reconstruction unit's inputs and targets: one forward of each model per calibration batch,
stopped as soon as the unit's modules have been reached, the inputs kept as call templates plus cached rows."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tfmq.denoiser import denoiser_call
from tfmq.devices import module_device, on_device
from tfmq.quant.methods.unit_cache import UnitCache

if TYPE_CHECKING:
    from tfmq.quant.methods.units import ReconstructionUnit

ModelInputs = Mapping[str, Any]


@dataclass(frozen=True)
class Call:
    """The arguments of one call of a module, as a forward pre-hook sees them.

    In a cached call template, batched tensors are `_Slot`s naming their cached rows: `filled` puts
    the rows of a batch back in their place.
    """

    args: tuple
    kwargs: dict

    def filled(self, rows: Mapping[str, torch.Tensor]) -> Call:
        def fill(value: Any) -> Any:
            return rows[value.key] if isinstance(value, _Slot) else value

        return Call(tuple(fill(value) for value in self.args), {k: fill(v) for k, v in self.kwargs.items()})


class _Captured(Exception):
    """Raised by a hook to end a forward once everything the unit needs has been recorded."""


@dataclass(frozen=True)
class _Slot:
    """Where a batched tensor goes when a call is rebuilt from cached rows."""

    key: str


def output_tensors(output: Any) -> tuple[torch.Tensor, ...]:
    """The tensors of a module output (a tensor, a tuple, a diffusers output object), in order."""
    if isinstance(output, torch.Tensor):
        return (output,)
    if isinstance(output, Mapping):
        output = tuple(output.values())
    if isinstance(output, (tuple, list)):
        return tuple(tensor for item in output for tensor in output_tensors(item))
    return ()


def batch_size(inputs: ModelInputs) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("model inputs must hold at least one batched tensor (e.g. `sample`)")


def _batched(value: Any, batch: int) -> bool:
    """Whether `value` holds one row per sample of a batch of `batch`."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


def inputs_of_samples(inputs: Sequence[ModelInputs], samples: range) -> list[ModelInputs]:
    """The model inputs of `samples` (positions over all of `inputs`' batches in order), in the same batches
    cut to them, those with none left out: what a rank captures of a unit's data."""
    selected: list[ModelInputs] = []
    offset = 0
    for batch in inputs:
        size = batch_size(batch)
        start, stop = max(samples.start - offset, 0), min(samples.stop - offset, size)
        if (start, stop) == (0, size):
            selected.append(batch)
        elif start < stop:
            selected.append({key: value[start:stop] if _batched(value, size) else value
                             for key, value in batch.items()})
        offset += size
    return selected


def _template(call: Call, prefix: str, batch: int) -> tuple[Call, dict[str, torch.Tensor]]:
    """Split a call into a template (batched tensors replaced by slots) and its batched tensors.

    A tensor argument is batched when its first dimension is the model's batch size; everything else
    (None, flags, sizes) is static and must be the same in every calibration batch.
    """
    rows: dict[str, torch.Tensor] = {}

    def slot(key: str, value: Any) -> Any:
        if _batched(value, batch):
            rows[key] = value
            return _Slot(key)
        return value

    args = tuple(slot(f"{prefix}.arg{index}", value) for index, value in enumerate(call.args))
    kwargs = {name: slot(f"{prefix}.{name}", value) for name, value in call.kwargs.items()}
    return Call(args, kwargs), rows


def _same_static(first: Any, other: Any) -> bool:
    if isinstance(first, torch.Tensor) or isinstance(other, torch.Tensor):
        return (
            isinstance(first, torch.Tensor) and isinstance(other, torch.Tensor)
            and first.shape == other.shape and torch.equal(first, other)
        )
    try:
        return bool(first == other)
    except Exception:  # objects without a usable ==: trust they are the same
        return True


def _check_same_template(unit: str, first: Call, other: Call) -> None:
    pairs = list(zip(first.args, other.args)) + [(first.kwargs.get(k), v) for k, v in other.kwargs.items()]
    if (
        len(first.args) != len(other.args) or first.kwargs.keys() != other.kwargs.keys()
        or not all(_same_static(a, b) for a, b in pairs)
    ):
        raise ValueError(
            f"unit {unit}: a non-batched argument changes between calibration batches; "
            "give every batch the same static arguments"
        )


def _record_calls(modules: Sequence[nn.Module], calls: list[Call | None]) -> list[Any]:
    """Pre-hooks that fill `calls` and stop the forward once every module has been called."""
    def hook_for(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if calls[index] is not None:
                raise ValueError(f"{type(module).__name__} is called more than once per forward: cannot capture it")
            calls[index] = Call(args, dict(kwargs))
            if all(call is not None for call in calls):
                raise _Captured
        return hook

    return [module.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, module in enumerate(modules)]


def _record_outputs(modules: Sequence[nn.Module], outputs: list[Any]) -> list[Any]:
    """Forward hooks that fill `outputs` and stop the forward once every module has returned."""
    def hook_for(index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if outputs[index] is not None:
                raise ValueError(f"{type(module).__name__} is called more than once per forward: cannot capture it")
            outputs[index] = output_tensors(output)
            if all(output is not None for output in outputs):
                raise _Captured
        return hook

    return [module.register_forward_hook(hook_for(i)) for i, module in enumerate(modules)]


def _run_until_captured(model: nn.Module, inputs: ModelInputs, register: Callable[[], list[Any]]) -> None:
    handles = register()
    try:
        denoiser_call(model, on_device(inputs, module_device(model)))
    except _Captured:
        return
    finally:
        for handle in handles:
            handle.remove()
    raise ValueError("the forward ended before reaching every module of the unit")


@torch.no_grad()
def capture(
    unit: ReconstructionUnit,
    model: nn.Module,
    full_precision: nn.Module,
    inputs: Sequence[ModelInputs],
    budget_bytes: float,
    directory: str | Path | None = None,
) -> tuple[UnitCache, list[Call]]:
    """The unit's inputs (from `model` as it is now) and targets (from `full_precision`) over `inputs`,
    cached per sample, with the call templates that turn cached rows back into the unit's arguments.

    Each forward stops as soon as the unit's modules have been reached.
    """
    cache = UnitCache(sum(batch_size(batch) for batch in inputs), budget_bytes, directory)
    templates: list[Call] = []
    try:
        for batch in inputs:
            size = batch_size(batch)
            calls: list[Call | None] = [None] * len(unit.inputs_from)
            _run_until_captured(model, batch, lambda: _record_calls(unit.inputs_from, calls))
            outputs: list[Any] = [None] * len(unit.targets_from)
            _run_until_captured(full_precision, batch, lambda: _record_outputs(unit.targets_from, outputs))

            rows: dict[str, torch.Tensor] = {}
            batch_templates = []
            for index, call in enumerate(calls):
                template, call_rows = _template(call, f"input{index}", size)
                batch_templates.append(template)
                rows.update(call_rows)
            targets = [tensor for output in outputs for tensor in output]
            if not targets or any(target.dim() == 0 or target.shape[0] != size for target in targets):
                raise ValueError(f"unit {unit.name}: its targets must be tensors with the batch dimension first")
            rows.update({f"target{index}": target for index, target in enumerate(targets)})

            if templates:
                for first, other in zip(templates, batch_templates):
                    _check_same_template(unit.name, first, other)
            else:
                templates = batch_templates
            cache.append(rows)
    except BaseException:
        cache.close()
        raise
    return cache, templates
