"""Checksums of an offload folder's files: a cheap check on every reuse, a full one on demand.

An offload folder is a cache, and a cache may be damaged under it: a file deleted or
truncated, bytes flipped, a header's dtype relabelled (``F16`` to ``I16``, same size), shards
swapped between two folders. Each file's checks are recorded in the folder's marker when
it is built:

* ``size``: the file's length;
* ``header``: sha256 of a safetensors file's header (its 8-byte length and the JSON that
  names every tensor's dtype, shape and offsets); of the whole file for other files;
* ``sampled``: blake2b of :data:`SAMPLES` pages spread evenly over the tensor bytes, the
  first and last among them;
* ``full``: blake2b of the whole file.

Reusing a folder checks size, header and samples (:func:`quick_problem`): a relabelled
dtype, swapped or foreign shards and truncation always fail it, and so do flipped bytes in
a sampled page; it reads about 1 MiB a file. :func:`full_problem` reads every byte
(``bigjob-cache verify``).

>>> import tempfile, torch
>>> from bigjob.engine.checkpoints.safetensors_writer import write_file
>>> path = Path(tempfile.mkdtemp()) / "t.safetensors"
>>> write_file(path, {"w": torch.ones(64, 64)})
>>> checks = file_checks(path)
>>> quick_problem(path, checks), full_problem(path, checks)
(None, None)
>>> data = bytearray(path.read_bytes()); data[-1] ^= 0xFF; _ = path.write_bytes(bytes(data))
>>> quick_problem(path, checks)
'its tensor bytes differ from those it was built with'
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any

__all__ = ["SAMPLES", "file_checks", "full_problem", "quick_problem"]

SAMPLES = 256  # pages read by the quick check (at most; fewer in a small file)
PAGE = 4096
_CHUNK = 8 << 20


def _header_end(handle: Any, size: int, safetensors: bool) -> int:
    """Where the tensor bytes start: after a safetensors header, else 0 (the header is the whole file)."""
    if not safetensors or size < 8:
        return size if not safetensors else 0
    handle.seek(0)
    (length,) = struct.unpack("<Q", handle.read(8))
    return min(size, 8 + length)


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


def _header_digest(handle: Any, end: int) -> str:
    handle.seek(0)
    return hashlib.sha256(handle.read(end)).hexdigest()


def _sampled_digest(handle: Any, start: int, size: int) -> str:
    digest = hashlib.blake2b(digest_size=16)
    span = size - start
    if span > 0:
        pages = max(1, min(SAMPLES, -(-span // PAGE)))
        last = max(0, span - PAGE)
        for i in range(pages):
            offset = start + (last * i // (pages - 1) if pages > 1 else 0)
            handle.seek(offset)
            digest.update(handle.read(PAGE))
    return digest.hexdigest()


def _full_digest(handle: Any) -> str:
    digest = hashlib.blake2b(digest_size=16)
    handle.seek(0)
    while chunk := handle.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def file_checks(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checks of the file at ``path`` as recorded in a marker: size, header, sampled and full digests."""
    path = Path(path)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        end = _header_end(handle, size, _is_safetensors(path))
        return {
            "size": size,
            "header": _header_digest(handle, end),
            "sampled": _sampled_digest(handle, end, size),
            "full": _full_digest(handle),
        }


def quick_problem(path: str | os.PathLike[str], checks: Any) -> str | None:
    """What is wrong with the file at ``path`` by its size, header and sampled pages; None when nothing is."""
    path = Path(path)
    if not isinstance(checks, dict) or not all(isinstance(checks.get(k), (int, str)) for k in ("size", "header", "sampled")):
        return "its marker records no checksums"
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size != checks["size"]:
                return f"it is {size} bytes, built as {checks['size']}"
            end = _header_end(handle, size, _is_safetensors(path))
            if _header_digest(handle, end) != checks["header"]:
                return "its header differs from the one it was built with (dtypes, shapes or offsets)"
            if _sampled_digest(handle, end, size) != checks["sampled"]:
                return "its tensor bytes differ from those it was built with"
    except FileNotFoundError:
        return "it is missing"
    except (OSError, struct.error) as err:
        return f"it cannot be read ({getattr(err, 'strerror', None) or err})"
    return None


def full_problem(path: str | os.PathLike[str], checks: Any) -> str | None:
    """:func:`quick_problem`, then the digest of every byte."""
    problem = quick_problem(path, checks)
    if problem is not None:
        return problem
    if not isinstance(checks.get("full"), str):
        return "its marker records no full checksum"
    try:
        with open(path, "rb") as handle:
            if _full_digest(handle) != checks["full"]:
                return "its bytes differ from those it was built with"
    except OSError as err:
        return f"it cannot be read ({err.strerror or err})"
    return None
