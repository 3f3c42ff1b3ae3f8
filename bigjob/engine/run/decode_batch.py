"""The batch size at which decoding a model with a disk tier stops being bound by its reads.

Each decoding step is one forward of one token per row, and every forward brings in the
whole disk tier: what the page cache cannot keep is read from disk (see
:mod:`bigjob.engine.run.read_policy`), and every weight is read once from memory. Those costs
do not grow with the batch; the arithmetic does (two operations per weight per row). So a
step costs about ``max(read_s, memory_s, rows x compute_s_per_row)``, and below

    rows* = max(read_s, memory_s) / compute_s_per_row

a larger batch is free: tokens per second grow with the rows. :func:`compute_bound_batch`
is that ``rows*``, rounded up. Measured for the 7B-shaped fp32 Llama of docs/benchmarks.md on
this project's 2-core VM (a 33 GB model, 4 GiB CPU budget, ~12 GiB read from disk a step at
~3 GB/s, ~150 GFLOP/s): about 25-40 rows.

>>> compute_bound_batch(read_bytes=12e9, read_rate=3e9, weight_bytes=33e9, memory_rate=15e9, params=8.4e9, flops=150e9)
36
>>> compute_bound_batch(read_bytes=0, read_rate=3e9, weight_bytes=1e9, memory_rate=15e9, params=2.5e8, flops=150e9)  # in RAM
20
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["compute_bound_batch", "decode_batch_of"]


def compute_bound_batch(
    read_bytes: float, read_rate: float, weight_bytes: float, memory_rate: float, params: float, flops: float, limit: int = 256
) -> int:
    """Smallest batch whose decoding step is bound by compute rather than by reading weights (1 to ``limit``).

    ``read_bytes`` come from disk each step at ``read_rate`` (bytes/s); all ``weight_bytes``
    are read from memory at ``memory_rate``; each row costs ``2 x params`` operations at ``flops``.
    """
    if min(read_rate, memory_rate, flops) <= 0:
        raise ValueError("rates must be above 0")
    per_row = 2 * params / flops
    if per_row <= 0:
        return 1
    fixed = max(read_bytes / read_rate, weight_bytes / memory_rate)
    return max(1, min(limit, math.ceil(fixed / per_row)))


def decode_batch_of(model: nn.Module) -> int | None:
    """:func:`compute_bound_batch` for a dispatched model, from what its forwards so far measured.

    The bytes its last forward read directly and the rate its disk reader saw, its weights'
    bytes, and this machine's CPU matmul and memory-copy rates
    (:func:`~bigjob.engine.run.rates.measure_rates`). ``None`` before any direct read (a model
    whose disk tier the page cache holds, or none): its decoding is not bound by the disk.
    """
    from bigjob.engine.run.dispatch_info import get_dispatch_info
    from bigjob.engine.run.rates import measure_rates

    info = get_dispatch_info(model)
    schedule: Any = info.schedule if info is not None else None
    reads = schedule.reads if schedule is not None else None
    if info is None or reads is None or not reads.reader.read_seconds or not reads.direct:
        return None
    direct = sum(size for position, size in zip(reads.policy.positions, reads.policy.sizes) if position in reads.direct)
    floating = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    rates = measure_rates("cpu", floating)  # matmuls in the weights' dtype
    return compute_bound_batch(
        read_bytes=direct,
        read_rate=reads.reader.read_bytes / reads.reader.read_seconds,
        weight_bytes=sum(info.bytes_per_tier.values()),
        memory_rate=rates.h2d_bytes_per_s,
        params=sum(p.numel() for p in model.parameters()),
        flops=rates.cpu_flops,
    )
