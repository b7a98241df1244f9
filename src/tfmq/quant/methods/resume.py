"""Per-unit checkpoints of a reconstruction, so that a killed calibration continues where it stopped.

After each reconstruction unit, the tensors that unit changed (its layers' weights and weight grids, its
activation quantizers' steps) go to one safetensors file of a checkpoint folder, written atomically with the
unit's result and a digest. A run restarted with the same command finds the folder: each unit already
done is not reconstructed again but its tensors are loaded at the point in the recipe where it ran, so
whatever comes between units (a TFMQ cache selection, say) sees the model it saw the first time, and the
run ends with the same model, bit for bit. The folder records the run's identity (config, base model,
calibration set); a folder of another run is refused, never mixed in. It is deleted when the model is saved.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tfmq.errors import TfmqError
from tfmq.files import (
    add_to_output_folder,
    check_output_folder,
    remove_output_folder,
    start_output_folder,
    write_bytes_atomic,
    write_json,
)
from tfmq.quant.methods.units import ReconstructionUnit
from tfmq.quant.nn.layers import QuantLayer

RESUME_KIND = "reconstruction checkpoints"
RUN_FILE = "run.json"
UNIT_PREFIX = "unit-"


def finished_units(folder: str | Path) -> int:
    """How many units the checkpoints in `folder` hold (0 for no folder)."""
    folder = Path(folder)
    return len(list(folder.glob(f"{UNIT_PREFIX}*.safetensors"))) if folder.is_dir() else 0


def remove_checkpoints(folder: str | Path) -> None:
    """Delete a checkpoint folder once its model is saved (only if it holds nothing but what tfmq wrote)."""
    remove_output_folder(folder, RESUME_KIND)


def _digest(tensors: dict[str, torch.Tensor], text: str) -> str:
    digest = hashlib.sha256(text.encode())
    for name, tensor in sorted(tensors.items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def unit_state(model: nn.Module, unit: ReconstructionUnit) -> dict[str, torch.Tensor]:
    """What reconstructing `unit` changes in `model`, by state_dict name, on the CPU."""
    owners = [*unit.layers, *unit.activation_quantizers]
    names = {id(module): name for name, module in model.named_modules()}
    state = {}
    for module in owners:
        prefix = names[id(module)]
        for key, tensor in module.state_dict(keep_vars=False).items():
            state[f"{prefix}.{key}"] = tensor.detach().to("cpu", copy=True).contiguous()
    return state


class UnitCheckpoints:
    """The checkpoint folder of one run: units are numbered in the order the recipe reaches them."""

    def __init__(self, folder: Path, identity: dict[str, Any], writer: bool = True) -> None:
        self.folder = folder
        self.identity = identity
        self.writer = writer  # only one process of a distributed run writes
        self.next_index = 0

    @classmethod
    def open(cls, folder: str | Path, identity: dict[str, Any], *, writer: bool = True) -> UnitCheckpoints:
        """The folder of this run (made if missing); one made by another run is an error, never mixed in."""
        folder = Path(folder)
        check_output_folder(folder, RESUME_KIND)  # absent, empty, or ours with nothing added
        identity = json.loads(json.dumps(identity, sort_keys=True))
        run_file = folder / RUN_FILE
        if run_file.is_file():
            try:
                recorded = json.loads(run_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise TfmqError(f"{run_file} is unreadable ({exc}): delete {folder} to start over") from exc
            if recorded != identity:
                differing = sorted(key for key in set(recorded) | set(identity)
                                   if recorded.get(key) != identity.get(key))
                raise TfmqError(f"{folder} holds the checkpoints of another run (its {', '.join(differing)} "
                                f"differ): delete it to start over, or rerun that run's command")
        elif writer:
            start_output_folder(folder, RESUME_KIND)
            write_json(run_file, identity)
            add_to_output_folder(folder, RUN_FILE)
        return cls(folder, identity, writer)

    def _file(self, index: int) -> Path:
        return self.folder / f"{UNIT_PREFIX}{index:05d}.safetensors"

    def run(self, model: nn.Module, unit: ReconstructionUnit, reconstruct_unit: Callable[[], dict[str, Any]]
            ) -> dict[str, Any]:
        """The result of `unit`: loaded with its tensors from its checkpoint if an earlier run finished it,
        else from `reconstruct_unit()`, then checkpointed."""
        index, self.next_index = self.next_index, self.next_index + 1
        path = self._file(index)
        if path.is_file():
            return self._restore(model, unit, path)
        result = reconstruct_unit()
        if self.writer:
            self._save(model, unit, result, path)
        return result

    def _save(self, model: nn.Module, unit: ReconstructionUnit, result: dict[str, Any], path: Path) -> None:
        state = unit_state(model, unit)
        text = json.dumps({"unit": unit.name, "result": result}, sort_keys=True)
        metadata = {"unit": unit.name, "result": text, "digest": _digest(state, text)}
        write_bytes_atomic(path, lambda temporary: save_file(state, str(temporary), metadata=metadata))
        add_to_output_folder(self.folder, path.name)

    def _restore(self, model: nn.Module, unit: ReconstructionUnit, path: Path) -> dict[str, Any]:
        try:
            state = load_file(str(path))
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
            text = metadata["result"]
            recorded = json.loads(text)
        except Exception as exc:  # a truncated or foreign file
            raise TfmqError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}: delete "
                            f"{self.folder} to start over") from exc
        if metadata.get("digest") != _digest(state, text):
            raise TfmqError(f"checkpoint {path} fails its digest check: delete {self.folder} to start over")
        expected = unit_state(model, unit)
        if recorded.get("unit") != unit.name or set(state) != set(expected) or any(
                state[key].shape != expected[key].shape or state[key].dtype != expected[key].dtype for key in state):
            raise TfmqError(f"checkpoint {path} is of unit {recorded.get('unit')}, not {unit.name} of this model: "
                            f"delete {self.folder} to start over")
        with torch.no_grad():
            current = model.state_dict(keep_vars=True)
            for key, tensor in state.items():
                owner, _, attribute = key.rpartition(".")
                layer = model.get_submodule(owner)
                if isinstance(layer, QuantLayer) and attribute == "weight":
                    layer.replace_weight(tensor)  # not in place: the full-precision model shares its storage
                else:
                    current[key].copy_(tensor)
        return recorded["result"]
