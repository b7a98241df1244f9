"""The anonymous-memory watch sees an allocation made inside its block."""

import gc
import time

import torch

from tfmq.memory import AnonymousMemoryPeak, anonymous_memory_kb


def test_an_allocation_inside_the_block_shows_in_its_growth() -> None:
    # Earlier tests' garbage freed inside the block would lower RssAnon by as much as the block adds.
    gc.collect()
    with AnonymousMemoryPeak(interval_s=0.001) as peak:
        held = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        # Held until the watching thread has sampled (a busy CI machine may not schedule it for a while).
        deadline = time.monotonic() + 10
        while peak.growth_mb <= 48 and time.monotonic() < deadline:
            time.sleep(0.005)
        del held
    assert 48 < peak.growth_mb < 256 and peak.start_kb > 0 and anonymous_memory_kb() > 0
