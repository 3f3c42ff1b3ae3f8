"""Killed at any moment, a job leaves nothing half-written that a rerun would trust, and the
rerun of the same command ends with the outputs of an uninterrupted run.

The kills are real SIGKILLs of a ``bigjob`` process: ``_faultkit.DRIVER`` is the command with
one engine function wrapped to kill the process at that moment (planning, the offload folder
build, loading); between batches the runner's own test hook ``BIGJOB_KILL_AFTER_BATCHES`` does
it (``tests/test_cli.py::test_a_killed_run_continues_where_it_stopped`` covers that hook on a
job without an offload folder). Ctrl-C is a real SIGINT sent from outside.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from _faultkit import (
    DRIVER,
    JOB,
    cache_rows,
    leftovers,
    marker_holds,
    metrics,
    offload_folders,
)
from _jobkit import cli_env, run_cli, wait_for_batches

BATCHES = 8  # JOB: 16 samples in batches of 2


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    """predictions.jsonl of the same command, uninterrupted, in a cache of its own."""
    root = tmp_path_factory.mktemp("reference")
    out = run_cli(JOB + [f"hydra.run.dir={root / 'run'}"], root, {"BIGJOB_CACHE_DIR": str(root / "cache")})
    assert out.returncode == 0, out.stderr
    assert metrics(root / "run")["offload_folder"]  # the job does build an offload folder
    return (root / "run" / "predictions.jsonl").read_bytes()


def killed_at(phase: str, args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if phase == "batches":
        return run_cli(args, cwd, {**env, "BIGJOB_KILL_AFTER_BATCHES": "3"}, timeout=120)
    return subprocess.run(
        [sys.executable, "-c", DRIVER, phase, *args], check=False, cwd=cwd, env=cli_env(env), capture_output=True, text=True, timeout=120
    )


def assert_cache_holds_nothing_half_written(cache: Path, run_dir: Path) -> dict[str, dict]:
    """Every row decodes as a JSON entry of its kind; every offload folder and registered path is complete."""
    entries = {}
    for key, (raw, mode, filename, value, _) in cache_rows(cache).items():
        assert filename is None and mode in (1, 2, 3), (key, mode)  # text/binary JSON inside SQLite, never a pickle (4)
        entry = json.loads(zlib.decompress(value))
        assert entry["kind"] == key.split(":", 1)[0]
        entries[key] = entry
    assert not [k for k in entries if k.startswith("run:")]  # the killed job never completed
    for folder in offload_folders(cache):
        assert marker_holds(folder), folder
    for key, entry in entries.items():
        if key.startswith("offload:"):
            assert marker_holds(Path(entry["path"])), entry  # the registry names the completed folder itself
    assert not (run_dir / "metrics.json").exists()  # nothing claims the run is complete (or failed cleanly)
    return entries


@pytest.mark.parametrize("phase", ["plan", "offload", "load", "batches"])
def test_a_job_killed_at_any_phase_reruns_to_the_same_outputs(tmp_path, reference, phase):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    env = {"BIGJOB_CACHE_DIR": str(cache)}
    args = JOB + [f"hydra.run.dir={run_dir}"]

    killed = killed_at(phase, args, tmp_path, env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    entries = assert_cache_holds_nothing_half_written(cache, run_dir)
    plans = [k for k in entries if k.startswith("plan:")]
    temps = list((cache / "offload").glob("*/.tmp-offload-*"))
    if phase == "plan":  # computed, not stored: the plan lock was held when the process died
        assert plans == [] and not (run_dir / "device_map.json").exists()
    elif phase == "offload":  # a partial shard in a temporary folder, nothing under the final name
        assert len(plans) == 1 and len(temps) == 1 and not offload_folders(cache)
        assert list(temps[0].glob("*.safetensors")) and not (temps[0] / "bigjob-offload.json").exists()
    elif phase == "load":  # the folder complete, the registry entry not yet written
        assert len(offload_folders(cache)) == 1 and not [k for k in entries if k.startswith("offload:")]
    else:
        assert json.loads((run_dir / "progress.json").read_text())["batches_done"] == 3

    started = time.monotonic()
    rerun = run_cli(args, tmp_path, env, timeout=120)  # a lock left by the dead process would stall this
    assert rerun.returncode == 0, rerun.stderr
    assert time.monotonic() - started < 60
    record = metrics(run_dir)
    assert record["status"] == "completed" and record["batches"] == BATCHES
    assert (run_dir / "predictions.jsonl").read_bytes() == reference
    expected = {  # (plan from the cache, offload folder reused, resumed after batch)
        "plan": (False, False, 0),
        "offload": (True, False, 0),  # the partial build is never reused: built again
        "load": (True, True, 0),  # the complete, marked folder is
        "batches": (True, True, 3),
    }[phase]
    assert (record["plan_cache_hit"], record["offload_cache_hit"], record["resumed_from_batch"]) == expected
    assert leftovers(tmp_path) == []  # the dead builder's temporary folder is gone
    assert len(offload_folders(cache)) == 1


def default_sigint() -> None:
    """In a test's child process: SIGINT back to its default (a background shell starts its commands ignoring it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum, code, what", [
    (signal.SIGINT, 130, "interrupted"),  # what Ctrl-C sends
    (signal.SIGTERM, 143, "terminated (SIGTERM)"),  # what SLURM sends on preemption, and `kill`
])
def test_ctrl_c_or_sigterm_stops_with_one_line_and_the_rerun_continues(tmp_path, reference, signum, code, what):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    env = {"BIGJOB_CACHE_DIR": str(cache)}
    args = JOB + [f"hydra.run.dir={run_dir}"]
    job = subprocess.Popen(
        [sys.executable, "-c", DRIVER, "slow", *args], cwd=tmp_path, env=cli_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=default_sigint,
    )
    progress = run_dir / "progress.json"
    wait_for_batches(progress, 2, job, timeout=60)
    job.send_signal(signum)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == code, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    done = json.loads(progress.read_text())["batches_done"]
    assert 2 <= done < BATCHES
    assert lines[0] == f"{what}: {done} finished batch(es) are kept in {run_dir}; run the same command again to continue"
    marker = json.loads(progress.read_text())
    assert (run_dir / "predictions.jsonl").stat().st_size == marker["predictions_bytes"]  # progress kept, consistent
    assert metrics(run_dir)["status"] == "failed" and what.split()[0] in metrics(run_dir)["error"]

    rerun = run_cli(args, tmp_path, env, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    record = metrics(run_dir)
    assert record["status"] == "completed" and record["resumed_from_batch"] == done
    assert (run_dir / "predictions.jsonl").read_bytes() == reference
    assert leftovers(tmp_path) == []


HOLDER = """
import sys, time
from bigjob.job.cache_locks import FileLock
with FileLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_lock_whose_holder_is_killed_is_free_at_once(tmp_path):
    """Why the cache's locks are flocks: a live holder is waited for (and named), a dead one never."""
    from bigjob.errors import CacheError
    from bigjob.job.cache_locks import FileLock

    path = tmp_path / "plan-x.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], env=cli_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CacheError, match=f"held by the live process {holder.pid}"), FileLock(path, timeout=0.3):
            pass
        holder.kill()
        holder.wait(timeout=10)
        started = time.monotonic()
        with FileLock(path, timeout=5) as lock:
            assert lock.held
        assert time.monotonic() - started < 1
    finally:
        holder.kill()
        holder.wait(timeout=10)
