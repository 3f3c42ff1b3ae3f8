"""Measurement helpers shared by the benchmark scripts: memory peaks, page-cache eviction, machine facts."""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import platform
import time
from pathlib import Path
from typing import Any

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


# --------------------------------------------------------------------------------------------
# The systems compared (run.py, big.py): loading one, and what its load left where.

SYSTEM_NAMES = ("ram", "bigjob", "accelerate", "transformers")


def load_system(system: str, folder: Path, budget: int, offload_folder: Path, **bigjob_options: Any) -> Any:
    """``folder``'s ``LlamaForCausalLM`` in fp32 as ``system`` loads it under ``max_memory={"cpu": budget}``.

    ``ram``: Transformers' ``from_pretrained``, weights copied into RAM (the reference); ``bigjob``:
    ``bigjob.from_pretrained(device_map="auto")`` (``bigjob_options`` passed on); ``accelerate``:
    ``init_empty_weights`` + ``load_checkpoint_and_dispatch`` (``no_split_module_classes=["LlamaDecoderLayer"]``);
    ``transformers``: ``from_pretrained(device_map="auto")``. Offload folders go to ``offload_folder``.
    """
    import transformers

    if system == "ram":
        return into_ram(transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32))
    if system == "bigjob":
        import bigjob

        return bigjob.from_pretrained(
            folder, device_map="auto", max_memory={"cpu": budget}, offload_folder=offload_folder, **bigjob_options
        )
    if system == "accelerate":
        from accelerate import init_empty_weights, load_checkpoint_and_dispatch

        config = transformers.AutoConfig.from_pretrained(folder)
        with init_empty_weights():
            model = transformers.LlamaForCausalLM(config)
        model.tie_weights()
        return load_checkpoint_and_dispatch(
            model, str(folder), device_map="auto", max_memory={"cpu": budget},
            no_split_module_classes=["LlamaDecoderLayer"], offload_folder=str(offload_folder), dtype=torch.float32,
        )
    if system == "transformers":
        return transformers.LlamaForCausalLM.from_pretrained(
            folder, dtype=torch.float32, device_map="auto", max_memory={"cpu": budget}, offload_folder=str(offload_folder)
        )
    raise SystemExit(f"unknown system {system!r}")


def into_ram(model: Any) -> Any:
    """Copy every weight into anonymous memory: Transformers may leave them as views of the mapped files,
    which would keep the checkpoint in the page cache (no eviction could touch it) and out of RAM figures."""
    copies: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                if id(param) not in copies:
                    copies[id(param)] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
                module._parameters[name] = copies[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = buffer.clone()
    return model


def preload_libraries(system: str) -> None:
    """Import what loading needs before the baseline, so neither load time nor memory counts library imports."""
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401 - resolves the lazy module

    if system == "bigjob":
        import bigjob.models.hf  # noqa: F401
    elif system in ("accelerate", "transformers"):
        import accelerate  # noqa: F401


def tier_bytes(model: Any, system: str, config: dict[str, Any]) -> dict[str, int]:
    """Bytes of fp32 weights per tier (``cpu``, ``disk``, ...) as ``system`` placed them: bigjob's dispatch info,
    the others' ``hf_device_map`` over the checkpoint's tensors (``workload.shapes(config)``)."""
    from workload import shapes

    table = {name: math.prod(shape) * 4 for name, shape in shapes(config).items()}
    if system == "ram":
        return {"cpu": sum(table.values())}
    if system == "bigjob":
        from bigjob import get_dispatch_info

        return dict(get_dispatch_info(model).bytes_per_tier)
    device_map = getattr(model, "hf_device_map", {}) or {}
    out: dict[str, int] = {}
    for name, nbytes in table.items():
        best = max((p for p in device_map if p == "" or name == p or name.startswith(p + ".")), key=len, default=None)
        tier = str(device_map[best]) if best is not None else "?"
        out[tier] = out.get(tier, 0) + nbytes
    return out


# --------------------------------------------------------------------------------------------
# I/O and memory counters.


def disk_reads() -> int:
    """Bytes read from block devices so far, machine-wide (``/proc/diskstats``, whole disks only)."""
    disks = {p.name for p in Path("/sys/block").iterdir()} if Path("/sys/block").exists() else set()
    total = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[2] in disks and not fields[2].startswith(("loop", "ram", "zram")):
            total += int(fields[5]) * 512
    return total


def proc_io() -> dict[str, int]:
    """This process's ``/proc/self/io`` counters (all its threads): ``read_bytes`` and ``write_bytes`` are
    what it made the block layer read and write (page-fault reads of mapped files included), ``rchar`` and
    ``wchar`` what its read/write calls moved, cached or not."""
    out: dict[str, int] = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = int(value)
    return out


def meminfo(field: str) -> int:
    """A ``/proc/meminfo`` figure (``MemAvailable``, ``Cached``, ...) in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0
