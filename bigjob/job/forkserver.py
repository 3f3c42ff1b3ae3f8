"""Warm start for isolated jobs (``runner.warm_start``): import a sweep's libraries once, fork each job.

An isolated job (:mod:`bigjob.job.isolation`) starts a fresh Python and imports torch, bigjob
and the model's library before its first batch: 2-3 s on 2 cores for the demo model, 3-5 s
for a Transformers model, in every job of a sweep. With ``runner.warm_start=true`` the
parent starts one server process per sweep instead. It imports those libraries once (and
nothing else: no job runs in it, no thread is started, no accelerator is touched), then
forks a child for each job. A child is a new process with a memory of its own, as
isolation wants; what it shares with its siblings is the imported code.

The child gets the parent's environment and import path of the moment, and reports through
the same files as a child started from scratch; the server passes back its pid and exit
code. The server exits when its parent does (its stdin closes), and takes a running child
down with it, so a killed launcher worker leaves no orphan.

>>> preload_modules("bigjob.models.demo.DemoTransformer")
['torch', 'bigjob.job.runner', 'bigjob.models.demo']
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path
from collections.abc import Callable
from typing import IO, Any

from bigjob.errors import JobError

__all__ = ["ForkServer", "preload_modules", "serve", "shared_server"]

_BOOT = (
    "import json, sys; a = json.loads(sys.argv[1]); "
    "sys.path[:0] = [p for p in a['sys_path'] if p not in sys.path]; "
    "from bigjob.job.forkserver import serve; serve(a['preload'], a['reply_fd'])"
)
WAIT_POLL_S = 0.2  # how often the server looks at its child and at its parent's pipe


def preload_modules(target: str, model_path: str | None = None) -> list[str]:
    """The modules a job with model ``target`` imports before its first batch (best effort)."""
    modules = ["torch", "bigjob.job.runner"]
    module = target.rpartition(".")[0]
    if module:
        modules.append(module)
    if model_path:  # a Transformers folder: its modeling module is most of the import time
        try:
            model_type = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None
        if isinstance(model_type, str) and model_type.replace("_", "").replace("-", "").isalnum():
            name = model_type.replace("-", "_")
            modules += ["transformers", f"transformers.models.{name}.modeling_{name}"]
    return modules


# --------------------------------------------------------------------------- server side


class Lines:
    """Lines from a file descriptor, read without Python's buffering (so ``select`` tells the truth)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending = b""

    def ready(self, timeout: float) -> bool:
        return b"\n" in self.pending or bool(select.select([self.fd], [], [], timeout)[0])

    def read(self) -> str | None:
        """The next line; None at end of file."""
        while b"\n" not in self.pending:
            chunk = os.read(self.fd, 4096)
            if not chunk:
                return None
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return line.decode()


def import_all(modules: list[str], who: str) -> None:
    """Import ``modules``, saying on stderr which could not be (a job imports what it needs anyway)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - a speed-up only
            print(f"{who}: could not preload {name}: {err}", file=sys.stderr)


def serve(preload: list[str], reply_fd: int) -> None:
    """The server's loop: preload, say whether forking is safe, then fork one child per spec path read."""
    import_all(preload, "bigjob warm start")
    reply = os.fdopen(reply_fd, "w", buffering=1)
    # fork() copies only the calling thread: with another thread alive (holding who knows
    # which lock) a child could hang, so such a server refuses and the parent starts fresh ones.
    safe = threading.active_count() == 1
    reply.write(json.dumps({"ready": safe}) + "\n")
    if not safe:
        return
    requests = Lines(sys.stdin.fileno())
    while (line := requests.read()) is not None:
        if not line.strip() or line == "stop":
            continue
        pid = os.fork()
        if pid == 0:
            _child(line, reply)
        reply.write(json.dumps({"pid": pid}) + "\n")
        code = wait_job(pid, requests)
        if code is None:
            return  # the parent is gone; so is the child now
        reply.write(json.dumps({"pid": pid, "code": code}) + "\n")


def _child(spec_path: str, reply: IO[str]) -> None:
    """In the forked child: become an isolated job process; never returns."""
    become_job(spec_path, lambda: os.close(reply.fileno()))


def become_job(spec_path: str, setup: Callable[[], None]) -> None:
    """In a freshly forked process: run ``setup`` (the caller's streams, folder ...), then the isolated
    job of the spec at ``spec_path`` (:func:`bigjob.job.child_process.child_main`), and exit with its code."""
    code = 1
    try:
        setup()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
        os.environ.clear()
        os.environ.update(spec.get("env") or {})
        sys.path[:0] = [p for p in spec.get("sys_path", []) if p not in sys.path]
        spec["parent_pid"] = os.getppid()  # the process that forked this one: it goes when the launcher does
        from bigjob.job.child_process import child_main

        code = child_main(spec)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110 - exiting anyway
                pass
        os._exit(code)


def wait_job(pid: int, requests: Lines) -> int | None:
    """The child's exit code (negative: killed by that signal); None if the parent went away meanwhile."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if requests.ready(WAIT_POLL_S):
            line = requests.read()
            if line is None:  # the parent died: take the job down and leave
                _end(pid)
                return None
            if line == "stop":  # the parent was interrupted
                os.kill(pid, signal.SIGTERM)


def _end(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


# --------------------------------------------------------------------------- parent side


class ForkServer:
    """The parent's handle on a server process (see the module docstring)."""

    def __init__(self, preload: list[str]) -> None:
        read_fd, write_fd = os.pipe()
        args = {"preload": preload, "reply_fd": write_fd, "sys_path": [p for p in sys.path if isinstance(p, str)]}
        try:
            self.process = subprocess.Popen([sys.executable, "-c", _BOOT, json.dumps(args)], stdin=subprocess.PIPE, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        self._replies = os.fdopen(read_fd, "r")
        self.preload = preload
        self.ready = bool(self._read().get("ready"))

    def _read(self) -> dict[str, Any]:
        line = self._replies.readline()
        if not line:
            code = self.process.wait()
            raise JobError(f"the warm-start process (pid {self.process.pid}) ended with code {code}; set runner.warm_start=false")
        return json.loads(line)

    def _send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((line + "\n").encode())
        self.process.stdin.flush()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def start(self, spec_path: Path) -> int:
        """Fork a job process that runs the spec at ``spec_path``; returns its pid."""
        self._send(str(spec_path))
        return int(self._read()["pid"])

    def wait(self) -> int:
        """The exit code of the job process started last (negative: the signal that killed it)."""
        return int(self._read()["code"])

    def interrupt(self) -> None:
        """Ask the running job process to stop (SIGTERM), as a parent interrupted by the user would."""
        try:
            self._send("stop")
        except (BrokenPipeError, ValueError):
            pass

    def close(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._replies.close()


_server: ForkServer | None = None
_lock = threading.Lock()


def shared_server(preload: list[str]) -> ForkServer | None:
    """This process's server (started on first use, again if it died); None where forking is not safe."""
    global _server
    if not hasattr(os, "fork"):
        return None
    with _lock:
        if _server is None or not _server.alive:
            _server = ForkServer(preload)
            atexit.register(_server.close)
        return _server if _server.ready else None
