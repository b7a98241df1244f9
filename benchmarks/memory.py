"""Peak memory of this process, for benchmarks that run each measurement in a child process."""

from __future__ import annotations

from pathlib import Path


def peak_rss_mb() -> float:
    """The process's resident-set high-water mark (VmHWM), in MB.

    Not `getrusage(...).ru_maxrss`: Linux carries that across exec, so a child started by a big parent
    reports the parent's size (measured: 811 MB in a child that held 9 MB).
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory needs Linux")
