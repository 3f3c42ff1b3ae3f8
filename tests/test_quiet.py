"""What ``quiet`` promises (docs/jobs.md): no progress bar, even on a terminal; the log lines stay.

A warning such as a damaged offload folder being rebuilt is shown once with ``quiet=true``
(it says the cache was damaged: hiding it would hide that); ``hydra.job_logging.root.level=WARNING``
hides the INFO lines and keeps it. A rerun of a completed job says so in one line.
"""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from _faultkit import JOB, offload_folders
from _jobkit import cli_env, run_cli


def on_a_terminal(args: list[str], cwd: Path, cache: Path) -> tuple[str, str]:
    """``python -m bigjob args`` with stderr on a pseudo-terminal (tqdm draws its bar there): (stdout, terminal)."""
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a new terminal is 0 columns wide: no bar fits
    process = subprocess.Popen([sys.executable, "-m", "bigjob", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=secondary,
                               env=cli_env({"BIGJOB_CACHE_DIR": str(cache)}), text=True)
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:  # the terminal closed: the process has ended
            break
        if not data:
            break
        chunks.append(data)
    stdout = process.communicate(timeout=300)[0]
    os.close(primary)
    assert process.returncode == 0, b"".join(chunks).decode(errors="replace")
    return stdout, b"".join(chunks).decode(errors="replace")


@pytest.fixture
def damaged(tmp_path) -> Path:
    """A cache whose offload folder lost its marker: the next job rebuilds it with a warning."""
    done = run_cli(JOB + [f"hydra.run.dir={tmp_path / 'first'}"], tmp_path, {"BIGJOB_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    (offload_folders(tmp_path / "cache")[0] / "bigjob-offload.json").unlink()
    return tmp_path


def rebuilds(text: str) -> list[str]:
    return [line for line in text.splitlines() if "[WARNING]" in line and "rebuilding it from the checkpoint" in line]


@pytest.mark.parametrize("quiet", ["true", "false"])
def test_quiet_hides_the_progress_bar_and_keeps_the_one_rebuild_warning(damaged, quiet):  # type: ignore[no-untyped-def]
    args = [a for a in JOB if not a.startswith("quiet=")] + [f"quiet={quiet}", f"hydra.run.dir={damaged / 'run'}"]
    stdout, terminal = on_a_terminal(args, damaged, damaged / "cache")
    assert len(rebuilds(stdout + terminal)) == 1, stdout
    bar = "batch/s" in terminal or "s/batch" in terminal
    assert bar is (quiet == "false"), terminal


def test_the_log_level_hides_the_info_lines_and_keeps_the_warning(damaged):  # type: ignore[no-untyped-def]
    out = run_cli(JOB + ["hydra.job_logging.root.level=WARNING", f"hydra.run.dir={damaged / 'run'}"], damaged,
                  {"BIGJOB_CACHE_DIR": str(damaged / "cache")})
    assert out.returncode == 0, out.stderr
    assert len(rebuilds(out.stdout)) == 1 and "[INFO]" not in out.stdout, out.stdout


@pytest.mark.parametrize("isolate", ["false", "true"])
def test_a_rerun_of_a_completed_job_says_so_once(tmp_path, isolate):  # type: ignore[no-untyped-def]
    job = JOB + [f"runner.isolate={isolate}", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {"BIGJOB_CACHE_DIR": str(tmp_path / "cache")}
    assert run_cli(job, tmp_path, env).returncode == 0
    again = run_cli(job, tmp_path, env)
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert sum("already holds this completed job" in line for line in again.stdout.splitlines()) == 1, again.stdout
    log = (tmp_path / "run" / "bigjob.log").read_text()
    assert sum("already holds this completed job" in line for line in log.splitlines()) == 1, log
