"""A warning for half-precision compute on CPUs without native support.

bfloat16 and float16 matmuls on a CPU without ``avx512_bf16`` / ``amx_bf16`` (or
``avx512_fp16`` / ``amx_fp16``) are emulated through float32 and run 6-8x slower than
float32 itself; nothing else says so. :func:`warn_if_slow` logs one WARNING line per process
when a job computes in such a dtype on such a CPU, naming the key to change.

>>> slow_half_on_cpu("bfloat16", "flags : fpu sse2 avx2 avx512f")
True
>>> slow_half_on_cpu("bfloat16", "flags : fpu avx512f avx512_bf16 amx_tile")
False
>>> slow_half_on_cpu("float32", "flags : fpu"), slow_half_on_cpu("float16", "")
(False, False)
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

__all__ = ["FAST_FLAGS", "cpu_flags", "slow_half_on_cpu", "warn_if_slow"]

logger = logging.getLogger(__name__)

# CPU flags (/proc/cpuinfo) that give a dtype native matmul instructions.
FAST_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}
_warned: set[str] = set()


def cpu_flags(cpuinfo: str) -> set[str]:
    """The flags of the first ``flags`` line of ``/proc/cpuinfo`` text (empty when there is none).

    >>> sorted(cpu_flags("processor : 0\\nflags : sse2 avx2\\n"))
    ['avx2', 'sse2']
    """
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def slow_half_on_cpu(dtype: str | None, cpuinfo: str) -> bool:
    """Whether compute in ``dtype`` on the CPU ``cpuinfo`` describes lacks native instructions (False when unknown)."""
    if dtype not in FAST_FLAGS:
        return False
    flags = cpu_flags(cpuinfo)
    return bool(flags) and not flags & set(FAST_FLAGS[dtype])


def warn_if_slow(dtype: str | None, device: str | None) -> bool:
    """Logs, once per process and dtype, that ``dtype`` compute on this CPU may be slow; returns whether it did.

    Says nothing off Linux (no ``/proc/cpuinfo``), for devices other than ``cpu``, and on CPUs with the flags.
    """
    if device != "cpu" or dtype in _warned or not sys.platform.startswith("linux"):
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    if not slow_half_on_cpu(dtype, cpuinfo):
        return False
    _warned.add(str(dtype))
    logger.warning(
        "compute in %s on this CPU (no %s) may be several times slower than float32; "
        "set dtype=float32 (dtype.name) to compute in float32", dtype, "/".join(FAST_FLAGS[str(dtype)]),
    )
    return True
