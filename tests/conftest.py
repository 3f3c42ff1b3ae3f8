"""Tests not marked ``cuda`` describe a machine without a GPU, wherever they run.

Their expected placements, byte counts and bit-exact outputs are those of a CPU-only
machine (CI's). On a machine with a GPU, ``device_map="auto"`` would plan onto it and
kernels would differ in the last bits, so for them the GPU is hidden: from this process
(``torch.cuda.is_available()`` is false) and from the processes they start
(``CUDA_VISIBLE_DEVICES`` is empty). Tests marked ``cuda`` see the machine as it is.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _no_gpu_unless_marked_cuda(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("cuda") is not None:
        return
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
