"""Spilled tensors: file-backed, the same values as in memory, their folder gone when closed."""

import torch

from tfmq.quant import spill
from tfmq.quant.spill import SpillFolder


def test_take_copies_rows_a_chunk_at_a_time_into_a_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(spill, "COPY_CHUNK_BYTES", 3 * 4 * 5)  # three rows of five float32 a chunk
    folder = SpillFolder("tfmq-test-", tmp_path)
    source = torch.arange(50, dtype=torch.float32).reshape(10, 5)
    indices = torch.tensor([9, 0, 4, 4, 7, 1, 2])
    taken = folder.take(source, indices)
    assert torch.equal(taken, source[indices]) and taken.dtype == torch.float32
    assert len(list(folder.path.iterdir())) == 1 and folder.path.parent == tmp_path
    folder.close()
    assert list(tmp_path.iterdir()) == []


def test_an_empty_spilled_tensor_is_zeros_of_its_shape_and_dtype(tmp_path) -> None:
    folder = SpillFolder("tfmq-test-", tmp_path)
    tensor = folder.empty((3, 2), torch.int64)
    assert tensor.shape == (3, 2) and tensor.dtype == torch.int64 and not tensor.any()
    assert folder.empty((0, 4), torch.float16).shape == (0, 4)
