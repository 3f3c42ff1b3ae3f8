"""A mapped weight file cut short *during* a forward: one line on stderr and exit code 1, not a SIGBUS core dump.

The job's offload folder shard is truncated from inside the model's forward (after the check
the engine makes before every forward), so the next read of a page past its new end faults.
The finished batches stay on disk: the same command run again rebuilds the damaged folder
and continues, ending with the predictions of an uninterrupted run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _faultkit import JOB, metrics
from _jobkit import cli_env, run_cli

# Imported by every Python process of the job (the command, and an isolated job's child):
# after the second batch, the next nn.Linear call truncates the files named by the pattern.
SITECUSTOMIZE = r"""
import os
if os.environ.get("BIGJOB_TEST_TRUNCATE"):
    import glob, torch
    from bigjob.job.progress import ResultWriter
    state = {"batches": 0, "done": False}
    append = ResultWriter.append
    def counted(self, *args, **kwargs):
        append(self, *args, **kwargs)
        state["batches"] += 1
    ResultWriter.append = counted
    forward = torch.nn.Linear.forward
    def truncating(self, x):
        if state["batches"] == 2 and not state["done"]:
            state["done"] = True
            for path in glob.glob(os.environ["BIGJOB_TEST_TRUNCATE"]):
                os.truncate(path, 4096)
        return forward(self, x)
    torch.nn.Linear.forward = truncating
"""
MAPPED = JOB + ["placement.disk_reads=mapped"]  # the disk tier read through the mapping, as "auto" does on a warm cache


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    root = tmp_path_factory.mktemp("reference")
    out = run_cli(MAPPED + [f"hydra.run.dir={root / 'run'}"], root, {"BIGJOB_CACHE_DIR": str(root / "cache")})
    assert out.returncode == 0, out.stderr
    return (root / "run" / "predictions.jsonl").read_bytes()


@pytest.mark.parametrize("isolate", ["false", "true"])
def test_a_shard_cut_short_mid_forward_is_one_line_and_the_rerun_continues(tmp_path, reference, isolate):  # type: ignore[no-untyped-def]
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    cache, run = tmp_path / "cache", tmp_path / "run"
    job = MAPPED + [f"runner.isolate={isolate}", f"hydra.run.dir={run}"]
    warm = run_cli(MAPPED + [f"hydra.run.dir={tmp_path / 'warm'}"], tmp_path, {"BIGJOB_CACHE_DIR": str(cache)})
    assert warm.returncode == 0, warm.stderr  # the offload folder is built: the next job maps it
    shard = next(cache.glob("offload/*/offload-*/*.safetensors"))
    env = {"BIGJOB_CACHE_DIR": str(cache), "BIGJOB_TEST_TRUNCATE": str(shard),
           "PYTHONPATH": f"{tmp_path / 'site'}:{cli_env()['PYTHONPATH']}"}
    cut = run_cli(job, tmp_path, env)
    assert cut.returncode == 1, (cut.returncode, cut.stderr[-3000:])  # not -SIGBUS (a core dump)
    lines = cut.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in cut.stderr, cut.stderr
    assert lines[0].startswith(f"error: weight file '{shard}' was cut short while the job read it (from ")
    assert "to 4096 bytes" in lines[0] and str(run) in lines[0] and "run the same command again" in lines[0]
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 4  # two batches of two, kept

    again = run_cli(job, tmp_path, {"BIGJOB_CACHE_DIR": str(cache)})
    assert again.returncode == 0, again.stderr
    assert metrics(run)["resumed_from_batch"] == 2 and metrics(run)["offload_cache_hit"] is False  # rebuilt
    assert (run / "predictions.jsonl").read_bytes() == reference


HANDLER_CHECK = r"""
import signal, sys
from bigjob.engine.tiers.sources import Sources
from bigjob.job.mapped_files import exit_on_sigbus
with exit_on_sigbus(Sources(), "/runs/x"):
    if sys.argv[1] == "inside":
        signal.raise_signal(signal.SIGBUS)
signal.raise_signal(signal.SIGBUS)  # after the block: the default action again
"""


@pytest.mark.parametrize("where", ["inside", "after"])
def test_the_handler_is_there_only_within_its_block(where):  # type: ignore[no-untyped-def]
    done = subprocess.run([sys.executable, "-c", HANDLER_CHECK, where], env=cli_env(), capture_output=True, text=True, timeout=120)
    if where == "inside":
        assert done.returncode == 1 and done.stderr.startswith("error: the job was killed by SIGBUS"), done.stderr
        assert len(done.stderr.splitlines()) == 1 and "/runs/x" in done.stderr
    else:
        assert done.returncode == -signal.SIGBUS and done.stderr == "", done.stderr
