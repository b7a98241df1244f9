"""Per-sample tensors of one reconstruction unit (its inputs and targets), in memory or, beyond a budget, in
memory-mapped files of a temporary folder that a killed run's successor cleans up."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from tfmq.files import process_alive

UNIT_CACHE_PREFIX = "tfmq-unit-cache-"
# <prefix><owner pid>-<random>: the owner's pid says whether a folder is stale (its run was killed)
_UNIT_CACHE_NAME = re.compile(re.escape(UNIT_CACHE_PREFIX) + r"(\d+)-.+")
_UNIT_CACHE_FILE = re.compile(r"\d+\.bin")


def _remove_stale_unit_caches(parent: Path) -> None:
    """Delete the cache folders in `parent` whose owning process is gone (a killed run cannot clean up).
    Only folders named as UnitCache names them and holding nothing but its `N.bin` files are touched."""
    for folder in parent.iterdir():
        owner = _UNIT_CACHE_NAME.fullmatch(folder.name)
        if owner is None or folder.is_symlink() or not folder.is_dir() or process_alive(int(owner.group(1))):
            continue
        try:
            entries = list(folder.iterdir())
        except OSError:  # another run removed it first, or it is not ours to read
            continue
        if all(_UNIT_CACHE_FILE.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink()
               for entry in entries):
            shutil.rmtree(folder, ignore_errors=True)


class UnitCache:
    """Per-sample tensors of one unit (its inputs and targets): in memory, or, when they would exceed
    the budget, in raw memory-mapped files in a temporary folder, read back batch by batch.

    Both stores hold the same bytes, so a reconstruction reads identical batches from either. The folder's
    name carries this process's id, so the next cache made in the same place removes it if the run was killed.
    """

    def __init__(self, num_samples: int, budget_bytes: float, directory: str | Path | None = None) -> None:
        self.num_samples = num_samples
        self.budget_bytes = budget_bytes
        self.directory = directory
        self.filled = 0
        self.on_disk = False
        self._layout: dict[str, tuple[torch.Size, torch.dtype, torch.device]] = {}
        self._memory: dict[str, torch.Tensor] = {}
        self._files: dict[str, np.memmap] = {}
        self._folder: Path | None = None

    @property
    def keys(self) -> list[str]:
        return list(self._layout)

    def _allocate(self, rows: Mapping[str, torch.Tensor]) -> None:
        self._layout = {key: (tensor.shape[1:], tensor.dtype, tensor.device) for key, tensor in rows.items()}
        sample_bytes = sum(tensor[:1].numel() * tensor.element_size() for tensor in rows.values())
        self.on_disk = sample_bytes * self.num_samples > self.budget_bytes
        if not self.on_disk:
            self._memory = {
                key: torch.empty((self.num_samples, *shape), dtype=dtype, device=device)
                for key, (shape, dtype, device) in self._layout.items()
            }
            return
        parent = Path(self.directory if self.directory is not None else tempfile.gettempdir())
        _remove_stale_unit_caches(parent)
        self._folder = Path(tempfile.mkdtemp(prefix=f"{UNIT_CACHE_PREFIX}{os.getpid()}-", dir=parent))
        for index, (key, tensor) in enumerate(rows.items()):
            row_bytes = tensor[:1].numel() * tensor.element_size()
            self._files[key] = np.memmap(
                self._folder / f"{index}.bin", dtype=np.uint8, mode="w+", shape=(self.num_samples, row_bytes)
            )

    def append(self, rows: Mapping[str, torch.Tensor]) -> None:
        """Store one batch: every tensor with the same leading (batch) dimension."""
        if not self._layout:
            self._allocate(rows)
        if rows.keys() != self._layout.keys():
            raise ValueError(f"cached tensors changed between batches: {sorted(rows)} vs {self.keys}")
        count = next(iter(rows.values())).shape[0]
        if self.filled + count > self.num_samples:
            raise ValueError(f"more than the {self.num_samples} announced samples")
        for key, tensor in rows.items():
            shape, dtype, _ = self._layout[key]
            if tensor.shape != (count, *shape) or tensor.dtype != dtype:
                raise ValueError(f"cached tensor {key} changed shape or dtype between batches")
            if self.on_disk:
                raw = tensor.detach().reshape(count, -1).contiguous().cpu().view(torch.uint8)
                self._files[key][self.filled : self.filled + count] = raw.numpy()
            else:
                self._memory[key][self.filled : self.filled + count] = tensor.detach()
        self.filled += count

    def rows(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The cached tensors of the samples at `indices` (a 1-D index tensor)."""
        if self.filled != self.num_samples:
            raise RuntimeError(f"the cache holds {self.filled} of its {self.num_samples} samples")
        if not self.on_disk:
            return {key: tensor[indices.to(tensor.device)] for key, tensor in self._memory.items()}
        positions = indices.cpu().numpy()
        result = {}
        for key, (shape, dtype, device) in self._layout.items():
            raw = torch.from_numpy(np.ascontiguousarray(self._files[key][positions]))
            result[key] = raw.view(dtype).reshape(len(positions), *shape).to(device)
        return result

    def close(self) -> None:
        """Free the memory or delete the folder."""
        self._memory = {}
        for mapped in self._files.values():
            handle = getattr(mapped, "_mmap", None)
            if handle is not None:
                handle.close()  # release the file before its folder goes (needed on Windows)
        self._files = {}
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> UnitCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
