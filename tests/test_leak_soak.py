"""The short leak soak: ``benchmarks/leak_soak.py`` on the tiny demo model under a disk-offload budget.

60 batches, memory and descriptors sampled after every batch. Anonymous memory must not grow after
the warm-up (a least-squares slope under 64 KiB per batch; a leak of one batch's logits would
be several times that), and the descriptor count must not grow. The same run with a 256 KiB
per-batch leak planted by the script's self-check shows the measurement would see one.
The full run (500 batches of the 54M-parameter demo) is ``python benchmarks/leak_soak.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _jobkit import REPO, cli_env

SLOPE_LIMIT = 64 * 1024  # bytes per batch


def soak(tmp_path, *extra: str) -> dict:
    out = tmp_path / f"soak{len(list(tmp_path.glob('soak*.json')))}.json"
    args = [sys.executable, str(REPO / "benchmarks" / "leak_soak.py"), "--tiny", "--batches", "60", "--every-batch",
            "--cache", str(tmp_path / "cache"), "--json", str(out), *extra]
    done = subprocess.run(args, check=False, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


@pytest.mark.slow
def test_anonymous_memory_and_descriptors_do_not_grow_over_a_soak(tmp_path):
    figures = soak(tmp_path)
    assert figures["batches"] == 60 and figures["bytes_per_tier"].get("disk", 0) > 0  # part of the model is read from disk
    assert figures["samples"] >= 50  # batches 6..59
    assert abs(figures["anon_slope_bytes_per_batch"]) < SLOPE_LIMIT, figures
    assert figures["fds_last_third_min"] <= figures["fds_first_third_min"], figures  # no rising floor
    assert figures["fds_after_job"] <= figures["fds_before_job"], figures  # the job closed everything it opened

    leaky = soak(tmp_path, "--self-check-leak-kib", "256")
    assert leaky["anon_slope_bytes_per_batch"] > 2 * SLOPE_LIMIT, leaky  # the same measurement sees a real leak
