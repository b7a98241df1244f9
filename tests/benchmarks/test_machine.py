"""benchmarks/machine.py names the CPU's model and the instruction sets that pick the runtimes' kernels."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))
import machine  # noqa: E402  (a script folder, not a package)


def test_the_description_names_the_first_cores_model_and_its_kernel_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 1\nflags\t\t: fpu avx2 avx512f amx_int8 sse\n\n"
                       "processor\t: 1\nmodel name\t: Other CPU\nflags\t\t: fpu\n")
    description = machine.cpu_description(cpuinfo)
    assert description.startswith("Test CPU 1 (avx2, avx512f, amx_int8; torch kernels ")
    assert "Other CPU" not in description and "sse" not in description


def test_a_cpu_without_any_of_the_flags_says_so(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Plain CPU\nflags\t\t: fpu sse2\n")
    assert machine.cpu_description(cpuinfo).startswith("Plain CPU (none of avx2, ")


def test_without_cpuinfo_the_platform_names_the_machine(tmp_path: Path) -> None:
    assert machine.cpu_description(tmp_path / "absent") == (platform.processor() or platform.machine())
