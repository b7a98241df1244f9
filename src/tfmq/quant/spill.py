"""Tensors kept on disk instead of in memory: memory-mapped files in a temporary folder.

A spilled tensor is an ordinary CPU tensor whose pages belong to a file, so the kernel can drop them
(clean) or write them back (dirty) instead of holding them in the process's own memory; slices of it are
views of the file. The folder's name carries the owning process's id, so a run that was killed before it
could delete its folder has it removed by the next folder made in the same place.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from tfmq.files import process_alive

SPILL_FILE = re.compile(r"\d+\.bin")  # the only files a spill folder holds
COPY_CHUNK_BYTES = 2**20  # how much `SpillFolder.take` moves at a time (in memory meanwhile)


def remove_stale_folders(parent: Path, prefix: str) -> None:
    """Delete the folders `<prefix><pid>-...` in `parent` whose process is gone (a killed run cannot clean
    up). Only folders holding nothing but spill files are touched."""
    name = re.compile(re.escape(prefix) + r"(\d+)-.+")
    for folder in parent.iterdir():
        owner = name.fullmatch(folder.name)
        if owner is None or folder.is_symlink() or not folder.is_dir() or process_alive(int(owner.group(1))):
            continue
        try:
            entries = list(folder.iterdir())
        except OSError:  # another run removed it first, or it is not ours to read
            continue
        if all(SPILL_FILE.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink() for entry in entries):
            shutil.rmtree(folder, ignore_errors=True)


class SpillFolder:
    """A temporary folder of memory-mapped tensors, deleted by `close()` or once nothing refers to it."""

    def __init__(self, prefix: str, directory: str | Path | None = None) -> None:
        parent = Path(directory if directory is not None else tempfile.gettempdir())
        remove_stale_folders(parent, prefix)
        self.path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
        self._count = 0
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.path, True)

    def empty(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A new tensor of `shape` and `dtype` backed by a file of this folder (zero-filled)."""
        count = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        path, self._count = self.path / f"{self._count}.bin", self._count + 1
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        mapped = np.memmap(path, dtype=np.uint8, mode="w+", shape=(count,))
        return torch.from_numpy(mapped).view(dtype).reshape(shape)

    def take(self, tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`tensor[indices]` (rows) as a spilled tensor, copied a bounded chunk at a time."""
        result = self.empty((len(indices), *tensor.shape[1:]), tensor.dtype)
        row_bytes = max(tensor[:1].numel() * tensor.element_size(), 1)
        rows_a_chunk = max(COPY_CHUNK_BYTES // row_bytes, 1)
        for start in range(0, len(indices), rows_a_chunk):
            result[start : start + rows_a_chunk] = tensor[indices[start : start + rows_a_chunk]]
        return result

    def close(self) -> None:
        self._finalizer()
