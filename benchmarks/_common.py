"""Measurement helpers shared by the benchmark scripts: memory peaks, page-cache eviction, machine facts."""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import time
from pathlib import Path

import torch

from bigjob.engine.tiers.pages import Range, touch


def proc_status(field: str) -> int:
    """A ``/proc/self/status`` figure (``VmRSS``, ``RssAnon``, ...) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def evict(files: list[Path]) -> None:
    """Drop ``files`` from the page cache (written pages are flushed first, or they would stay)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(files: list[Path], window: int = 64 << 20) -> None:
    """Bring ``files`` into the page cache, as a reader mapping them with ``MADV_HUGEPAGE`` would.

    Pages already cached stay as they are; missing ones are read through a mapping that
    asks for huge folios, window by window (mapped, read one byte a page, unmapped). The read
    makes the pages warm for the machine too: on a virtual machine that gave freed memory back
    to its host, a page is backed again only at its first touch, which costs far more than
    mapping it (``bigjob.engine.tiers.pages.touch``); a back-to-back batch never pays that, so a
    warm forward must not either. The folio size decides what
    mapping the pages costs later: a ``read()`` loop leaves readahead-sized folios, which cost
    a system streaming weights through mappings up to 11x more page-table work per forward
    (docs/benchmarks.md). Call it from a process whose memory is not being measured.
    """
    populate = getattr(mmap, "MADV_POPULATE_READ", 22)
    for path in files:
        size = path.stat().st_size
        if size == 0:
            continue
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) as mapping:
            if hasattr(mmap, "MADV_HUGEPAGE"):
                mapping.madvise(mmap.MADV_HUGEPAGE)
            start = ctypes.addressof(ctypes.c_char.from_buffer(mapping))  # private, never written: cache pages
            for offset in range(0, size, window):
                length = min(window, size - offset)
                mapping.madvise(populate, offset, length)
                touch([Range(start + offset, length)])
                mapping.madvise(mmap.MADV_DONTNEED, offset, length)


def files_under(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in sorted(folder.rglob("*")) if p.is_file()]


def cold_read_gbps(files: list[Path], chunk: int = 16 << 20) -> float:
    """Sequential read bandwidth (GB/s) of ``files`` with the page cache evicted first.

    Each file is announced whole (``POSIX_FADV_SEQUENTIAL`` + ``WILLNEED``) before it is read,
    so the kernel keeps many requests in flight, as a reader that knows what comes next does;
    one synchronous request at a time understates what a virtual disk can deliver.
    """
    evict(files)
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    total = 0
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
            while True:
                n = handle.readinto(view)
                if not n:
                    break
                total += n
    return total / (time.perf_counter() - start) / 1e9


def direct_read_gbps(files: list[Path], chunk: int = 16 << 20) -> float:
    """Sequential read bandwidth (GB/s) of ``files`` with ``O_DIRECT`` (past the page cache) in ``chunk`` requests.

    A large direct request is split by the block layer into many in flight at once; on a
    virtual disk this can beat the buffered path, whose readahead caps the requests in flight.
    Returns 0 where the file system refuses ``O_DIRECT``.
    """
    import mmap

    if not hasattr(os, "O_DIRECT"):
        return 0.0
    buffer = mmap.mmap(-1, chunk, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # page-aligned, as O_DIRECT needs
    view = memoryview(buffer)
    total = 0
    start = time.perf_counter()
    try:
        for path in files:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                while n := os.readv(fd, [view]):
                    total += n
            finally:
                os.close(fd)
    except OSError:
        return 0.0
    finally:
        view.release()
        buffer.close()
    return total / (time.perf_counter() - start) / 1e9


def memcpy_gbps(nbytes: int = 512 << 20, repeat: int = 5) -> float:
    """Memory copy bandwidth (GB/s of bytes copied) between two touched buffers, best of ``repeat``."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def matmul_gflops(n: int = 1024, repeat: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """CPU matmul rate (GFLOP/s) of an n x n product, best of ``repeat``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def machine_line() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"{platform.machine()}, {os.cpu_count()} cores, {memory / 2**30:.0f} GiB RAM, torch threads {torch.get_num_threads()}"


def versions_line() -> str:
    from bigjob import __version__

    parts = [f"bigjob {__version__}", f"torch {torch.__version__}", f"python {platform.python_version()}"]
    for name in ("transformers", "accelerate", "safetensors"):
        try:
            module = __import__(name)
            parts.append(f"{name} {module.__version__}")
        except ImportError:
            parts.append(f"{name} -")
    return ", ".join(parts)
