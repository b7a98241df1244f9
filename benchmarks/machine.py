"""What the CPU of a benchmark run could do, for its setup line: speed and rounding depend on it."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

# The instruction sets that decide which kernels the runtimes pick: int8 dot products (VNNI), and AMX tiles,
# on which OpenVINO runs float graphs in bf16 by default and onnxruntime its int8 matmuls.
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name and which of KERNEL_FLAGS it has (read from Linux's `cpuinfo`), or the platform's
    name where there is no such file."""
    if not cpuinfo.exists():
        return platform.processor() or platform.machine()
    name, flags = "", set()
    for line in cpuinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not name:
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    have = [flag for flag in KERNEL_FLAGS if flag in flags]
    return f"{name} ({', '.join(have) or 'none of ' + ', '.join(KERNEL_FLAGS)}; torch kernels " \
           f"{torch.backends.cpu.get_cpu_capability()})"
