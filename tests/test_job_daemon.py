"""runner.daemon: jobs forked from a warm-start process that outlives the command that started it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from _jobkit import TINY, TINY_OVERRIDES, compose_config, read_jsonl, run_cli, run_entry, wait_for_batches
from safetensors.torch import save_file
from bigjob.errors import BudgetError, ConfigError, JobError
from bigjob.job import schema
from bigjob.job.daemon import socket_dir, stop_daemons
from bigjob.job.child_process import ChildTraceback
from bigjob.job.isolation import isolation_wanted, run_isolated
from bigjob.job.runner import run_job
from bigjob.models.demo import demo_checkpoint_spec, demo_tensor

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"), reason="needs fork() and POSIX signals")

JOB = TINY_OVERRIDES + ["placement.max_memory.cpu=36KiB", "data.num_samples=6", "data.seq_len=10", "data.batch_size=2", "quiet=true"]
USER_MODEL = '''
import os, sys
from bigjob.models.demo import DemoTransformer

def make(**kwargs):
    print("user model {version} in", os.getcwd(), flush=True)
    return DemoTransformer(**kwargs)
'''


def config(tmp_path: Path, *extra: str):
    return compose_config(JOB + [f"cache.dir={tmp_path / 'cache'}", "runner.daemon=true", *extra])


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch):
    """A private runtime folder (short: socket paths are limited to ~100 bytes); its daemons stopped after."""
    base = Path(tempfile.mkdtemp(prefix="bj", dir="/tmp"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    yield base / f"bigjob-{os.getuid()}"
    if (base / f"bigjob-{os.getuid()}").exists():
        stop_daemons(base / f"bigjob-{os.getuid()}")
    shutil.rmtree(base, ignore_errors=True)


def _servers(folder: Path) -> list[int]:
    return sorted(int(json.loads(p.read_text())["pid"]) for p in folder.glob("*.pid"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_daemon_isolates_single_runs_and_refuses_isolate_false(tmp_path: Path) -> None:
    assert isolation_wanted(config(tmp_path), multirun=False)
    assert not isolation_wanted(config(tmp_path, "mode=plan"), multirun=False)
    with pytest.raises(ConfigError, match=r"runner\.daemon=true .* runner\.isolate=false"):
        schema.validate(config(tmp_path, "runner.isolate=false"))
    with pytest.raises(ConfigError, match=r"runner\.daemon_idle_s must be a positive number of seconds, got 0"):
        schema.validate(config(tmp_path, "runner.daemon_idle_s=0"))


def test_a_second_command_forks_its_job_from_the_daemon_the_first_started(tmp_path: Path, runtime: Path, caplog: pytest.LogCaptureFixture) -> None:
    plain = run_job(compose_config(JOB + [f"cache.dir={tmp_path / 'cache'}"]), tmp_path / "plain")
    with caplog.at_level(logging.INFO, logger="bigjob.job.isolation"):
        first = run_isolated(config(tmp_path), tmp_path / "d1")
        second = run_isolated(config(tmp_path, "data.seed=3"), tmp_path / "d2")
    (server,) = _servers(runtime)  # one daemon, still there for the next command
    assert _alive(server) and server != os.getpid()
    forked = [r.getMessage() for r in caplog.records if "forked by warm-start process" in r.getMessage()]
    assert len(forked) == 2 and all(m.endswith(f"forked by warm-start process {server}") for m in forked)
    assert first.isolated and second.isolated and len({first.pid, second.pid, os.getpid(), server}) == 4
    assert first.status == second.status == plain.status == "completed"
    assert read_jsonl(tmp_path / "d1" / "predictions.jsonl") == read_jsonl(tmp_path / "plain" / "predictions.jsonl")
    assert read_jsonl(tmp_path / "d2" / "predictions.jsonl") != read_jsonl(tmp_path / "plain" / "predictions.jsonl")


def test_the_job_runs_in_the_commands_folder_and_writes_to_its_streams(
    tmp_path: Path, runtime: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "daemon_user_model.py").write_text(USER_MODEL.format(version=1))
    monkeypatch.syspath_prepend(str(models))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    weights = tmp_path / "user.safetensors"
    spec = demo_checkpoint_spec(TINY)
    save_file({name: demo_tensor(name, shape, 0, TINY["n_layers"]) for name, shape in spec}, str(weights))
    target = ["model._target_=daemon_user_model.make", "checkpoint=path", f"checkpoint.path={weights}"]
    run_isolated(config(tmp_path, *target), tmp_path / "r1")
    (server,) = _servers(runtime)
    assert f"user model 1 in {work}" in capfd.readouterr().out
    # The model's file changes: the daemon that imported it refuses, a new one imports the new code.
    time.sleep(0.01)
    (models / "daemon_user_model.py").write_text(USER_MODEL.format(version=2))
    run_isolated(config(tmp_path, *target), tmp_path / "r2")
    assert f"user model 2 in {work}" in capfd.readouterr().out
    (new_server,) = _servers(runtime)
    assert new_server != server
    deadline = time.time() + 10
    while _alive(server) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(server)


def test_errors_keep_their_class_and_traceback(tmp_path: Path, runtime: Path) -> None:
    with pytest.raises(BudgetError) as info:
        run_isolated(config(tmp_path, "placement.max_memory.cpu=1KiB", "placement.max_memory.disk=0"), tmp_path / "run")
    assert "placement.max_memory.cpu" in str(info.value)
    assert isinstance(info.value.__cause__, ChildTraceback) and "runner.py" in str(info.value.__cause__)


def test_an_idle_daemon_exits_and_removes_its_socket(tmp_path: Path, runtime: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="bigjob.job.isolation"):
        report = run_isolated(config(tmp_path, "runner.daemon_idle_s=1"), tmp_path / "run")
    assert report.status == "completed"  # a daemon idle while its job runs leaves the job alone
    (server,) = [int(r.getMessage().rsplit(" ", 1)[1]) for r in caplog.records if "forked by warm-start process" in r.getMessage()]
    deadline = time.time() + 15
    while _alive(server) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(server)
    assert list(runtime.glob("*.sock")) == [] and list(runtime.glob("*.pid")) == []


def test_a_runtime_folder_others_can_enter_is_refused(runtime: Path) -> None:
    runtime.mkdir(mode=0o755)
    os.chmod(runtime, 0o755)
    with pytest.raises(JobError, match=r"only you can enter \(mode drwxr-xr-x\)"):
        socket_dir()


def test_two_commands_share_one_daemon_and_print_as_their_own(tmp_path: Path, runtime: Path) -> None:
    args = JOB + [f"cache.dir={tmp_path / 'cache'}", "quiet=false"]
    plain = run_cli([*args, f"hydra.run.dir={tmp_path / 'plain'}"], cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    runs = []
    for name in ("d1", "d2"):
        done = run_cli([*args, "runner.daemon=true", f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        runs.append(done)
    (server,) = _servers(runtime)
    for name, done in zip(("d1", "d2"), runs):
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["isolated"] is True
        assert read_jsonl(tmp_path / name / "predictions.jsonl") == read_jsonl(tmp_path / "plain" / "predictions.jsonl")
        # What the job printed reached the command's own output, as without the daemon.
        assert f"forked by warm-start process {server}" in done.stdout + done.stderr
    # A failing job: the command's exit code and one-line error, as without the daemon.
    bad = run_cli([*args, "runner.daemon=true", "placement.max_memory.cpu=1KiB", "placement.max_memory.disk=0",
                   f"hydra.run.dir={tmp_path / 'bad'}"], cwd=tmp_path)
    reference = run_cli([*args, "runner.isolate=true", "placement.max_memory.cpu=1KiB", "placement.max_memory.disk=0",
                         f"hydra.run.dir={tmp_path / 'bad-plain'}"], cwd=tmp_path)
    assert bad.returncode == reference.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == reference.stderr.strip().splitlines()[-1]


def test_ctrl_c_in_the_command_stops_the_job_and_a_rerun_continues(tmp_path: Path, runtime: Path) -> None:
    from _jobkit import cli_env

    run_dir = tmp_path / "run"
    args = [*TINY_OVERRIDES, "data.num_samples=3000", "data.batch_size=1", "quiet=true", f"cache.dir={tmp_path / 'cache'}",
            "runner.daemon=true", f"hydra.run.dir={run_dir}"]
    job = subprocess.Popen([sys.executable, "-m", "bigjob", *args], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background shell ignores SIGINT
    progress = run_dir / "progress.json"
    assert wait_for_batches(progress, 2, job)
    job.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted: "), stderr
    done = json.loads(progress.read_text())["batches_done"]
    time.sleep(1.5)
    assert json.loads(progress.read_text())["batches_done"] == done  # the job stopped with the command
    assert done < 3000
    rerun = run_cli([*args[:-1], f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed" and record["resumed_from_batch"] == done


def test_bigjob_daemon_lists_and_stops_them(tmp_path: Path, runtime: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(runtime.parent)}
    assert run_entry("daemon_main", ["list"], tmp_path, env).stdout.strip().endswith(f"0 daemon(s) in {runtime}")
    run_isolated(config(tmp_path), tmp_path / "run")
    (server,) = _servers(runtime)
    listed = run_entry("daemon_main", ["list"], tmp_path, env)
    assert listed.returncode == 0 and f"pid {server}  up " in listed.stdout and "preloaded torch, bigjob.job.runner" in listed.stdout
    stopped = run_entry("daemon_main", ["stop"], tmp_path, env)
    assert stopped.stdout.strip() == f"stopped 1 daemon(s): {server}"
    deadline = time.time() + 10
    while _alive(server) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(server) and list(runtime.iterdir()) == [p for p in runtime.iterdir() if p.suffix in (".lock", ".log")]
    # The next command starts a new one.
    run_isolated(config(tmp_path, "data.seed=4"), tmp_path / "again")
    assert _servers(runtime) != [server] and len(_servers(runtime)) == 1
