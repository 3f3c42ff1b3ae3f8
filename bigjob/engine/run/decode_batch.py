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

__all__ = ["compute_bound_batch"]


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
