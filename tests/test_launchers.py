"""Real sweeps through Hydra's launcher plugins on this machine: joblib, submitit's local executor, Ray.

Each test runs ``python -m bigjob -m ...`` as a user would, on the shrunk demo model, and
reads the records the jobs leave. The plugins are in the ``test`` extra; a test whose plugin
is missing is skipped with the package to install.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _jobkit import TINY_OVERRIDES, cli_env, read_jsonl, run_cli

TINY_JOB = TINY_OVERRIDES + ["placement.max_memory.cpu=36KiB", "data.num_samples=6", "data.seq_len=10", "data.batch_size=2"]


def needs(module: str, extra: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f'needs {module}: pip install ".[{extra}]"')


needs_joblib = needs("hydra_plugins.hydra_joblib_launcher", "joblib")
needs_submitit = needs("hydra_plugins.hydra_submitit_launcher", "slurm")
needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None or importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None,
    reason='needs ray and hydra-ray-launcher: pip install ".[ray]"',
)


def sweep(tmp_path: Path, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(["-m", *args], tmp_path, {"BIGJOB_CACHE_DIR": str(tmp_path / "cache"), **(env or {})}, timeout=180)


def records(sweep_dir: Path, jobs: int) -> list[dict]:
    return [json.loads((sweep_dir / str(j) / "metrics.json").read_text()) for j in range(jobs)]


def summary_rows(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def output_times(sweep_dir: Path, jobs: int) -> list[int]:
    return [(sweep_dir / str(j) / "predictions.jsonl").stat().st_mtime_ns for j in range(jobs)]


@needs_joblib
def test_joblib_sweep_with_two_workers_isolates_every_job(tmp_path):
    folder = tmp_path / "sweep"
    args = [*TINY_JOB, "hydra/launcher=local_parallel", "placement.max_memory.cpu=24KiB,36KiB", "data.batch_size=1,3", f"hydra.sweep.dir={folder}"]
    out = sweep(tmp_path, args)
    assert out.returncode == 0, out.stderr
    assert "Joblib.Parallel(n_jobs=2" in out.stdout + out.stderr
    runs = records(folder, 4)
    assert all(r["status"] == "completed" and r["isolated"] for r in runs)
    assert len({r["pid"] for r in runs}) == 4  # a fresh process per job ...
    assert len({r["parent_pid"] for r in runs}) == 2  # ... started by the two joblib workers
    assert [r["status"] for r in summary_rows(folder)] == ["completed"] * 4

    # The outputs are those of the same job run alone (to rounding: joblib's workers limit the
    # threads of their children, which changes the order of float sums).
    alone = run_cli([*TINY_JOB, "placement.max_memory.cpu=24KiB", "data.batch_size=1", f"hydra.run.dir={tmp_path / 'alone'}"], tmp_path,
                    {"BIGJOB_CACHE_DIR": str(tmp_path / "cache")})
    assert alone.returncode == 0, alone.stderr
    for ours, theirs in zip(read_jsonl(folder / "0" / "predictions.jsonl"), read_jsonl(tmp_path / "alone" / "predictions.jsonl"), strict=True):
        assert ours["top_ids"] == theirs["top_ids"]
        torch.testing.assert_close(torch.tensor(ours["top_values"]), torch.tensor(theirs["top_values"]), rtol=1e-5, atol=1e-5)



@needs_joblib
def test_rerunning_a_joblib_sweep_skips_completed_jobs_and_runs_the_rest(tmp_path):
    folder = tmp_path / "sweep"
    args = [*TINY_JOB, "hydra/launcher=local_parallel", "data.batch_size=1,3,2", f"hydra.sweep.dir={folder}"]
    assert sweep(tmp_path, args).returncode == 0
    runs = records(folder, 3)

    # Every job is complete for the same resolved config: nothing runs, no job process starts.
    before = output_times(folder, 3)
    again = sweep(tmp_path, args)
    assert again.returncode == 0, again.stderr
    assert output_times(folder, 3) == before and [r["pid"] for r in records(folder, 3)] == [r["pid"] for r in runs]

    # A job whose record is gone (its worker died before writing it) runs again; the others stay.
    (folder / "1" / "metrics.json").unlink()
    third = sweep(tmp_path, args)
    assert third.returncode == 0, third.stderr
    after = records(folder, 3)
    assert [r["pid"] == old["pid"] for r, old in zip(after, runs)] == [True, False, True]
    assert after[1]["status"] == "completed" and after[1]["resumed_from_batch"] == after[1]["batches"]  # its batches were kept
    assert [r["status"] for r in summary_rows(folder)] == ["completed"] * 3


@needs_joblib
def test_a_failed_job_of_a_joblib_sweep_fails_the_sweep_once(tmp_path):
    folder = tmp_path / "sweep"
    out = sweep(tmp_path, [*TINY_JOB, "hydra/launcher=local_parallel", "data.batch_size=2,0", f"hydra.sweep.dir={folder}"])
    assert out.returncode == 1
    assert out.stderr.count("error: job 1 (") == 1 and "data.batch_size must be at least 1" in out.stderr
    assert "Traceback" not in out.stderr
    assert [r["status"] for r in summary_rows(folder)] == ["completed", "failed"]


@pytest.mark.slow
@needs_joblib
def test_two_jobs_in_one_joblib_worker_report_independent_peaks(tmp_path):
    """A job with the whole model in RAM, then one with most of it on disk, in the same joblib worker."""
    from bigjob.models.demo import make_demo_checkpoint

    model = {"vocab_size": 8192, "d_model": 384, "n_layers": 8, "n_heads": 6, "d_ff": 1536, "max_seq_len": 128}  # 66 MiB in float32
    make_demo_checkpoint(tmp_path / "cache" / "checkpoints", model)  # made here, so no job pays for making it
    folder = tmp_path / "sweep"
    args = [
        "model=demo_tiny", *(f"model.kwargs.{k}={v}" for k, v in model.items()),
        "data.num_samples=4", "data.seq_len=32", "data.batch_size=2", "placement.prefetch=0",
        # batch_size=2: joblib hands jobs (0, 1) to one worker and (2, 3) to the other, in that order.
        "hydra/launcher=local_parallel", "hydra.launcher.batch_size=2",
        "data.seed=0,1", "placement.max_memory.cpu=1GiB,24MiB", f"hydra.sweep.dir={folder}",
    ]
    out = sweep(tmp_path, args)
    assert out.returncode == 0, out.stderr
    runs = records(folder, 4)
    for big, small in (runs[0:2], runs[2:4]):
        assert big["budgets"]["cpu"] == 2**30 and small["budgets"]["cpu"] == 24 * 2**20
        assert big["bytes_per_tier"] == {"cpu": big["bytes_per_tier"]["cpu"]} and small["bytes_per_tier"]["disk"] > 40 * 2**20
        assert big["parent_pid"] == small["parent_pid"] and big["pid"] != small["pid"]  # one worker, two job processes
        # The small job's peak is its own: below the big one's by most of the weights it left on disk.
        # (Resident weights are the checkpoint's mapped pages: they count in RSS, not in anonymous memory.)
        assert small["peak_rss_bytes"] < big["peak_rss_bytes"] - 30 * 2**20, (big["peak_rss_bytes"], small["peak_rss_bytes"])
        assert small["peak_anon_bytes"] - small["start_anon_bytes"] < 40 * 2**20


@needs_submitit
def test_the_slurm_preset_becomes_this_sbatch_script(tmp_path, monkeypatch):
    """No cluster here: the plugin builds its executor (a stub `srun` on PATH) and renders the job script; nothing is submitted."""
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from bigjob.cli import config_dir

    stub = tmp_path / "bin" / "srun"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}:{os.environ['PATH']}")
    submitted = {}

    def record(executor, fn, *args):
        submitted.update(executor=executor, jobs=len(args[0]))
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", record)
    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2", "hydra.launcher.timeout_min=240",
                 "hydra.launcher.array_parallelism=4", 'hydra.launcher.setup=["bigjob-cache import /shared/plans.json"]',
                 f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    launcher.launch([["data.batch_size=1"], ["data.batch_size=8"]], initial_job_idx=0)
    slurm = submitted["executor"]._executor
    assert submitted["jobs"] == 2 and slurm.parameters["array_parallelism"] == 4
    script = slurm._make_submission_file_text("python -u -m submitit.core._submit", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --time=240", "#SBATCH --mem=64GB",
                 "#SBATCH --cpus-per-task=8", "bigjob-cache import /shared/plans.json", "export SUBMITIT_EXECUTOR=slurm"):
        assert line in script, line


@needs_ray
def test_the_ray_presets(monkeypatch):
    from hydra import compose, initialize_config_dir

    from bigjob.cli import config_dir

    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        local = compose("config", overrides=["hydra/launcher=ray_local"], return_hydra_config=True).hydra.launcher.ray
        cluster = compose("config", overrides=["hydra/launcher=ray_cluster"], return_hydra_config=True).hydra.launcher.ray
    assert local.init.address is None and local.remote.num_cpus == 1
    # Joining a cluster: the address from the environment, and no object store size (Ray refuses one then).
    assert cluster.init.address == "ray://head:10001" and "object_store_memory" in cluster.init and cluster.init.object_store_memory is None


@needs_submitit
def test_submitit_local_sweep_runs_each_job_in_its_own_process(tmp_path):
    folder = tmp_path / "sweep"
    out = sweep(tmp_path, [*TINY_JOB, "hydra/launcher=submitit_local", "data.batch_size=1,3,0", f"hydra.sweep.dir={folder}"])
    assert out.returncode == 1  # job 2 fails on its input; the sweep says so although it ran elsewhere
    assert out.stderr.count("error: job 2 (") == 1 and "data.batch_size must be at least 1" in out.stderr
    assert [r["status"] for r in summary_rows(folder)] == ["completed", "completed", "failed"]
    runs = records(folder, 2)
    assert runs[0]["pid"] != runs[1]["pid"] and runs[0]["parent_pid"] != runs[1]["parent_pid"]
    assert not any(r["isolated"] for r in runs)  # submitit already gave each job a fresh process
    assert list((folder / ".submitit").glob("*/*_log.out"))

    again = sweep(tmp_path, [*TINY_JOB, "hydra/launcher=submitit_local", "data.batch_size=1,3", f"hydra.sweep.dir={folder}"])
    assert again.returncode == 0, again.stderr
    assert [r["pid"] for r in records(folder, 2)] == [r["pid"] for r in runs]  # completed jobs were skipped


def ray_env(tmp_path: Path) -> dict[str, str]:
    """Token authentication with a token of this test's own (nothing written to ~/.ray)."""
    token = tmp_path / "ray_token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.mark.slow
@needs_ray
def test_ray_sweep_on_a_local_instance(tmp_path):
    folder = tmp_path / "sweep"
    args = [*TINY_JOB, "hydra/launcher=ray_local", "hydra.launcher.ray.init.num_cpus=2", "data.batch_size=1,3", f"hydra.sweep.dir={folder}",
            f"cache.dir={tmp_path / 'cache'}"]
    start = time.perf_counter()
    out = sweep(tmp_path, args, ray_env(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert time.perf_counter() - start < 120
    assert "Started a local Ray instance" in out.stderr
    runs = records(folder, 2)
    assert all(r["status"] == "completed" and r["isolated"] for r in runs)
    assert [r["status"] for r in summary_rows(folder)] == ["completed", "completed"]


@pytest.mark.slow
@needs_ray
def test_ray_sweep_on_a_cluster_started_and_stopped_by_the_test(tmp_path):
    # The cluster's workers have the cluster's environment, not the sweep's: the cache folder
    # must travel in the config (cache.dir), and this default of theirs must stay unused.
    env = cli_env({**ray_env(tmp_path), "BIGJOB_CACHE_DIR": str(tmp_path / "workers-default-cache")})
    head_code = (
        "import sys, ray\n"
        "ctx = ray.init(num_cpus=2, include_dashboard=False)\n"
        "print(ctx.address_info['gcs_address'], flush=True)\n"
        "sys.stdin.read()\n"  # until the test closes our stdin
        "ray.shutdown()\n"
    )
    head = subprocess.Popen([sys.executable, "-c", head_code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    try:
        address = head.stdout.readline().strip()
        assert address, head.stderr.read()
        folder = tmp_path / "sweep"
        args = [*TINY_JOB, "hydra/launcher=ray_cluster", f"hydra.launcher.ray.init.address={address}", "data.batch_size=1,3,0",
                f"hydra.sweep.dir={folder}", f"cache.dir={tmp_path / 'cache'}"]
        out = sweep(tmp_path, args, ray_env(tmp_path))
        assert out.returncode == 1, out.stderr[-3000:]  # job 2 fails on its input
        assert "Connected to Ray cluster" in out.stderr and out.stderr.count("error: job 2 (") == 1
        runs = records(folder, 2)
        assert all(r["status"] == "completed" and r["isolated"] for r in runs)
        assert [r["status"] for r in summary_rows(folder)] == ["completed", "completed", "failed"]
        assert (tmp_path / "cache").is_dir() and not (tmp_path / "workers-default-cache").exists()
    finally:
        head.stdin.close()  # the head calls ray.shutdown() and exits
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
    assert head.returncode == 0
