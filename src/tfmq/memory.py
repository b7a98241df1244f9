"""The memory a process holds that no file backs (RssAnon), watched while a piece of work runs.

Max RSS also counts the pages of memory-mapped files (spilled calibration sets, unit caches), which the
kernel can write back and drop at any time; the anonymous memory is what a memory budget bounds.
"""

from __future__ import annotations

import threading
from pathlib import Path

STATUS = Path("/proc/self/status")


def anonymous_memory_kb() -> int:
    """This process's RssAnon now (Linux), in KiB."""
    for line in STATUS.read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise RuntimeError(f"{STATUS} has no RssAnon line")


class AnonymousMemoryPeak:
    """Highest RssAnon while the block runs, sampled every `interval_s` seconds in a thread (`peak_kb`), and
    what it was when the block began (`start_kb`)."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.start_kb = self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, anonymous_memory_kb())
            self._stop.wait(self.interval_s)

    @property
    def growth_mb(self) -> float:
        """How far above its start the anonymous memory went, in MiB."""
        return (self.peak_kb - self.start_kb) / 1024

    def __enter__(self) -> AnonymousMemoryPeak:
        self.start_kb = self.peak_kb = anonymous_memory_kb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, anonymous_memory_kb())
