"""What the CPU can do natively, for ``precision = "auto"``.

bf16 autocast is only worth it where the CPU multiplies bf16 in hardware: x86 AMX-BF16 or
AVX512-BF16, Arm's FEAT_BF16. Elsewhere oneDNN and torch emulate it, and emulated bf16 is far
slower than fp32, not faster (an AVX2-only AMD EPYC here: 0.3 against 97 GFLOP/s for a 2048²
``torch.mm`` on 2 threads). The flags come from the operating system (Linux ``/proc/cpuinfo``,
macOS ``sysctl``), so the choice is the same on every start on one machine.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

#: Linux ``/proc/cpuinfo`` flags of native bf16 matrix arithmetic, best first: x86 AMX tiles,
#: x86 AVX512-BF16 (Cooper Lake, Zen 4 and later), aarch64 FEAT_BF16 (``Features`` line)
LINUX_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of a ``/proc/cpuinfo`` text (x86 ``flags``, aarch64 ``Features``)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def bf16_flag(flags: set[str]) -> str | None:
    """The first of :data:`LINUX_BF16_FLAGS` in ``flags``, or None."""
    return next((f for f in LINUX_BF16_FLAGS if f in flags), None)


@functools.cache
def native_bf16() -> str | None:
    """The name of this CPU's native bf16 matrix feature (``"avx512_bf16"``, ...), or None
    where it has none or the operating system does not say."""
    system = platform.system()
    if system == "Linux":
        try:
            return bf16_flag(cpu_flags(Path("/proc/cpuinfo").read_text()))
        except OSError:
            return None
    if system == "Darwin":  # Apple M2 and later
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"],
                                 capture_output=True, text=True, timeout=5, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return "FEAT_BF16" if out.stdout.strip() == "1" else None
    return None


def auto_cpu_precision() -> str:
    """``"bf16"`` where the CPU has native bf16 matrix arithmetic, else ``"fp32"``."""
    return "bf16" if native_bf16() else "fp32"
