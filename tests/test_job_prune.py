"""Pruning the cache: least recently used folders first, never a folder a job uses, entries go with their folder.

Unit tests build artifact folders by hand (sizes and last-use times chosen, so what must go
is computed here); the job tests run real jobs: a job running in another process keeps its
folders through ``bigjob-cache prune --max-size 0``, and ``cache.max_size`` prunes other
jobs' folders at the end of a job, never its own.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _faultkit import DRIVER, JOB, metrics, offload_folders
from _jobkit import cli_env, compose_config, run_cli, run_entry, wait_for_batches

from bigjob.errors import CacheError
from bigjob.job.cache import JobCache
from bigjob.job.cache_locks import gate_lock, use_lock
from bigjob.job.prune import artifacts, parse_age, prune
from bigjob.job.runner import run_job

DAY = 86400.0
NOW = 1_800_000_000.0


def _folder(path: Path, nbytes: int, last_used: float) -> Path:
    path.mkdir(parents=True)
    (path / "weights.safetensors").write_bytes(bytes(nbytes))
    os.utime(path, (last_used, last_used))
    return path


@pytest.fixture
def cache(tmp_path):
    with JobCache(tmp_path / "cache") as opened:
        yield opened


def _offload(cache: JobCache, name: str, nbytes: int, last_used: float) -> Path:
    """A registry folder holding one engine folder, with the entry a job would write for it."""
    registry = cache.offload_dir(name * 64)
    _folder(registry / "offload-x", nbytes, last_used)
    os.utime(registry, (last_used, last_used))
    cache.set(f"offload:{name * 64}", {"kind": "offload", "path": str(registry / "offload-x")})
    return registry


def test_max_size_removes_the_least_recently_used_until_the_cache_fits(cache):
    old = _offload(cache, "a", 3000, NOW - 3 * DAY)
    middle = _offload(cache, "b", 2000, NOW - 2 * DAY)
    recent = _offload(cache, "c", 1000, NOW - 1 * DAY)
    cache.set("plan:" + "d" * 64, {"kind": "plan", "device_map": {"": "cpu"}})
    before = cache.volume()
    # Removing the oldest (3000 B) leaves it 100 B too big: the next oldest goes too, the newest stays.
    result = prune(cache, max_size=before - 3100, now=NOW)
    assert [a.path for a in result.removed] == [old, middle] and result.freed == 5000
    assert not old.exists() and not middle.exists() and recent.exists()
    assert result.entries_removed == 2 and result.size_after <= before - 3100
    assert sorted(k[:8] for k in cache.keys() if not k.startswith("lock")) == ["offload:", "plan:ddd"]
    assert cache.get("offload:" + "c" * 64) is not None  # the kept folder's entry stays
    # Already within the limit: nothing more goes.
    assert prune(cache, max_size=before - 3100, now=NOW).removed == []


def test_one_folder_within_the_limit_is_all_that_goes(cache):
    old = _offload(cache, "a", 3000, NOW - 3 * DAY)
    newer = _offload(cache, "b", 2000, NOW - 2 * DAY)
    before = cache.volume()
    result = prune(cache, max_size=before - 2900, now=NOW)
    assert [a.path for a in result.removed] == [old] and newer.exists()


def test_older_than_removes_what_was_not_used_for_that_long_whatever_the_size(cache):
    stale = _offload(cache, "a", 10, NOW - 15 * DAY)
    fresh = _offload(cache, "b", 10_000, NOW - 13 * DAY)
    result = prune(cache, older_than=parse_age("14d"), now=NOW)
    assert [a.path for a in result.removed] == [stale] and fresh.exists()
    # Both limits: the age first, then the size.
    result = prune(cache, older_than=parse_age("14d"), max_size=0, now=NOW)
    assert [a.path for a in result.removed] == [fresh]


def test_a_folder_in_use_is_kept_even_above_the_limit(cache):
    first = _offload(cache, "a", 1000, NOW - 3 * DAY)
    used = _offload(cache, "b", 1000, NOW - 2 * DAY)
    last = _offload(cache, "c", 1000, NOW - 1 * DAY)
    with use_lock(cache.root, used):  # what a job holds from choosing the folder to its end
        result = prune(cache, max_size=0, now=NOW)
    assert [a.path for a in result.removed] == [first, last] and [a.path for a in result.in_use] == [used]
    assert used.exists() and cache.get("offload:" + "b" * 64) is not None
    assert prune(cache, max_size=0, now=NOW).removed[0].path == used  # released: it goes


def test_dry_run_removes_nothing_and_names_what_would_go(cache):
    old = _offload(cache, "a", 3000, NOW - 3 * DAY)
    new = _offload(cache, "b", 1000, NOW - 1 * DAY)
    before = cache.volume()
    result = prune(cache, max_size=before - 10, now=NOW, dry_run=True)
    assert [a.path for a in result.removed] == [old] and result.size_after == result.size_before - 3000
    assert old.exists() and new.exists() and cache.get("offload:" + "a" * 64) is not None


def test_a_demo_checkpoint_goes_with_the_temporaries_of_its_killed_builds(cache):
    root = cache.checkpoints_root
    final = _folder(root / "demo-0123abcd", 500, NOW - 2 * DAY)
    temporary = _folder(root / ".demo-0123abcd-k1ll3d", 200, NOW - 3 * DAY)
    orphan = _folder(root / ".demo-99ff-k1ll3d", 100, NOW - 1 * DAY)  # a build killed before any finished
    found = {a.path.name: a for a in artifacts(cache)}
    assert set(found) == {"demo-0123abcd", "demo-99ff"}
    assert found["demo-0123abcd"].size == 700 and found["demo-0123abcd"].last_used == NOW - 2 * DAY
    result = prune(cache, max_size=0, now=NOW)
    assert sorted(a.size for a in result.removed) == [100, 700]
    assert not final.exists() and not temporary.exists() and not orphan.exists()


def test_a_job_choosing_its_folders_holds_pruning_back(cache):
    _offload(cache, "a", 1000, NOW - 3 * DAY)
    # A job between reading the registry and locking its folder holds the gate.
    with gate_lock(cache.root), pytest.raises(CacheError, match=r"stayed busy for 0 s .* nothing was removed"):
        prune(cache, max_size=0, wait=0.2)
    # Prune waits for it when allowed to.
    gate = gate_lock(cache.root)
    gate.__enter__()
    threading.Timer(0.3, gate.release).start()
    started = time.monotonic()
    assert len(prune(cache, max_size=0, wait=30).removed) == 1
    assert time.monotonic() - started >= 0.25


def test_use_locks_of_folders_that_never_came_are_cleaned_up(cache):
    idle = use_lock(cache.root, cache.offload_dir("e" * 64))
    held = use_lock(cache.root, cache.offload_dir("f" * 64))
    idle.__enter__(), idle.release()
    with held:
        prune(cache, older_than=DAY)
        assert not idle.path.exists() and held.path.exists()


def test_limits_are_checked():
    with pytest.raises(CacheError, match="needs a limit"):
        prune(None, now=NOW)  # type: ignore[arg-type]
    assert parse_age("2w") == 14 * DAY and parse_age("45m") == 2700 and parse_age("0") == 0
    for bad in ("-3d", "14 days", "d", True):
        with pytest.raises(CacheError, match="--older-than"):
            parse_age(bad)


def _cache_command(args: list[str], capsys) -> tuple[int, str, str]:
    from bigjob.cli import cache_main

    code = 0
    try:
        cache_main(args)
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_cli_prunes_and_reports(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with JobCache(tmp_path / "cache") as cache:
        old = _offload(cache, "a", 300_000, time.time() - 20 * DAY)
        new = _offload(cache, "b", 100_000, time.time())
    args = ["--dir", str(tmp_path / "cache"), "prune"]
    code, out, _ = _cache_command([*args, "--older-than", "7d", "--dry-run"], capsys)
    assert code == 0 and out.splitlines()[0].startswith("would remove   offload    aaaaaaaaaaaa") and "292.97 KiB" in out
    assert old.exists()
    code, out, _ = _cache_command([*args, "--older-than", "7d"], capsys)
    assert code == 0 and out.startswith("removed ") and "1 folders removed" in out and "1 registry entries removed" in out, out
    assert not old.exists() and new.exists()
    code, _, err = _cache_command(args, capsys)
    assert code == 2 and "prune needs --max-size" in err
    code, _, err = _cache_command([*args, "--max-size", "lots"], capsys)
    assert code == 1 and err.startswith("error: cannot read 'lots' as a size for --max-size")
    assert new.exists()


# --------------------------------------------------------------------------- with real jobs


def test_a_running_job_keeps_its_folders_through_prune_and_computes_what_it_would_have(tmp_path):
    cache_dir = tmp_path / "cache"
    env = {"BIGJOB_CACHE_DIR": str(cache_dir)}
    # Another job's folder: the same model in bfloat16 (its own offload folder), finished.
    other = run_cli(JOB + ["dtype=bfloat16", f"hydra.run.dir={tmp_path / 'other'}"], tmp_path, env)
    assert other.returncode == 0, other.stderr
    (other_folder,) = offload_folders(cache_dir)
    reference = run_cli(JOB + [f"hydra.run.dir={tmp_path / 'reference'}"], tmp_path, {"BIGJOB_CACHE_DIR": str(tmp_path / "c2")})
    assert reference.returncode == 0, reference.stderr

    run_dir = tmp_path / "run"
    release = tmp_path / "release"  # the job stays running until the prune is done
    job = subprocess.Popen([sys.executable, "-c", DRIVER, "hold", *JOB, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                           env=cli_env({**env, "BIGJOB_TEST_RELEASE": str(release)}), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    assert wait_for_batches(run_dir / "progress.json", 2, job, timeout=120), job.communicate()
    pruned = run_entry("cache_main", ["prune", "--max-size", "0"], tmp_path, env)
    release.touch()
    assert pruned.returncode == 0, pruned.stderr
    kept = [line for line in pruned.stdout.splitlines() if line.startswith("kept")]
    assert len(kept) == 2 and all("in use by a running job" in line for line in kept)  # its offload folder and the demo checkpoint
    assert "note: more than --max-size 0 (0 B) is left: 2 folders are in use" in pruned.stdout
    assert not other_folder.exists()
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 0, stderr
    assert (run_dir / "predictions.jsonl").read_bytes() == (tmp_path / "reference" / "predictions.jsonl").read_bytes()
    (folder,) = offload_folders(cache_dir)
    assert str(folder) == metrics(run_dir)["offload_folder"]

    # The job has ended: its folders go now, and the next run builds them again to the same outputs.
    pruned = run_entry("cache_main", ["prune", "--max-size", "0"], tmp_path, env)
    assert pruned.returncode == 0 and "2 folders removed" in pruned.stdout, pruned.stdout
    assert offload_folders(cache_dir) == [] and not list((cache_dir / "checkpoints").iterdir())
    again = run_cli(JOB + [f"hydra.run.dir={tmp_path / 'again'}"], tmp_path, env)
    assert again.returncode == 0, again.stderr
    assert metrics(tmp_path / "again")["offload_cache_hit"] is False
    assert (tmp_path / "again" / "predictions.jsonl").read_bytes() == (tmp_path / "reference" / "predictions.jsonl").read_bytes()


def test_cache_max_size_prunes_other_jobs_folders_at_the_end_of_a_job(tmp_path):
    cache_dir = tmp_path / "cache"

    def job(name: str, *extra: str):
        cfg = compose_config(JOB + [f"cache.dir={cache_dir}", *extra])
        return run_job(cfg, tmp_path / name)

    first = job("bf16", "dtype=bfloat16")
    older = Path(first.offload_folder).parent
    os.utime(older, (time.time() - DAY, time.time() - DAY))
    plain = job("fp16")
    assert plain.offload_cache_hit is False and len(offload_folders(cache_dir)) == 2
    own = Path(plain.offload_folder).parent
    assert own.stat().st_mtime >= plain.started_at  # a folder built is a folder used
    os.utime(own, (time.time() - 2 * DAY, time.time() - 2 * DAY))  # now the least recently used
    rerun = job("fp16-limited", "cache.max_size=1")  # reuses its folder: marked used, then keeps it while pruning
    assert rerun.offload_cache_hit is True and rerun.job_key == plain.job_key  # the limit is not part of the job
    assert own.stat().st_mtime >= rerun.started_at
    assert not older.exists() and own.exists()  # the other job's folder went, its own stayed
    assert (tmp_path / "fp16-limited" / "predictions.jsonl").read_bytes() == (tmp_path / "fp16" / "predictions.jsonl").read_bytes()
    (demo,) = (cache_dir / "checkpoints").iterdir()  # in use by the job too
    assert demo.name.startswith("demo-")


def test_a_bad_cache_max_size_is_a_config_error_before_anything_runs(tmp_path):
    from bigjob.errors import ConfigError

    cfg = compose_config(JOB + [f"cache.dir={tmp_path / 'cache'}", "cache.max_size=big"])
    with pytest.raises(ConfigError, match=r"cannot read 'big' as a size for cache.max_size.*cache.max_size=null"):
        run_job(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()


def test_cache_max_size_makes_room_before_an_offload_folder_is_built(tmp_path, monkeypatch):
    """The limit holds while the folder is written, not only after the job: a nearly full disk never sees the overshoot."""
    from bigjob.engine.tiers import store

    cache_dir = tmp_path / "cache"
    # MBs of weights, so that the database's KiBs are noise; most of them on disk.
    wider = {"model.kwargs.d_model": "256", "model.kwargs.d_ff": "1024", "model.kwargs.n_heads": "4", "placement.max_memory.cpu": "4MiB"}
    job = [o for o in JOB if o.split("=")[0] not in wider] + [f"{k}={v}" for k, v in wider.items()]
    older = Path(run_job(compose_config(job + [f"cache.dir={cache_dir}", "dtype=bfloat16"]), tmp_path / "bf16").offload_folder)
    os.utime(older.parent, (time.time() - DAY, time.time() - DAY))
    folder_bytes = sum(f.stat().st_size for f in older.iterdir())  # a float16 folder of this model takes as much

    def volume() -> int:
        return sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())

    limit = volume() + folder_bytes // 2  # fits now; with a second folder it would not
    seen: list[tuple[int, int]] = []
    build = store._build

    def watched(folder, source, entries, fingerprint, shard_bytes):
        seen.append((volume(), sum(e.dtype.itemsize * math.prod(e.shape) for e in entries)))
        return build(folder, source, entries, fingerprint, shard_bytes)

    monkeypatch.setattr(store, "_build", watched)
    report = run_job(compose_config(job + [f"cache.dir={cache_dir}", f"cache.max_size={limit}"]), tmp_path / "fp16")
    ((at_build, nbytes),) = seen
    assert nbytes > 4 * 2**20 and report.offload_cache_hit is False and not older.parent.exists()
    assert at_build + nbytes <= limit  # room was made before the first byte was written
    assert volume() <= limit
    monkeypatch.setattr(store, "_build", build)
    expected = run_job(compose_config(job + [f"cache.dir={tmp_path / 'other'}"]), tmp_path / "expected")
    assert expected.offload_cache_hit is False
    assert (tmp_path / "fp16" / "predictions.jsonl").read_bytes() == (tmp_path / "expected" / "predictions.jsonl").read_bytes()


def test_clearing_a_cache_whose_database_is_broken_spares_the_folders_in_use(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with JobCache(tmp_path / "cache") as cache:
        used = _offload(cache, "a", 1000, NOW)
        idle = _offload(cache, "b", 1000, NOW)
    (tmp_path / "cache" / "db" / "cache.db").write_bytes(b"not a database" * 100)
    (tmp_path / "cache" / "db" / "cache.db-wal").unlink(missing_ok=True)
    with use_lock(tmp_path / "cache", used) as held:
        code, out, err = _cache_command(["--dir", str(tmp_path / "cache"), "clear"], capsys)
        assert held.path.exists()  # the running job's lock file is not pulled from under it
    assert code == 0, err
    assert out.startswith("the cache database could not be opened") and f"kept offload {used}: in use" in out
    assert used.exists() and not idle.exists() and not (tmp_path / "cache" / "db").exists()
    with JobCache(tmp_path / "cache") as cache:  # usable again
        assert cache.keys() == []
