"""The JSON-only job cache: storage format, permissions, compute-once across processes, verify."""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
import subprocess
import sys
import zlib

import pytest

from _jobkit import REPO
from bigjob.errors import CacheError
from bigjob.job.cache import JobCache
from bigjob.job.cache_folder import default_cache_dir

KEY = "plan:" + "ab" * 32
PLAN = {"kind": "plan", "device_map": {"": "cpu"}, "inputs": {"strategy": "auto"}}


def _db_rows(root):
    with sqlite3.connect(root / "db" / "cache.db") as con:
        return con.execute("SELECT key, raw, mode, filename, value FROM Cache").fetchall()


class Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_values_are_stored_as_json_text_inside_sqlite(tmp_path):
    with JobCache(tmp_path / "c") as cache:
        cache.set(KEY, PLAN)
        assert cache.get(KEY) == PLAN
    (row,) = _db_rows(tmp_path / "c")
    key, raw, mode, filename, value = row
    assert filename is None  # no value files next to the database
    assert json.loads(zlib.decompress(key)) == KEY
    assert json.loads(zlib.decompress(value)) == PLAN
    assert not bytes(value).startswith(b"\x80")  # not a pickle


def test_non_json_values_and_bad_keys_are_refused(tmp_path):
    with JobCache(tmp_path / "c") as cache:
        with pytest.raises(CacheError, match="not JSON"):
            cache.set(KEY, {**PLAN, "obj": object()})
        with pytest.raises(CacheError, match="sha256"):
            cache.set("plan:short", PLAN)
        with pytest.raises(CacheError, match="malformed"):
            cache.set(KEY, {"kind": "plan"})
        assert cache.keys() == []


def test_a_planted_pickle_is_never_unpickled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with JobCache(tmp_path / "c") as cache:
        cache.set(KEY, PLAN)
    with sqlite3.connect(tmp_path / "c" / "db" / "cache.db") as con:  # an attacker rewrites the row
        con.execute("UPDATE Cache SET mode = 4, value = ?", (pickle.dumps(Boom()),))
        con.execute(
            "INSERT INTO Cache (key, raw, store_time, expire_time, access_time, access_count, tag, size, mode, filename, value)"
            " VALUES (?, 0, 0, NULL, 0, 0, NULL, 0, 1, NULL, ?)",
            (pickle.dumps(Boom()), b"x"),
        )
    with JobCache(tmp_path / "c") as cache:
        assert cache.get(KEY) is None  # refused and dropped
        assert cache.keys() == []
        dropped = cache.verify()
    assert any("pickled" in reason for _, reason in dropped)
    assert not (tmp_path / "PWNED").exists()


def test_folder_is_private_and_foreign_folders_are_refused(tmp_path):
    JobCache(tmp_path / "new").close()
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    JobCache(loose).close()
    assert loose.stat().st_mode & 0o777 == 0o700  # tightened
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(CacheError, match="writable by others"):
        JobCache(shared)
    (tmp_path / "file").write_text("")
    with pytest.raises(CacheError, match="cache"):
        JobCache(tmp_path / "file")


def test_default_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BIGJOB_CACHE_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("BIGJOB_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "bigjob"


def test_compute_once_reports_hits(tmp_path):
    calls = []
    with JobCache(tmp_path / "c") as cache:
        value, hit = cache.compute_once(KEY, lambda: calls.append(1) or dict(PLAN))
        assert not hit and value["device_map"] == {"": "cpu"} and "created" in value
        again, hit = cache.compute_once(KEY, lambda: calls.append(1) or dict(PLAN))
        assert hit and again == value and calls == [1]


WORKER = """
import json, sys, time
from bigjob.job.cache import JobCache
root, counter = sys.argv[1], sys.argv[2]
def compute():
    with open(counter, "a") as f:
        f.write("x")
    time.sleep(1.0)
    return {"kind": "plan", "device_map": {"": "cpu"}}
with JobCache(root) as cache:
    value, hit = cache.compute_once("plan:" + "cd" * 32, compute)
print(json.dumps(hit))
"""


def test_two_processes_compute_once(tmp_path):
    counter = tmp_path / "calls"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "c"), str(counter)], stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    hits = sorted(json.loads(p.communicate(timeout=60)[0]) for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert counter.read_text() == "x" and hits == [False, True]


def test_verify_drops_corrupt_and_dangling_entries(tmp_path):
    with JobCache(tmp_path / "c") as cache:
        cache.set(KEY, PLAN)
        good_dir = tmp_path / "off"
        good_dir.mkdir()
        cache.set("offload:" + "01" * 32, {"kind": "offload", "path": str(good_dir)})
        cache.set("offload:" + "02" * 32, {"kind": "offload", "path": str(tmp_path / "gone")})
        cache.set("run:" + "03" * 32, {"kind": "run", "run_dir": "/somewhere"})
    with sqlite3.connect(tmp_path / "c" / "db" / "cache.db") as con:
        rows = con.execute("SELECT rowid, key FROM Cache").fetchall()
        target = next(r for r, k in rows if json.loads(zlib.decompress(k)) == "run:" + "03" * 32)
        con.execute("UPDATE Cache SET value = ? WHERE rowid = ?", (b"not zlib", target))
    with JobCache(tmp_path / "c") as cache:
        dropped = dict(cache.verify())
        assert set(dropped) == {"offload:" + "02" * 32, "run:" + "03" * 32}
        assert cache.keys() == sorted([KEY, "offload:" + "01" * 32])
        assert cache.verify() == []


def test_clear_removes_entries_and_artifacts_except_those_in_use(tmp_path):
    from bigjob.job.cache_locks import use_lock
    from bigjob.job.prune import clear

    with JobCache(tmp_path / "c") as cache:
        cache.set(KEY, PLAN)
        cache.offload_dir("f" * 64).mkdir(parents=True)
        used = cache.offload_dir("e" * 64)
        used.mkdir()
        (cache.checkpoints_root / "demo-00").mkdir(parents=True)
        with use_lock(cache.root, used):  # a running job's folder
            count, kept = clear(cache)
        assert count == 1 and [a.path for a in kept] == [used]
        assert cache.keys() == [] and [p.name for p in cache.offload_root.iterdir()] == ["e" * 64]
        assert not cache.checkpoints_root.exists()
        assert clear(cache) == (0, []) and not cache.offload_root.exists()
