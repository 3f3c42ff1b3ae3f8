"""runner.isolate: a job's work in a fresh child process, its report, its errors forwarded to the parent."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest

from _jobkit import TINY_OVERRIDES, compose_config, read_jsonl, run_cli, wait_for_batches
from bigjob.errors import BudgetError, ConfigError, JobError
from bigjob.job import child_process, forkserver, isolation
from bigjob.job.batch_loop import KILL_AFTER_ENV
from bigjob.job.child_process import ChildTraceback, JobProcessError, config_from_json
from bigjob.job.isolation import isolation_wanted, run_isolated
from bigjob.job.runner import run_job

JOB = TINY_OVERRIDES + ["placement.max_memory.cpu=36KiB", "data.num_samples=6", "data.seq_len=10", "data.batch_size=2", "quiet=true"]


def exploding_model(**kwargs):
    """A model factory with a bug: what a crash (not bad input) in the child looks like."""
    raise RuntimeError("boom inside the job process")


def config(tmp_path, *extra):
    return compose_config(JOB + [f"cache.dir={tmp_path / 'cache'}", *extra])


def test_the_default_is_isolated_sweeps_and_in_process_single_runs(tmp_path):
    cfg = config(tmp_path)
    assert cfg.runner.isolate is None
    assert isolation_wanted(cfg, multirun=True) and not isolation_wanted(cfg, multirun=False)
    assert isolation_wanted(config(tmp_path, "runner.isolate=true"), multirun=False)
    assert not isolation_wanted(config(tmp_path, "runner.isolate=false"), multirun=True)
    assert not isolation_wanted(config(tmp_path, "mode=plan"), multirun=True)  # plans load no weights


def test_the_config_travels_to_the_child_unchanged(tmp_path):
    cfg = config(tmp_path, "placement.max_memory.gpu1=8GiB", "model.kwargs.d_ff=48", "data.min_seq_len=3", "runner.isolate=true")
    cfg.placement.device_map = {"": "cpu", "blocks.0": "disk"}
    cfg.model.special_dtypes = {"lm_head.weight": "float32"}
    assert config_from_json(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def test_runner_isolate_is_not_part_of_the_job_key(tmp_path):
    from bigjob.job.identity import job_identity

    assert job_identity(config(tmp_path, "runner.isolate=true")) == job_identity(config(tmp_path, "runner.isolate=false"))


def test_an_isolated_job_runs_in_a_child_and_reports_its_own_process(tmp_path):
    report = run_isolated(config(tmp_path), tmp_path / "iso")
    plain = run_job(config(tmp_path), tmp_path / "plain")
    assert report.status == "completed" and report.isolated and not plain.isolated
    assert report.pid != os.getpid() and report.parent_pid == os.getpid() and plain.pid == os.getpid()
    metrics = json.loads((tmp_path / "iso" / "metrics.json").read_text())
    assert metrics["isolated"] is True and metrics["pid"] == report.pid and metrics["host"]
    assert metrics["peak_anon_bytes"] > 0 and metrics["start_anon_bytes"] > 0
    # Same outputs as the job run in this process.
    assert read_jsonl(tmp_path / "iso" / "predictions.jsonl") == read_jsonl(tmp_path / "plain" / "predictions.jsonl")


def test_a_completed_job_in_its_folder_starts_no_process(tmp_path, monkeypatch):
    first = run_isolated(config(tmp_path), tmp_path / "run")

    def no_process(*args, **kwargs):
        raise AssertionError("a finished job must not start a process")

    monkeypatch.setattr(isolation.subprocess, "Popen", no_process)
    again = run_isolated(config(tmp_path), tmp_path / "run")
    assert again.pid == first.pid and again.status == "completed"


def test_bad_input_in_the_child_is_the_same_error_with_the_child_traceback(tmp_path):
    with pytest.raises(BudgetError) as info:
        run_isolated(config(tmp_path, "placement.max_memory.cpu=1KiB", "placement.max_memory.disk=0"), tmp_path / "run")
    assert "placement.max_memory.cpu" in str(info.value) and "\n" not in str(info.value)
    cause = info.value.__cause__
    assert isinstance(cause, ChildTraceback) and "Traceback (most recent call last)" in str(cause) and "runner.py" in str(cause)


def test_a_config_error_keeps_its_class(tmp_path):
    with pytest.raises(ConfigError, match="data.batch_size"):
        run_isolated(config(tmp_path, "data.batch_size=0"), tmp_path / "run")


def test_a_crash_in_the_child_is_a_job_process_error_with_its_traceback(tmp_path):
    cfg = config(tmp_path, "model._target_=test_job_isolation.exploding_model", "checkpoint=path", f"checkpoint.path={tmp_path}")
    with pytest.raises(JobProcessError, match="RuntimeError: boom inside the job process") as info:
        run_isolated(cfg, tmp_path / "run")
    assert not isinstance(info.value, JobError)  # a bug, not bad input: the CLI shows the traceback
    assert "exploding_model" in str(info.value.__cause__)


def test_a_killed_child_is_reported_and_the_job_resumes(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    monkeypatch.setenv(KILL_AFTER_ENV, "1")
    with pytest.raises(JobError, match="killed by SIGKILL") as info:
        run_isolated(cfg, tmp_path / "run")
    assert "run the job again to resume" in str(info.value)
    monkeypatch.delenv(KILL_AFTER_ENV)
    report = run_isolated(cfg, tmp_path / "run")
    assert report.status == "completed" and report.resumed_from_batch == 1


def test_the_cli_error_of_an_isolated_run_is_one_line_and_full_with_hydra_full_error(tmp_path):
    env = {"BIGJOB_CACHE_DIR": str(tmp_path / "cache")}
    args = JOB + ["runner.isolate=true", "placement.max_memory.cpu=1KiB", "placement.max_memory.disk=0"]
    out = run_cli(args, tmp_path, env)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "placement.max_memory.cpu" in lines[0]
    full = run_cli(args, tmp_path, {**env, "HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "ChildTraceback" in full.stderr and "child_main" in full.stderr


def test_an_isolated_cli_run_logs_to_the_run_log(tmp_path):
    out = run_cli(JOB + ["runner.isolate=true", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, {"BIGJOB_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["isolated"] is True and metrics["parent_pid"] != metrics["pid"]
    log = (tmp_path / "run" / "bigjob.log").read_text()
    assert f"job running in child process {metrics['pid']}" in log  # the parent's line
    assert f"job process {metrics['pid']} (started by {metrics['parent_pid']})" in log  # the child's lines go to the same file


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_warm_start_forks_each_job_from_one_process_that_imported_once(tmp_path, monkeypatch):
    plain = run_job(config(tmp_path), tmp_path / "plain")
    first = run_isolated(config(tmp_path, "runner.warm_start=true"), tmp_path / "w1")
    second = run_isolated(config(tmp_path, "runner.warm_start=true", "data.seed=3"), tmp_path / "w2")
    server = forkserver.shared_server(["torch"])
    assert server is not None and server.alive
    # Each job in a process of its own, both children of the one warm-start process.
    assert first.isolated and second.isolated and first.pid != second.pid != os.getpid()
    assert first.parent_pid == second.parent_pid == server.process.pid != os.getpid()
    assert read_jsonl(tmp_path / "w1" / "predictions.jsonl") == read_jsonl(tmp_path / "plain" / "predictions.jsonl")
    assert read_jsonl(tmp_path / "w2" / "predictions.jsonl") != read_jsonl(tmp_path / "plain" / "predictions.jsonl")
    assert plain.status == "completed"
    # The child runs with the parent's environment of now, not the server's from its start;
    # a signal that ends it is reported as for a fresh child, and the job resumes.
    monkeypatch.setenv(KILL_AFTER_ENV, "1")
    with pytest.raises(JobError, match="killed by SIGKILL"):
        run_isolated(config(tmp_path, "runner.warm_start=true"), tmp_path / "w3")
    monkeypatch.delenv(KILL_AFTER_ENV)
    resumed = run_isolated(config(tmp_path, "runner.warm_start=true"), tmp_path / "w3")
    assert resumed.status == "completed" and resumed.resumed_from_batch == 1 and resumed.parent_pid == server.process.pid


def test_warm_start_errors_keep_their_class_and_traceback(tmp_path):
    with pytest.raises(BudgetError) as info:
        run_isolated(config(tmp_path, "runner.warm_start=true", "placement.max_memory.cpu=1KiB", "placement.max_memory.disk=0"), tmp_path / "run")
    assert "placement.max_memory.cpu" in str(info.value)
    assert isinstance(info.value.__cause__, ChildTraceback) and "runner.py" in str(info.value.__cause__)


@pytest.mark.parametrize("start", ["fresh", "runner.warm_start=true", "runner.daemon=true"])
def test_the_child_stops_when_its_parent_dies(tmp_path, start, monkeypatch):
    import shutil
    import subprocess
    import sys
    import tempfile
    import time

    from bigjob.job.daemon import stop_daemons

    runtime = Path(tempfile.mkdtemp(prefix="bj", dir="/tmp"))  # the daemon's sockets: short paths, this test's own
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    extra = [] if start == "fresh" else [start]
    # A parent that starts an isolated job and is then killed: the child notices and exits.
    code = (
        "import sys; sys.path[:0] = sys.argv[2:]\n"
        "from _jobkit import compose_config, TINY_OVERRIDES\n"
        "from bigjob.job.isolation import run_isolated\n"
        f"cfg = compose_config(TINY_OVERRIDES + ['data.num_samples=20000', 'data.batch_size=1', 'quiet=true', 'cache.dir={tmp_path / 'cache'}', *{extra!r}])\n"
        "run_isolated(cfg, sys.argv[1])\n"
    )
    here = os.path.dirname(__file__)
    parent = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run"), here, os.path.dirname(here)])
    progress = tmp_path / "run" / "progress.json"
    try:
        assert wait_for_batches(progress, 1, parent), "the child never started its batches"
        parent.kill()
        parent.wait()
        time.sleep(3 * child_process.PARENT_POLL_S + 1)
        done = json.loads(progress.read_text())["batches_done"]
        time.sleep(1.5)
        assert json.loads(progress.read_text())["batches_done"] == done  # no batch after the parent died
        if start == "runner.daemon=true":
            assert len(list((runtime / f"bigjob-{os.getuid()}").glob("*.pid"))) == 1  # the daemon stays for the next command
    finally:
        if (runtime / f"bigjob-{os.getuid()}").exists():
            stop_daemons(runtime / f"bigjob-{os.getuid()}")
        shutil.rmtree(runtime, ignore_errors=True)
