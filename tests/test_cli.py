"""The command line as a user runs it: subprocesses in a fresh folder, exit codes, files written."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from _jobkit import REPO, TINY_OVERRIDES, cli_env, read_jsonl, reference_model, run_cli, run_entry

TINY_JOB = TINY_OVERRIDES + ["placement.max_memory.cpu=36KiB", "data.num_samples=6", "data.seq_len=10", "data.batch_size=2"]


def cache_env(tmp_path):
    return {"BIGJOB_CACHE_DIR": str(tmp_path / "cache")}


def only_run_dir(tmp_path) -> Path:
    (day,) = (tmp_path / "outputs").iterdir()
    runs = sorted(day.iterdir())
    return runs[-1]


@pytest.mark.slow
def test_default_run_end_to_end_then_a_plan_cache_hit(tmp_path):
    start = time.perf_counter()
    first = run_cli([], tmp_path, cache_env(tmp_path))
    seconds = time.perf_counter() - start
    assert first.returncode == 0, first.stderr
    assert seconds < 60
    run_dir = only_run_dir(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["plan_cache_hit"] is False
    assert metrics["bytes_per_tier"]["disk"] > 0 and metrics["bytes_per_tier"]["cpu"] < 217e6  # part served from disk
    assert metrics["batches"] == 4 and "cache hit" not in first.stdout and "plan" in first.stdout
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "device_map.json").exists()

    # The outputs are those of the demo model run directly in RAM.
    (ckpt,) = (tmp_path / "cache" / "checkpoints").glob("demo-*")
    model = reference_model(ckpt, kwargs={})
    records = read_jsonl(run_dir / "predictions.jsonl")
    from bigjob.job.data import load_samples
    from bigjob.job.schema import DataConfig

    ids = load_samples(DataConfig(), 8192)
    for i in (0, 15):
        with torch.no_grad():
            top = model(torch.tensor([ids[i]]))["logits"][0].topk(5, dim=-1)
        assert records[i]["top_ids"] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(records[i]["top_values"]), top.values, rtol=1e-4, atol=1e-4)

    time.sleep(0.01)
    second = run_cli([], tmp_path, cache_env(tmp_path))
    assert second.returncode == 0, second.stderr
    metrics2 = json.loads((only_run_dir(tmp_path) / "metrics.json").read_text())
    assert metrics2["plan_cache_hit"] is True and "cache hit" in second.stdout


def test_plan_entry_point_prints_the_table_and_map_and_loads_nothing(tmp_path):
    out = run_entry("plan_main", TINY_JOB, tmp_path, cache_env(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "planned" in out.stdout and "disk" in out.stdout and "blocks.3:" in out.stdout
    run_dir = only_run_dir(tmp_path)
    assert json.loads((run_dir / "device_map.json").read_text())["device_map"]
    assert not (run_dir / "predictions.jsonl").exists() and not (tmp_path / "cache" / "checkpoints").exists()


BAD = {
    "unknown key": (["data.batchsize=3"], "data.batchsize"),
    "unknown option": (["task=nonesuch"], "nonesuch"),
    "invalid budget": (["placement.max_memory.cpu=lots"], "placement.max_memory.cpu"),
    "negative budget": (["placement.max_memory.disk=-1GB"], "placement.max_memory.disk"),
    "missing checkpoint": (["checkpoint=path", "checkpoint.path=/no/such/ckpt"], "checkpoint.path"),
    "unimportable target": (["model._target_=nowhere.Model"], "model._target_"),
    "malformed data line": (["data=jsonl", "data.path=bad.jsonl"], "bad.jsonl' line 2"),
    "batch size 0": (["data.batch_size=0"], "data.batch_size"),
    "unwritable output folder": (["hydra.run.dir=afile/run"], "hydra.run.dir"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_clear_line_and_exit_code_1(tmp_path, name):
    args, key = BAD[name]
    (tmp_path / "bad.jsonl").write_text("[1, 2]\n[1, two]\n")
    (tmp_path / "afile").write_text("")
    out = run_cli(TINY_JOB + args, tmp_path, cache_env(tmp_path))
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and key in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert not (tmp_path / "cache").exists()  # nothing written to the cache


@pytest.mark.parametrize("name", ["batch size 0", "unwritable output folder"])
def test_hydra_full_error_shows_the_traceback(tmp_path, name):
    (tmp_path / "afile").write_text("")
    out = run_cli(TINY_JOB + BAD[name][0], tmp_path, {**cache_env(tmp_path), "HYDRA_FULL_ERROR": "1"})
    assert out.returncode == 1 and "Traceback" in out.stderr and BAD[name][1] in out.stderr


def test_sweep_writes_a_summary_and_a_rerun_skips_completed_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY_JOB, "placement.max_memory.cpu=24KiB,36KiB", "data.batch_size=1,3", f"hydra.sweep.dir={sweep}"]
    out = run_cli(args, tmp_path, cache_env(tmp_path))
    assert out.returncode == 0, out.stderr
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"] and {r["status"] for r in rows} == {"completed"}
    assert "placement.max_memory.cpu=24KiB" in rows[0]["overrides"] and "data.batch_size=1" in rows[0]["overrides"]
    assert (sweep / "summary.md").read_text().count("completed") == 4
    for job in range(4):
        assert json.loads((sweep / str(job) / "metrics.json").read_text())["status"] == "completed"
    outputs = {job: (sweep / str(job) / "predictions.jsonl").stat().st_mtime_ns for job in range(4)}

    again = run_cli(args, tmp_path, cache_env(tmp_path))  # same sweep folder: every job is already done
    assert again.returncode == 0, again.stderr
    assert outputs == {job: (sweep / str(job) / "predictions.jsonl").stat().st_mtime_ns for job in range(4)}

    elsewhere = run_cli(args[:-1] + [f"hydra.sweep.dir={tmp_path / 'sweep2'}"], tmp_path, cache_env(tmp_path))
    assert elsewhere.returncode == 0, elsewhere.stderr
    reused = [json.loads((tmp_path / "sweep2" / str(j) / "metrics.json").read_text())["reused_from"] for j in range(4)]
    assert reused == [str(sweep / str(j)) for j in range(4)]

    summary = run_entry("summarize_main", [str(sweep)], tmp_path)
    assert summary.returncode == 0 and "| 3 | completed |" in summary.stdout


def test_a_sweep_with_a_failing_job_still_gets_its_summary(tmp_path):
    sweep = tmp_path / "sweep"
    out = run_cli(["-m", *TINY_JOB, "data.batch_size=2,0,3", f"hydra.sweep.dir={sweep}"], tmp_path, cache_env(tmp_path))
    assert out.returncode == 1
    assert "data.batch_size must be at least 1" in out.stderr and "Traceback" not in out.stderr
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["completed", "failed", "completed"]
    assert "data.batch_size" in rows[1]["error"]
    # The standalone command gives the same table.
    (sweep / "summary.csv").unlink()
    again = run_entry("summarize_main", [str(sweep)], tmp_path)
    assert again.returncode == 0 and (sweep / "summary.csv").exists() and "| 1 | failed |" in again.stdout


def test_two_jobs_started_at_once_both_succeed_and_plan_once(tmp_path):
    env = cli_env(cache_env(tmp_path))
    procs = [
        subprocess.Popen([sys.executable, "-m", "bigjob", *TINY_JOB, f"hydra.run.dir={tmp_path / f'run{i}'}"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    hits = sorted(json.loads((tmp_path / f"run{i}" / "metrics.json").read_text())["plan_cache_hit"] for i in range(2))
    assert hits == [False, True]
    assert (tmp_path / "run0" / "predictions.jsonl").read_bytes() == (tmp_path / "run1" / "predictions.jsonl").read_bytes()


def test_a_killed_run_continues_where_it_stopped(tmp_path):
    job = TINY_JOB + ["data.num_samples=10"]
    whole = run_cli(job + [f"hydra.run.dir={tmp_path / 'whole'}"], tmp_path, cache_env(tmp_path))
    assert whole.returncode == 0, whole.stderr
    part_dir = tmp_path / "part"
    killed = run_cli(job + [f"hydra.run.dir={part_dir}"], tmp_path, {**cache_env(tmp_path), "BIGJOB_KILL_AFTER_BATCHES": "2"})
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((part_dir / "progress.json").read_text())["batches_done"] == 2
    assert not (part_dir / "metrics.json").exists()
    resumed = run_cli(job + [f"hydra.run.dir={part_dir}"], tmp_path, cache_env(tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((part_dir / "metrics.json").read_text())["resumed_from_batch"] == 2
    assert (part_dir / "predictions.jsonl").read_bytes() == (tmp_path / "whole" / "predictions.jsonl").read_bytes()


def test_cache_command(tmp_path):
    env = cache_env(tmp_path)
    assert "no cache" in run_entry("cache_main", ["list"], tmp_path, env).stdout
    done = run_cli(TINY_JOB + ["dtype=float16", "placement.max_memory.cpu=24KiB", "placement.working_memory=auto"], tmp_path, env)
    assert done.returncode == 0, done.stderr
    listing = run_entry("cache_main", ["list"], tmp_path, env)
    assert listing.returncode == 0 and "plan:" in listing.stdout and "DemoTransformer" in listing.stdout and "float16" in listing.stdout
    assert "offload:" in listing.stdout and "MISSING" not in listing.stdout  # the converted disk tier's folder
    assert "working:" in listing.stdout and '"task": "logits"' in listing.stdout  # the estimated working memory, and for what
    info = run_entry("cache_main", ["info"], tmp_path, env)
    assert "0o700" in info.stdout and "plan 1" in info.stdout and "working 1" in info.stdout and "checkpoints   1" in info.stdout
    verify = run_entry("cache_main", ["verify"], tmp_path, env)
    assert verify.returncode == 0 and "0 entries dropped" in verify.stdout
    assert "has no entry" not in verify.stdout  # the job's registered offload folder is not an orphan
    cleared = run_entry("cache_main", ["--dir", str(tmp_path / "cache"), "clear"], tmp_path)
    assert cleared.returncode == 0 and "removed" in cleared.stdout
    assert "0 entries" in run_entry("cache_main", ["list"], tmp_path, env).stdout


def test_a_listing_cut_short_by_its_reader_ends_quietly(tmp_path):
    """``bigjob-cache list | head -1``: the reader leaves after one line; the command ends with 0 and says nothing."""
    from bigjob.job.cache import JobCache

    with JobCache(tmp_path / "cache") as cache:  # about 200 KiB of listing: more than a pipe holds
        for i in range(2000):
            cache.set(f"plan:{i:064x}", {"kind": "plan", "device_map": {"": "cpu"}, "inputs": {"model_class": "M" * 40}})
    code = "import sys; from bigjob.cli import cache_main; cache_main(sys.argv[1:])"
    listing = subprocess.Popen([sys.executable, "-c", code, "--dir", str(tmp_path / "cache"), "list"], cwd=tmp_path,
                               env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert listing.stdout is not None and listing.stdout.readline().startswith(b"plan:")
    listing.stdout.close()
    assert listing.wait(timeout=120) == 0
    assert listing.stderr is not None and listing.stderr.read() == b""


@pytest.mark.slow
def test_installed_package_runs_from_another_folder(tmp_path):
    venv = tmp_path / "venv"
    # No pip or torch of its own: a .pth file lends it this test run's packages (pip, torch, ...), which
    # may live in a venv of their own, so --system-site-packages would not reach them. The wheel is
    # built the way a user's `pip install .` builds it, in an isolated build environment.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    lent = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "lent.pth").write_text("".join(f"{path}\n" for path in sorted(lent)))
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(REPO)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert pip.returncode == 0, pip.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    env["BIGJOB_CACHE_DIR"] = str(tmp_path / "cache")
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import bigjob.cli as c; print(c.config_dir())"], env=env, cwd=elsewhere,
                           capture_output=True, text=True)
    assert str(venv) in where.stdout, where.stdout + where.stderr
    out = subprocess.run([str(venv / "bin" / "bigjob"), "mode=plan"], env=env, cwd=elsewhere, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "disk" in out.stdout and list((elsewhere / "outputs").iterdir())
    plan = subprocess.run([str(venv / "bin" / "bigjob-plan"), "experiment=tiny"], env=env, cwd=elsewhere, capture_output=True, text=True)
    assert plan.returncode == 0, plan.stderr


def test_a_sweep_with_a_failed_job_still_prints_the_summary_table(tmp_path):
    sweep = tmp_path / "sweep"
    out = run_cli(["-m", *TINY_JOB, "data.batch_size=1,0", "runner.isolate=false", f"hydra.sweep.dir={sweep}"], tmp_path, cache_env(tmp_path))
    assert out.returncode == 1, out.stderr
    table = out.stdout[out.stdout.index(f"sweep {sweep}: 2 jobs, 1 failed"):]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| job ")]
    assert [row.split(" | ")[:2] for row in rows] == [["| 0", "completed"], ["| 1", "failed"]]
    assert "data.batch_size must be at least 1, got 0" in rows[1]
    with (sweep / "summary.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["completed", "failed"]


TORCH_PROBE = """
import sys
from bigjob.cli import {entry}
sys.argv[0] = {entry!r}
try:
    {entry}()
except SystemExit:
    pass
sys.stderr.write("torch imported" if "torch" in sys.modules else "torch not imported")
"""


def probe(entry: str, args: list[str], cwd) -> subprocess.CompletedProcess[str]:
    """``entry`` (a console-script function of bigjob.cli) run with ``args``; stderr ends by saying whether torch got imported."""
    code = TORCH_PROBE.format(entry=entry)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=120)


def test_help_and_version_answer_without_importing_torch(tmp_path):
    from importlib.metadata import PackageNotFoundError, version

    import bigjob

    try:
        expected = version("bigjob")
    except PackageNotFoundError:
        expected = bigjob.__version__
    out = probe("main", ["--version"], tmp_path)
    assert out.stdout.strip() == f"bigjob {expected}" and out.stderr.endswith("torch not imported"), out.stderr
    out = probe("cache_main", ["--version"], tmp_path)
    assert out.stdout.strip() == f"bigjob-cache {expected}" and out.stderr.endswith("torch not imported"), out.stderr
    out = probe("cache_main", ["--help"], tmp_path)
    assert "XDG_CACHE_HOME" in out.stdout and "BIGJOB_CACHE_DIR" in out.stdout and out.stderr.endswith("torch not imported"), out.stderr
    fast = probe("main", ["--help"], tmp_path)
    assert fast.stderr.endswith("torch not imported"), fast.stderr
    assert "== Configuration groups ==" in fast.stdout and "placement: auto, balanced" in fast.stdout and "max_memory:" in fast.stdout
    hydra_help = run_cli(["--help", "mode=run"], tmp_path)  # an override: Hydra's own help, the same config
    assert hydra_help.returncode == 0 and fast.stdout == hydra_help.stdout
