"""A weight file cut short while a job reads it: one line and exit code 1, not a crash.

Weights on the disk tier (and on the CPU tier where the checkpoint's dtype is the one run)
are views of memory-mapped files. When such a file shrinks under the running model (a
checkpoint rewritten in place, an offload folder's shard truncated) the pages past its new
end are gone, and the next read of one raises ``SIGBUS``, which kills the process with a
core dump. Between forwards the engine sees the change first and raises a
:class:`~bigjob.errors.CheckpointError` (:mod:`bigjob.engine.tiers.sources`); this covers a
file cut short *during* a forward.

A ``SIGBUS`` handler cannot resume: the faulting read would run again and fault again. The
handler :func:`exit_on_sigbus` installs (through ``ctypes``: Python's own ``signal`` handlers
run only later, in the main thread, so they never would) writes one line on stderr naming
the file that shrank, with its sizes, and ends the process at once with exit code 1. The
batches finished before are on disk already (each is written and synced before the next
starts), so running the same command again continues after them; an offload folder of the
cache that was cut short fails its check then and is rebuilt.

It is installed by the job (:func:`bigjob.job.runner.run_job`) around its batches, not by the
engine: a library must not take over a process's signals.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bigjob.errors import CheckpointError

__all__ = ["exit_on_sigbus", "report_sigbus_to", "sigbus_line"]

_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)
_error_file: list[Path] = []  # a job's child process: where its parent reads the error (bigjob.job.child_process)


def report_sigbus_to(path: str | os.PathLike[str]) -> None:
    """In a job's child process: the ``SIGBUS`` line goes to the error file at ``path`` as a
    :class:`~bigjob.errors.CheckpointError`, which the parent raises again (and the command prints once)."""
    _error_file[:] = [Path(path)]


_first = threading.Lock()  # the first thread to get SIGBUS writes the line; any other waits for the exit


def _write(line: str) -> None:
    if not _error_file:
        with contextlib.suppress(OSError):
            os.write(2, (line + "\n").encode("utf-8", "replace"))
        return
    info = {"type": "CheckpointError", "classes": [c.__name__ for c in CheckpointError.__mro__],
            "message": line.removeprefix("error: "), "traceback": ""}
    with contextlib.suppress(OSError):
        _error_file[0].write_text(json.dumps(info), encoding="utf-8")


def sigbus_line(sources: Any, run_dir: str | os.PathLike[str]) -> str:
    """The error line for a ``SIGBUS``: the first of ``sources`` (a :class:`~bigjob.engine.tiers.sources.Sources`)
    whose file is now shorter than when the model was loaded, or a general one when none is.

    >>> from bigjob.engine.tiers.sources import Sources
    >>> sigbus_line(Sources(), "/runs/a").startswith("error: the job was killed by SIGBUS")
    True
    """
    keep = (f"the batches finished so far are kept in {run_dir}: run the same command again to continue "
            "(an offload folder of the cache is then rebuilt; a checkpoint must be whole again first)")
    for path, stamp in sorted(getattr(sources, "stamps", {}).items()):
        try:
            now = os.stat(path)
        except OSError:
            continue
        if now.st_ino == stamp.inode and now.st_size < stamp.size:
            return (f"error: weight file '{path}' was cut short while the job read it (from {stamp.size} to "
                    f"{now.st_size} bytes), so the weights mapped from it are gone; {keep}")
    return ("error: the job was killed by SIGBUS: a memory-mapped file was cut short under it (a checkpoint or "
            f"offload file truncated, or its disk gone); {keep}")


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def exit_on_sigbus(sources: Any, run_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Within the block, a ``SIGBUS`` ends the process with :func:`sigbus_line` on stderr and exit code 1.

    Where there is no ``SIGBUS`` or no C library to install a handler with, nothing changes.
    The handler that was there before (none, or ``faulthandler``'s) is put back after the block.
    """
    libc = _libc() if hasattr(signal, "SIGBUS") else None
    if libc is None:
        yield
        return
    run_dir = Path(run_dir)

    def handler(signum: int) -> None:
        if not _first.acquire(blocking=False):
            # Another thread hit the same cut-short pages and is writing the line: wait for its exit.
            while True:
                time.sleep(60)
        try:
            line = sigbus_line(sources, run_dir)
        except BaseException:  # noqa: BLE001 - whatever happens, the process must end here
            line = "error: the job was killed by SIGBUS (a memory-mapped file was cut short under it)"
        _write(line)
        os._exit(1)

    callback = _HANDLER(handler)  # referenced until the block ends: the C library holds only its address
    previous = libc.signal(signal.SIGBUS, ctypes.cast(callback, ctypes.c_void_p))
    try:
        yield
    finally:
        libc.signal(signal.SIGBUS, previous)
        del callback
