"""A warm-start process that outlives the command (``runner.daemon``): the second run skips the imports.

A job in a fresh process imports torch, bigjob and the model's library before its first
batch: 2-5 s, most of a cached rerun's time to first batch. :mod:`bigjob.job.forkserver`
pays that once per sweep; this module pays it once per *environment*: the first command with
``runner.daemon=true`` starts a server that imports those libraries and then waits on a Unix
socket; each later command connects and the server forks the job from its warm state. The
command that connected stays the job's parent in every way that matters:

* the job writes to the command's own stdin/stdout/stderr (passed over the socket);
* it runs in the command's working directory, with its environment and umask;
* Ctrl-C in the command stops the job (SIGTERM); a command that dies takes its job down;
* the exit code and the report come back as for any isolated job (:mod:`bigjob.job.isolation`).

What must not leak from the server into a job is kept out by the socket's *key* (a hash of
the interpreter, import path, the modules preloaded, the environment, CPU affinity, cgroup
and resource limits: another value, another server) and by a staleness check before every
fork: if any file of a module the server imported changed since (an upgrade, an edited
model file, an editable install), the server refuses, exits, and the command starts a new one.
The server never initialises an accelerator and holds no thread when it forks. It exits
after ``runner.daemon_idle_s`` seconds without a connection.

Sockets live in ``$XDG_RUNTIME_DIR/bigjob-<uid>`` (else the temporary folder), a folder
only the user can enter; its ``<key>.log`` holds the server's own messages.

>>> len(daemon_key(["torch"])) == 64 and daemon_key(["torch"]) != daemon_key(["torch", "transformers"])
True
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import resource
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bigjob.errors import JobError
from bigjob.job.forkserver import Lines, become_job, import_all, wait_job

__all__ = ["DaemonClient", "daemon_key", "daemon_usable", "list_daemons", "socket_dir", "stop_daemons"]

# Variables a shell changes between commands without changing what a process computes.
_NOISE = frozenset({"PWD", "OLDPWD", "SHLVL", "_", "COLUMNS", "LINES"})
_BOOT = (
    "import json, sys; a = json.loads(sys.argv[1]); "
    "sys.path[:0] = [p for p in a['sys_path'] if p not in sys.path]; "
    "from bigjob.job.daemon import serve; serve(a['preload'], a['socket'], a['reply_fd'], a['idle_s'])"
)
START_TIMEOUT_S = 300.0  # a server that has not said it is ready by then is given up on


def daemon_usable() -> bool:
    """Whether this platform has what the daemon needs (``fork``, Unix sockets that carry descriptors)."""
    return hasattr(os, "fork") and hasattr(socket, "AF_UNIX") and hasattr(socket, "send_fds")


def daemon_key(preload: list[str]) -> str:
    """What a server must share with the command for a job forked from it to be the job the command would run."""
    env = {k: v for k, v in os.environ.items() if k not in _NOISE}
    try:
        cgroup = Path("/proc/self/cgroup").read_text(encoding="utf-8")
    except OSError:
        cgroup = ""
    limits = {name: resource.getrlimit(getattr(resource, name)) for name in ("RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_NOFILE", "RLIMIT_STACK")
              if hasattr(resource, name)}
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    facts = {
        "executable": sys.executable,
        "version": sys.version,
        "sys_path": [p for p in sys.path if isinstance(p, str)],
        "preload": preload,
        "env": sorted(env.items()),
        "uid": os.getuid(),
        "affinity": affinity,
        "cgroup": cgroup,
        "limits": limits,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def socket_dir() -> Path:
    """The user's private folder of daemon sockets (made on first use; refused if others can enter it)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    if len(base) > 60:  # a socket's path must fit in ~100 bytes: the folder, 24 hex digits and ".sock"
        base = "/tmp"
    folder = Path(base) / f"bigjob-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise JobError(
            f"runner.daemon: {folder} must be a folder owned by you that only you can enter "
            f"(mode {stat.filemode(info.st_mode)}); remove it, or set runner.daemon=false"
        )
    return folder


def list_daemons(folder: Path | None = None) -> list[dict[str, Any]]:
    """The running daemons of this user: ``pid``, ``started`` (epoch seconds), ``idle_s``, ``preload``, ``socket``.

    >>> list_daemons(Path(tempfile.mkdtemp()))
    []
    """
    folder = folder or socket_dir()
    found = []
    for pid_file in sorted(folder.glob("*.pid")):
        try:
            info = json.loads(pid_file.read_text())
            os.kill(int(info["pid"]), 0)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # gone (or being written): nothing to list
        found.append({**info, "socket": str(pid_file.with_suffix(".sock"))})
    return found


def stop_daemons(folder: Path | None = None) -> list[int]:
    """Stop every daemon of this user (SIGTERM); returns their pids. Jobs they forked run on to their end."""
    folder = folder or socket_dir()
    stopped = []
    for info in list_daemons(folder):
        with contextlib.suppress(OSError):
            os.kill(int(info["pid"]), signal.SIGTERM)
            stopped.append(int(info["pid"]))
        Path(info["socket"]).with_suffix(".pid").unlink(missing_ok=True)
        Path(info["socket"]).unlink(missing_ok=True)
    return stopped


# --------------------------------------------------------------------------- server side


def _module_files() -> dict[str, int]:
    """The modification time of every source file of the modules imported so far."""
    files: dict[str, int] = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and path not in files:
            with contextlib.suppress(OSError):
                files[path] = os.stat(path).st_mtime_ns
    return files


def _changed(files: dict[str, int]) -> str | None:
    for path, mtime in files.items():
        try:
            if os.stat(path).st_mtime_ns != mtime:
                return path
        except OSError:
            return path
    return None


def serve(preload: list[str], path: str, reply_fd: int, idle_s: float) -> None:
    """The server: preload, listen on ``path``, fork a job per connection until idle or stale."""
    if os.fork() > 0:  # the command reaps this process at once; the server, its child, goes on under init
        os._exit(0)
    import_all(preload, "bigjob daemon")
    reply = os.fdopen(reply_fd, "w", buffering=1)
    if threading.active_count() != 1:  # fork() copies one thread: another one's locks could hang a job
        reply.write(json.dumps({"ready": False, "why": f"{threading.active_count()} threads after the imports"}) + "\n")
        return
    files = _module_files()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    inode = os.stat(path).st_ino
    pid_file = Path(path).with_suffix(".pid")
    pid_file.write_text(json.dumps({"pid": os.getpid(), "started": time.time(), "idle_s": idle_s, "preload": preload}))
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped by the kernel
    reply.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    reply.close()
    try:
        while select.select([listener], [], [], idle_s)[0]:
            conn, _ = listener.accept()
            fds: list[int] = []
            try:
                message, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
                if _peer_uid(conn) not in (None, os.getuid()):  # the folder's mode keeps others out; this too
                    continue
                request = json.loads(message.decode())
                stale = _changed(files)
                if stale is not None:
                    print(f"bigjob daemon {os.getpid()}: {stale} changed since it was imported; exiting", file=sys.stderr)
                    _retire(listener, path, inode, pid_file)  # first, or the command's retry could reach this server again
                    conn.sendall(json.dumps({"stale": stale}).encode() + b"\n")
                    return
                if os.fork() == 0:
                    listener.close()
                    _handle(conn, request, fds)  # never returns
            except Exception as err:  # noqa: BLE001 - one bad connection must not end the server
                print(f"bigjob daemon {os.getpid()}: request failed: {err!r}", file=sys.stderr)
            finally:
                conn.close()
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
    finally:
        _retire(listener, path, inode, pid_file)


def _peer_uid(conn: socket.socket) -> int | None:
    """The user id of the process at the other end of ``conn`` (Linux), or None where unknown."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    return uid


def _retire(listener: socket.socket, path: str, inode: int, pid_file: Path) -> None:
    """Stop listening and remove the socket's name (if it is still ours: a newer server may have taken it)."""
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == inode:
            os.unlink(path)
            pid_file.unlink(missing_ok=True)
    listener.close()


def _handle(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
    """A connection's handler (a fork of the server): fork the job, relay its pid and exit code; never returns."""
    code = 0
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # this process waits for its job itself
        pid = os.fork()
        if pid == 0:
            conn.close()
            _job(request, fds)  # never returns
        for fd in fds:
            os.close(fd)
        conn.sendall(json.dumps({"pid": pid, "server": os.getppid()}).encode() + b"\n")
        result = wait_job(pid, Lines(conn.fileno()))  # the command sends "stop" when interrupted
        if result is not None:
            conn.sendall(json.dumps({"pid": pid, "code": result}).encode() + b"\n")
    except BaseException:  # noqa: BLE001 - nothing to report to; the command sees the socket close
        code = 1
    finally:
        os._exit(code)


def _job(request: dict[str, Any], fds: list[int]) -> None:
    """The job process: the command's streams, folder and umask, then the isolated job (its environment
    comes with the spec). Never returns."""

    def setup() -> None:
        for target, fd in zip((1, 2), fds[1:3]):
            os.dup2(fd, target)
        for fd in fds:
            os.close(fd)
        os.setsid()  # not the server's session: a signal to the server's group does not reach jobs
        os.chdir(request["cwd"])
        os.umask(int(request["umask"]))
        with contextlib.suppress(AttributeError, ValueError):
            sys.stdout.reconfigure(line_buffering=os.isatty(1))  # buffered as the command's own stdout would be

    become_job(request["spec"], setup)


# --------------------------------------------------------------------------- command side


class DaemonClient:
    """One job's connection to the daemon of this environment (started when there is none).

    The same calls as :class:`bigjob.job.forkserver.ForkServer`: :meth:`start`, :meth:`wait`,
    :meth:`interrupt`, :meth:`close`.
    """

    def __init__(self, preload: list[str], idle_s: float) -> None:
        self.preload, self.idle_s = preload, idle_s
        key = daemon_key(preload)[:24]
        folder = socket_dir()
        self.path = folder / f"{key}.sock"
        self._lock = folder / f"{key}.lock"
        self._log = folder / f"{key}.log"
        self.pid: int | None = None  # of the server
        self._conn: socket.socket | None = None
        self._replies = b""

    def _connect(self) -> socket.socket | None:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(self.path))
        except OSError:
            conn.close()
            return None
        return conn

    def _server(self) -> socket.socket:
        """A connection to a live server, starting one if needed (one at a time per key: a file lock)."""
        conn = self._connect()
        if conn is not None:
            return conn
        with open(self._lock, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            conn = self._connect()  # another command started one meanwhile
            if conn is not None:
                return conn
            self.path.unlink(missing_ok=True)  # a dead server's socket
            self._start_server()
            conn = self._connect()
        if conn is None:
            raise JobError(f"runner.daemon: the warm-start daemon did not accept a connection on {self.path}; set runner.daemon=false")
        return conn

    def _start_server(self) -> None:
        read_fd, write_fd = os.pipe()
        args = {"preload": self.preload, "socket": str(self.path), "reply_fd": write_fd, "idle_s": self.idle_s,
                "sys_path": [p for p in sys.path if isinstance(p, str)]}
        try:
            with open(self._log, "ab") as log:
                subprocess.run(  # returns once the server has forked itself away (no zombie left with this command)
                    [sys.executable, "-c", _BOOT, json.dumps(args)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    pass_fds=(write_fd,), start_new_session=True, cwd="/", check=False,
                )
        finally:
            os.close(write_fd)
        with os.fdopen(read_fd, "r") as replies:
            ready, _, _ = select.select([replies], [], [], START_TIMEOUT_S)
            line = replies.readline() if ready else ""
        answer = json.loads(line) if line else {}
        if not answer.get("ready"):
            why = answer.get("why") or f"no answer; see {self._log}"
            raise JobError(f"runner.daemon: the warm-start daemon could not start ({why}); set runner.daemon=false")

    def _read(self) -> dict[str, Any]:
        assert self._conn is not None
        while b"\n" not in self._replies:
            chunk = self._conn.recv(4096)
            if not chunk:
                raise JobError(f"runner.daemon: the warm-start daemon's connection closed early (see {self._log}); set runner.daemon=false")
            self._replies += chunk
        line, _, self._replies = self._replies.partition(b"\n")
        return json.loads(line)

    def start(self, spec_path: Path) -> int:
        """Fork the job that runs the spec at ``spec_path`` from the daemon; returns its pid."""
        request = json.dumps({"spec": str(spec_path), "cwd": os.getcwd(), "umask": _umask()}).encode()
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            streams = [devnull] + [fd if _is_open(fd) else devnull for fd in (1, 2)]  # the job reads no stdin
            for _ in range(2):  # a stale server exits; the second try starts a new one
                self._conn = self._server()
                self._replies = b""
                socket.send_fds(self._conn, [request], streams)
                answer = self._read()
                if "pid" in answer:
                    self.pid = answer.get("server")
                    return int(answer["pid"])
                self._conn.close()
                self._conn = None
        finally:
            os.close(devnull)
        raise JobError("runner.daemon: the warm-start daemon kept finding its modules changed; set runner.daemon=false")

    def wait(self) -> int:
        """The exit code of the job (negative: the signal that killed it)."""
        return int(self._read()["code"])

    def interrupt(self) -> None:
        """Ask the job to stop (SIGTERM), as an interrupted command does."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.sendall(b"stop\n")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
