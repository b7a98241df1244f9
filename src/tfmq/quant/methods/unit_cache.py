"""Per-sample tensors of one reconstruction unit (its inputs and targets), in memory or, beyond a budget, in
memory-mapped files of a temporary folder (`tfmq.quant.spill`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from tfmq.quant.spill import SpillFolder

UNIT_CACHE_PREFIX = "tfmq-unit-cache-"


class UnitCache:
    """Per-sample tensors of one unit (its inputs and targets): where they are made, or, when they would
    exceed the budget, in a spill folder on disk, read back batch by batch to where they were made.

    Both stores hold the same bytes, so a reconstruction reads identical batches from either.
    """

    def __init__(self, num_samples: int, budget_bytes: float, directory: str | Path | None = None) -> None:
        self.num_samples = num_samples
        self.budget_bytes = budget_bytes
        self.directory = directory
        self.filled = 0
        self.on_disk = False
        self.sample_bytes = 0  # of one sample's tensors, known from the first batch
        self._layout: dict[str, tuple[torch.Size, torch.dtype, torch.device]] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self._folder: SpillFolder | None = None

    @property
    def keys(self) -> list[str]:
        return list(self._layout)

    def _allocate(self, rows: Mapping[str, torch.Tensor]) -> None:
        self._layout = {key: (tensor.shape[1:], tensor.dtype, tensor.device) for key, tensor in rows.items()}
        self.sample_bytes = sum(tensor[:1].numel() * tensor.element_size() for tensor in rows.values())
        self.on_disk = self.sample_bytes * self.num_samples > self.budget_bytes
        if self.on_disk:
            self._folder = SpillFolder(UNIT_CACHE_PREFIX, self.directory)
        for key, (shape, dtype, device) in self._layout.items():
            self._tensors[key] = (self._folder.empty((self.num_samples, *shape), dtype) if self._folder is not None
                                  else torch.empty((self.num_samples, *shape), dtype=dtype, device=device))

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
            stored = self._tensors[key]
            stored[self.filled : self.filled + count] = tensor.detach().to(stored.device)
        self.filled += count

    def rows(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The cached tensors of the samples at `indices` (a 1-D index tensor), where they were made."""
        if self.filled != self.num_samples:
            raise RuntimeError(f"the cache holds {self.filled} of its {self.num_samples} samples")
        return {key: tensor[indices.to(tensor.device)].to(self._layout[key][2])
                for key, tensor in self._tensors.items()}

    def close(self) -> None:
        """Free the memory or delete the folder."""
        self._tensors = {}
        if self._folder is not None:
            self._folder.close()
            self._folder = None

    def __enter__(self) -> UnitCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
