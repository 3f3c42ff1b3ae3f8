"""Shared helpers of the reliability tests (bad inputs, crashes, concurrency, security, soak).

* :data:`JOB` - a tiny demo job whose disk tier needs a float16 conversion, so every run
  plans, builds (or reuses) an offload folder in the cache, loads and runs 8 batches.
* :func:`cli_inprocess` - the ``bigjob`` command run in this process (Hydra, the callback,
  ``to_job_config``, the runner, the error handling), for speed; the real subprocess is
  :func:`_jobkit.run_cli`.
* :func:`cache_rows`, :func:`file_digests`, :func:`leftovers`, :func:`offload_folders` -
  the state that must not be lost or poisoned, read without going through bigjob.
* :data:`DRIVER` - ``python -c DRIVER <phase> <bigjob args>``: the ``bigjob`` command with
  one engine function wrapped to SIGKILL (or slow down) the process at a chosen moment.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import sqlite3
import sys
from pathlib import Path

from _jobkit import TINY_OVERRIDES

JOB = TINY_OVERRIDES + [
    "dtype=float16",
    "placement.max_memory.cpu=12KiB",  # about 80% of the float16 weights on disk, converted once
    "data.num_samples=16",
    "data.seq_len=10",
    "data.batch_size=2",
    "quiet=true",
]


def cli_inprocess(args: list[str]) -> tuple[int, str, str]:
    """``bigjob args`` in this process: ``(exit code, stdout, stderr)``.

    Set the cache folder, the working folder and HYDRA_FULL_ERROR with monkeypatch first.
    Hydra's logging set-up is undone afterwards (its file handlers closed).
    """
    from bigjob import cli

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["bigjob", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    return code, out.getvalue(), err.getvalue()


def cache_rows(cache_dir: Path) -> dict[str, tuple]:
    """Every row of the cache database by decoded key, read-only (values compared as stored bytes)."""
    import zlib

    database = Path(cache_dir) / "db" / "cache.db"
    if not database.exists():
        return {}
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as con:
        rows = con.execute("SELECT key, raw, mode, filename, value, store_time FROM Cache").fetchall()
    decoded = {}
    for key, raw, mode, filename, value, store_time in rows:
        try:
            name = json.loads(zlib.decompress(key)) if isinstance(key, bytes) else key
        except (zlib.error, ValueError):
            name = repr(key)
        decoded[str(name)] = (raw, mode, filename, bytes(value) if value is not None else None, store_time)
    return decoded


def file_digests(root: Path, skip: tuple[str, ...] = ("db", "locks")) -> dict[str, str]:
    """sha256 of every regular file under ``root`` by relative path, except under top-level ``skip`` folders.

    The database is compared row by row (:func:`cache_rows`): SQLite rewrites its pages when
    merely opened. Lock files hold only the last holder's pid.
    """
    root = Path(root)
    out = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if relative.parts[0] in skip or not path.is_file() or path.is_symlink():
            continue
        out[relative.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def leftovers(root: Path) -> list[str]:
    """Temporary files and folders (atomic writes, offload builds) anywhere under ``root``."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in Path(root).rglob("*")
        if p.name.endswith(".tmp") or p.name.startswith((".tmp-", ".tmp_"))
    )


def offload_folders(cache_dir: Path) -> list[Path]:
    """Completed-looking offload folders (``offload-*``, not temporaries) in a cache."""
    return sorted(p for p in (Path(cache_dir) / "offload").glob("*/offload-*") if p.is_dir())


def marker_holds(folder: Path) -> bool:
    """Whether an offload folder's marker exists and every file it lists has the size it says."""
    try:
        marker = json.loads((folder / "bigjob-offload.json").read_text())
        return bool(marker["files"]) and all((folder / n).stat().st_size == s for n, s in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


# The bigjob command with a fault at one moment. argv: <phase> <bigjob args...>
#   plan     SIGKILL right after the device map is computed (the plan lock held, nothing stored yet)
#   offload  SIGKILL after the first tensor of the offload folder is written (a partial shard on disk)
#   load     SIGKILL while tensors are being put into the model (the offload folder done, not registered)
#   slow     sleep 0.25 s after each batch (time to send a real SIGINT from outside)
#   hold     after the second batch, wait until the file named by $BIGJOB_TEST_RELEASE exists
#            (a job held running for as long as a test needs, however loaded the machine)
DRIVER = r"""
import os, signal, sys, time
phase = sys.argv.pop(1)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if phase == "plan":
    from bigjob.engine.plan import resolution
    original = resolution.infer_auto_device_map
    def planned(*args, **kwargs):
        original(*args, **kwargs)
        die()
    resolution.infer_auto_device_map = planned
elif phase == "offload":
    from bigjob.engine.checkpoints.safetensors_writer import SafetensorsWriter
    original = SafetensorsWriter.write
    def write(self, name, tensor):
        original(self, name, tensor)
        die()
    SafetensorsWriter.write = write
elif phase == "load":
    from bigjob.engine.run import loading
    original = loading.set_tensor  # (defined in run.module_tensors; the loader looks it up here, under its own name)
    calls = []
    def set_tensor(*args):
        calls.append(1)
        if len(calls) == 5:
            die()
        return original(*args)
    loading.set_tensor = set_tensor
elif phase == "slow":
    from bigjob.job.progress import ResultWriter
    original = ResultWriter.append
    def append(self, *args, **kwargs):
        original(self, *args, **kwargs)
        time.sleep(0.25)
    ResultWriter.append = append
elif phase == "hold":
    from bigjob.job.progress import ResultWriter
    original = ResultWriter.append
    batches = []
    def append(self, *args, **kwargs):
        original(self, *args, **kwargs)
        batches.append(1)
        deadline = time.monotonic() + 300
        while len(batches) == 2 and not os.path.exists(os.environ["BIGJOB_TEST_RELEASE"]) and time.monotonic() < deadline:
            time.sleep(0.05)
    ResultWriter.append = append
else:
    raise SystemExit(f"unknown phase {phase!r}")

sys.argv[0] = "bigjob"
from bigjob.cli import main
main()
"""
