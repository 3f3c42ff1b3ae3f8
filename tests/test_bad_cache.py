"""Bad cache folders and damaged cache databases, through the catalogue of tests/test_bad_inputs.py.

A cache folder that cannot be a cache is refused in one line whose advice fits the cause:
a folder nobody can write (``/proc``) or one whose ``db`` is not bigjob's asks for another
``cache.dir``; only a damaged database asks for ``bigjob-cache clear``, which mends it.
Each case runs as :func:`test_bad_inputs.check_case` runs the catalogue (the exact class, one
line, exit code 1, no traceback, nothing lost).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from _faultkit import JOB, cli_inprocess
from test_bad_inputs import Case, check_case, seeded, workspace  # noqa: F401 - the fixtures are used by name

from bigjob.errors import CacheError
from bigjob.job.cache import JobCache


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
