"""Unit caches: the same bytes in memory and on disk, and killed runs' folders cleaned up."""

import os
import subprocess
import sys

import torch

from tfmq.quant.methods.unit_cache import UnitCache


def test_unit_cache_on_disk_holds_the_same_bytes_as_in_memory(tmp_path) -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [
        {"x": torch.randn(n, 3, 2, generator=generator), "t": torch.randint(0, 9, (n,), generator=generator),
         "mask": torch.rand(n, 4, generator=generator) > 0.5, "half": torch.randn(n, 5, generator=generator).half()}
        for n in (4, 3)
    ]
    memory, disk = UnitCache(7, budget_bytes=1e6), UnitCache(7, budget_bytes=100, directory=tmp_path)
    for cache in (memory, disk):
        for batch in batches:
            cache.append(batch)
    assert not memory.on_disk and disk.on_disk and len(list(tmp_path.iterdir())) == 1
    indices = torch.tensor([6, 0, 3, 3])
    with memory, disk:
        for key, tensor in memory.rows(indices).items():
            from_disk = disk.rows(indices)[key]
            assert from_disk.dtype == tensor.dtype and torch.equal(from_disk, tensor)
        assert torch.equal(memory.rows(indices)["x"], torch.cat([b["x"] for b in batches])[indices])
    assert list(tmp_path.iterdir()) == []  # closing deletes the folder


def test_a_new_disk_cache_removes_caches_of_dead_processes_only(tmp_path) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)  # exited and reaped: no process has this id any more
    alive = os.getppid()
    stale = tmp_path / f"tfmq-unit-cache-{dead}-abcd"
    live = tmp_path / f"tfmq-unit-cache-{alive}-efgh"
    foreign = tmp_path / f"tfmq-unit-cache-{dead}-ijkl"  # holds a file UnitCache never writes
    for folder in (stale, live, foreign):
        folder.mkdir()
        (folder / "0.bin").write_bytes(b"\0" * 8)
    (foreign / "notes.txt").write_text("mine")
    cache = UnitCache(2, budget_bytes=0, directory=tmp_path)
    cache.append({"x": torch.zeros(2, 3)})
    assert cache.on_disk
    own = [path for path in tmp_path.iterdir() if path.name.startswith(f"tfmq-unit-cache-{os.getpid()}-")]
    assert len(own) == 1
    assert not stale.exists() and live.exists() and foreign.exists()
    cache.close()
    assert sorted(tmp_path.iterdir()) == sorted([live, foreign])
