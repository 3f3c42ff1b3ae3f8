"""Bad cache folders and damaged cache databases, through the catalogue of tests/test_bad_inputs.py.

A cache folder that cannot be a cache is refused in one line whose advice fits the cause:
a folder nobody can write (``/proc``) or one whose ``db`` is not bigjob's asks for another
``cache.dir``; only a damaged database asks for ``bigjob-cache clear``, which mends it.
Each case runs as :func:`test_bad_inputs.check_case` runs the catalogue (the exact class, one
line, exit code 1, no traceback, nothing lost).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import stat
from pathlib import Path

import pytest
from _faultkit import JOB, cache_rows, cli_inprocess, metrics
from _jobkit import run_cli
from test_bad_inputs import Case, check_case, seeded, workspace  # noqa: F401 - the fixtures are used by name

from bigjob.errors import CacheError
from bigjob.job.batch_loop import KILL_AFTER_ENV
from bigjob.job.cache import JobCache
from bigjob.job.sqlite_wal import wal_problem


def db_is_a_file(w: Path) -> None:
    (w / "other").mkdir()
    (w / "other" / "db").write_text("some file of the user's\n")


CACHE_CASES: dict[str, Case] = {
    "cache folder not writable": Case(("cache.dir=/proc",), CacheError, ("/proc", "cache.dir"), subprocess=True),
    "cache folder whose db is not bigjob's": Case(
        ("cache.dir={w}/other",), CacheError, ("other/db", "not a bigjob cache", "choose another cache.dir"), db_is_a_file
    ),
}


@pytest.mark.parametrize("name", list(CACHE_CASES))
def test_bad_cache_folder(workspace, name):  # noqa: F811 - the fixture
    mode = os.stat("/proc").st_mode
    check_case(workspace, CACHE_CASES[name])
    assert os.stat("/proc").st_mode == mode  # never chmod a folder that is not a cache


def test_the_advice_for_a_folder_no_one_can_write_is_another_cache_dir(workspace):  # noqa: F811 - the fixture
    code, _, stderr = cli_inprocess(JOB + ["cache.dir=/proc", f"hydra.run.dir={workspace / 'runs' / 'cli'}"])
    assert code == 1 and "bigjob-cache clear" not in stderr, stderr
    if os.getuid() == 0:  # root passes the owner check; writing is what fails
        assert stderr.startswith("error: cache.dir=/proc is not writable") and "choose another cache.dir" in stderr, stderr


def test_a_folder_holding_other_things_keeps_its_mode(tmp_path):
    folder = tmp_path / "scratch"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's\n")
    os.chmod(folder, 0o755)
    JobCache(folder).close()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755 and (folder / "notes.txt").exists()
    assert stat.S_IMODE((folder / "db").stat().st_mode) == 0o700  # what bigjob puts there is private


# --------------------------------------------------------------------------- a database damaged or retuned under the cache


def job_lines(w: Path, run: str, *extra: str) -> tuple[list[str], str]:
    """The job run by the command in this process: (its warning lines, stderr); it must complete."""
    code, out, err = cli_inprocess(JOB + list(extra) + [f"hydra.run.dir={w / 'runs' / run}"])
    assert code == 0, err
    assert (w / "runs" / run / "predictions.jsonl").read_bytes() == (w / "runs" / "earlier" / "predictions.jsonl").read_bytes()
    warnings = [line for line in (out + err).splitlines() if "[WARNING]" in line and "half_on_cpu" not in line]
    return warnings, err


def settings(w: Path) -> dict:
    with contextlib.closing(sqlite3.connect(w / "cache" / "db" / "cache.db")) as con:
        return dict(con.execute("SELECT key, value FROM Settings").fetchall())


def test_garbage_in_the_write_ahead_log_is_one_warning_and_what_it_held_is_computed_again(workspace):  # noqa: F811
    w = workspace
    killed = run_cli(JOB + [f"cache.dir={w / 'fresh'}", f"hydra.run.dir={w / 'runs' / 'killed'}"], w, {KILL_AFTER_ENV: "2"})
    assert killed.returncode == -signal.SIGKILL
    log = w / "fresh" / "db" / "cache.db-wal"
    assert log.stat().st_size > 0  # the plan and the offload entry are only there: SQLite had not checkpointed them
    assert wal_problem(log) is None  # a log left by a killed job is sound: no warning for that
    log.write_bytes(os.urandom(log.stat().st_size))
    warnings, err = job_lines(w, "again", f"cache.dir={w / 'fresh'}")
    assert err == "" and len(warnings) == 1 and str(log) in warnings[0] and "damaged" in warnings[0], warnings
    assert metrics(w / "runs" / "again")["plan_cache_hit"] is False  # the lost plan, computed again
    assert job_lines(w, "third", f"cache.dir={w / 'fresh'}")[0] == []  # once: the log is sound again


def test_settings_changed_under_the_cache_are_put_back_with_one_warning(workspace):  # noqa: F811
    """Another program opens the database with eviction on and size_limit=10, and stores one row: bigjob's rows go."""
    import diskcache

    w = workspace
    before = set(cache_rows(w / "cache"))
    with diskcache.Cache(str(w / "cache" / "db"), eviction_policy="least-recently-stored", size_limit=10, cull_limit=10) as other:
        other.set("other", b"x" * 100)
    assert not before & set(cache_rows(w / "cache"))  # evicted
    warnings, err = job_lines(w, "again")
    assert err == "" and len(warnings) == 1, warnings
    assert "eviction_policy='least-recently-stored'" in warnings[0] and "size_limit=10" in warnings[0] and "evicted" in warnings[0]
    assert metrics(w / "runs" / "again")["plan_cache_hit"] is False
    pinned = settings(w)
    assert {k: pinned[k] for k in ("eviction_policy", "size_limit", "cull_limit")} == {"eviction_policy": "none", "size_limit": 2**62, "cull_limit": 0}
    assert job_lines(w, "third")[0] == [] and metrics(w / "runs" / "third")["plan_cache_hit"] is True


def test_a_setting_diskcache_does_not_know_is_removed_with_one_warning(workspace):  # noqa: F811
    w = workspace
    with contextlib.closing(sqlite3.connect(w / "cache" / "db" / "cache.db")) as con, con:
        con.execute("INSERT INTO Settings VALUES ('disk_bogus', 1)")  # diskcache would pass it to the disk's constructor
        con.execute("INSERT INTO Settings VALUES ('_directory', '/elsewhere')")  # ... or set it on the cache object
    warnings, err = job_lines(w, "again")
    assert err == "" and len(warnings) == 1 and "'disk_bogus'" in warnings[0] and "'_directory'" in warnings[0], warnings
    assert "disk_bogus" not in settings(w) and "_directory" not in settings(w)
    assert metrics(w / "runs" / "again")["plan_cache_hit"] is True  # nothing was lost


def test_the_pinned_settings_stop_even_another_program_from_culling(workspace):  # noqa: F811
    """Culling is off in the database itself: a program that turns eviction on but leaves culling alone evicts nothing."""
    import diskcache

    w = workspace
    before = set(cache_rows(w / "cache"))
    with diskcache.Cache(str(w / "cache" / "db"), eviction_policy="least-recently-stored", size_limit=10) as other:
        other.set("other", b"x" * 100)
    assert before <= set(cache_rows(w / "cache"))
