"""Stopping a job from outside: Ctrl-C (SIGINT) and SIGTERM (what SLURM sends on preemption, ``kill``'s default).

Both stop the job the same way: the batches finished so far stay in the run folder
(``progress.json``), a failed record is written for sweep summaries, one line says what was
kept, and the exit code is the shell's for the signal (130 for SIGINT, 143 for SIGTERM).
Python turns SIGINT into :class:`KeyboardInterrupt`; :func:`sigterm_stops` makes SIGTERM
raise :class:`Terminated`, a ``KeyboardInterrupt``, so every ``except KeyboardInterrupt``
and ``except BaseException`` cleanup path (child processes taken down, locks released)
serves both.

>>> with sigterm_stops():
...     try:
...         os.kill(os.getpid(), signal.SIGTERM)
...         time.sleep(5)
...     except Terminated as err:
...         print(type(err).__mro__[1].__name__, exit_code(err))
KeyboardInterrupt 143
>>> signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
True
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

__all__ = ["Terminated", "exit_code", "interrupted_line", "sigterm_stops"]


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM; it stops like Ctrl-C."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated("terminated (SIGTERM)")


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread; the previous handler comes back after.

    Outside the main thread (where Python cannot set handlers) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)  # None: set outside Python


def exit_code(err: KeyboardInterrupt) -> int:
    """The shell's exit code for the signal behind ``err``: 128 + its number.

    >>> exit_code(KeyboardInterrupt()), exit_code(Terminated())
    (130, 143)
    """
    return 128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)


def interrupted_line(run_dir: Path, err: KeyboardInterrupt, progress_name: str = "progress.json") -> tuple[str, str]:
    """``(line for the user, error for the record)`` of a job stopped by ``err`` in ``run_dir``.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "progress.json").write_text('{"batches_done": 3}')
    >>> line, error = interrupted_line(folder, Terminated())
    >>> line.startswith("terminated (SIGTERM): 3 finished batch(es) are kept in "), error
    (True, 'terminated (SIGTERM) after 3 batch(es)')
    """
    try:
        done = int(json.loads((run_dir / progress_name).read_text(encoding="utf-8"))["batches_done"])
    except (OSError, ValueError, KeyError, TypeError):
        done = 0
    what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
    kept = f"{done} finished batch(es) are kept in {run_dir}" if done else f"no batch had finished; the record is in {run_dir}"
    error = f"{what if isinstance(err, Terminated) else 'interrupted (Ctrl-C)'} after {done} batch(es)"
    return f"{what}: {kept}; run the same command again to continue", error
