"""bigjob.job.half_on_cpu: one WARNING for bf16/fp16 compute on a CPU without native instructions."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from bigjob.job import half_on_cpu
from bigjob.job.half_on_cpu import FAST_FLAGS, cpu_flags, slow_half_on_cpu, warn_if_slow

WITHOUT = "processor : 0\nflags : fpu sse2 avx2 avx512f avx512bw\n\nprocessor : 1\nflags : fpu sse2 avx2 avx512f avx512bw\n"
WITH_BF16 = "processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n"
WITH_AMX = "processor : 0\nflags : fpu avx2 amx_bf16 amx_tile amx_fp16\n"


def test_the_flags_decide():
    assert cpu_flags(WITHOUT) == {"fpu", "sse2", "avx2", "avx512f", "avx512bw"}
    assert slow_half_on_cpu("bfloat16", WITHOUT) and slow_half_on_cpu("float16", WITHOUT)
    assert not slow_half_on_cpu("bfloat16", WITH_BF16) and slow_half_on_cpu("float16", WITH_BF16)
    assert not slow_half_on_cpu("bfloat16", WITH_AMX) and not slow_half_on_cpu("float16", WITH_AMX)
    assert not slow_half_on_cpu("float32", WITHOUT) and not slow_half_on_cpu(None, WITHOUT)
    assert not slow_half_on_cpu("bfloat16", "")  # no flags known: say nothing


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_one_warning_per_process_on_this_cpu_when_it_lacks_the_flags(dtype, caplog, monkeypatch):
    monkeypatch.setattr(half_on_cpu, "_warned", set())
    real = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    expected = sys.platform.startswith("linux") and slow_half_on_cpu(dtype, real)
    with caplog.at_level(logging.WARNING, logger="bigjob.job.half_on_cpu"):
        assert not warn_if_slow(dtype, "cuda:0")  # runs on a GPU: not this warning's business
        assert warn_if_slow(dtype, "cpu") == expected
        assert not warn_if_slow(dtype, "cpu")  # once
    lines = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == int(expected)
    if expected:
        text = lines[0].getMessage()
        assert dtype in text and "/".join(FAST_FLAGS[dtype]) in text and "dtype=float32" in text and "\n" not in text


def test_a_cpu_without_the_flags_gets_the_warning(caplog, monkeypatch, tmp_path):
    fake = tmp_path / "cpuinfo"
    fake.write_text(WITHOUT)
    monkeypatch.setattr(half_on_cpu, "_warned", set())
    monkeypatch.setattr(half_on_cpu, "Path", lambda _: fake)
    monkeypatch.setattr(half_on_cpu.sys, "platform", "linux")
    with caplog.at_level(logging.WARNING, logger="bigjob.job.half_on_cpu"):
        assert warn_if_slow("bfloat16", "cpu") and not warn_if_slow("bfloat16", "cpu")
        assert not warn_if_slow("float32", "cpu")
    assert [r.getMessage() for r in caplog.records] == [
        "compute in bfloat16 on this CPU (no avx512_bf16/amx_bf16) may be several times slower than float32; "
        "set dtype=float32 (dtype.name) to compute in float32"
    ]
    fake.write_text(WITH_BF16)
    monkeypatch.setattr(half_on_cpu, "_warned", set())
    assert not warn_if_slow("bfloat16", "cpu")
