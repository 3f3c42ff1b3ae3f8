"""The safetensors header: its layout, its dtype names, and reading and validating it.

A safetensors file is an 8-byte little-endian header length ``N``, then ``N``
bytes of JSON header mapping each tensor name to its ``dtype``, ``shape`` and
``data_offsets`` (``[begin, end)`` relative to the data buffer, which starts at
byte ``8 + N``), with an optional ``"__metadata__"`` object of strings, then the
data buffer.

:func:`read_header` validates a header and returns one :class:`TensorInfo`
per tensor, with the ABSOLUTE file offset of its bytes. Files are mapped by
:mod:`.safetensors_mapping` and written by :mod:`.safetensors_writer`.

This module assumes a little-endian host (as the format does).

>>> import tempfile, pathlib, torch
>>> from bigjob.engine.checkpoints.safetensors_writer import write_file
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> write_file(folder / "a.safetensors", {"w": torch.arange(4, dtype=torch.float32)})
>>> infos, meta = read_header(folder / "a.safetensors")
>>> infos["w"].shape, infos["w"].nbytes
((4,), 16)
"""

from __future__ import annotations

import gc
import json
import logging
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from bigjob.errors import CheckpointError

logger = logging.getLogger(__name__)

#: The largest header we accept (the reference implementation uses the same cap).
MAX_HEADER_BYTES = 100_000_000

#: safetensors dtype name -> torch dtype, for every dtype this torch build has.
_NAME_TO_DTYPE: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in (
        ("F64", "float64"),
        ("F32", "float32"),
        ("F16", "float16"),
        ("BF16", "bfloat16"),
        ("I64", "int64"),
        ("I32", "int32"),
        ("I16", "int16"),
        ("I8", "int8"),
        ("U64", "uint64"),
        ("U32", "uint32"),
        ("U16", "uint16"),
        ("U8", "uint8"),
        ("BOOL", "bool"),
        ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E5M2", "float8_e5m2"),
        ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
        ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
        ("C64", "complex64"),
    )
    if hasattr(torch, attr)
}
_DTYPE_TO_NAME: dict[torch.dtype, str] = {dtype: name for name, dtype in _NAME_TO_DTYPE.items()}
_ITEMSIZE: dict[str, int] = {name: dtype.itemsize for name, dtype in _NAME_TO_DTYPE.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype; ``ValueError`` if the format has none.

    >>> dtype_name(torch.bfloat16)
    'BF16'
    """
    try:
        return _DTYPE_TO_NAME[dtype]
    except KeyError:
        raise ValueError(
            f"dtype {dtype} cannot be stored in safetensors; supported: {sorted(map(str, _DTYPE_TO_NAME))}"
        ) from None


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file.

    ``offset`` is the absolute byte offset of the tensor's first byte in the
    file (header included), so ``offset + nbytes`` is where it ends.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"safetensors file '{path}' is corrupt: {what}; re-download or re-export it")


def _entry_problem(name: str, entry: object, data_size: int, file_size: int) -> str:
    """Describe what is wrong with one header entry (the slow, careful path)."""
    if not isinstance(entry, dict):
        return f"entry '{name}' is {entry!r:.100}, not an object"
    dtype_str = entry.get("dtype")
    itemsize = _ITEMSIZE.get(dtype_str) if isinstance(dtype_str, str) else None
    if itemsize is None:
        return f"tensor '{name}' has unknown dtype {dtype_str!r}; known: {sorted(_ITEMSIZE)}"
    shape = entry.get("shape")
    if not isinstance(shape, list) or any(type(dim) is not int or dim < 0 for dim in shape):
        return f"tensor '{name}' has shape {shape!r:.100}, not a list of non-negative integers"
    offsets = entry.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or any(type(o) is not int for o in offsets):
        return f"tensor '{name}' has data_offsets {offsets!r:.100}, not a pair of integers"
    begin, end = offsets
    if begin < 0 or end < begin:
        return f"tensor '{name}' has data_offsets {offsets!r}: negative or reversed"
    expected = math.prod(shape) * itemsize
    if end - begin != expected:
        return f"tensor '{name}' spans {end - begin} bytes but shape {shape} of {dtype_str} needs {expected}"
    if end > data_size:
        return (
            f"tensor '{name}' ends at data byte {end}: the header promises {file_size - data_size + end} bytes "
            f"but the file holds {file_size} (truncated download?)"
        )
    return f"tensor '{name}' has an invalid entry {entry!r:.200}"


def _advise_file(fd: int, advice: str, length: int = 0) -> None:
    """``posix_fadvise`` over the file's first ``length`` bytes (0: all) where the system has it.

    The kernel drops (``DONTNEED``) only whole pages inside the range: round ``length`` up.
    """
    value = getattr(os, advice, None)
    if value is None:
        return
    try:
        os.posix_fadvise(fd, 0, length, value)
    except OSError:  # only advice: a filesystem that refuses it reads as before
        pass


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and validate the header of a safetensors file without touching its data.

    Returns the tensor infos ordered by their position in the file and the
    ``__metadata__`` strings (empty when absent). Every inconsistency (short
    file, absurd header length, bad JSON, unknown dtype, size/shape mismatch,
    bad or overlapping offsets, data past the end of the file) raises
    :class:`~bigjob.errors.CheckpointError` naming the file and the problem.
    Gaps between tensors and trailing bytes are tolerated.

    >>> import tempfile, pathlib, torch
    >>> from bigjob.engine.checkpoints.safetensors_writer import write_file
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.safetensors"
    >>> write_file(p, {"b": torch.zeros(2, 3, dtype=torch.bfloat16)}, metadata={"format": "pt"})
    >>> infos, meta = read_header(p)
    >>> infos["b"].dtype, infos["b"].shape, meta
    (torch.bfloat16, (2, 3), {'format': 'pt'})
    """
    path = Path(path)
    try:
        with open(path, "rb", buffering=0) as handle:
            _advise_file(handle.fileno(), "POSIX_FADV_RANDOM")  # read the header's pages, not a readahead window
            file_size = os.fstat(handle.fileno()).st_size
            if file_size < 8:
                raise _bad(path, f"the file holds {file_size} bytes, fewer than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > MAX_HEADER_BYTES:
                raise _bad(path, f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if header_len > file_size - 8:
                raise _bad(
                    path, f"header length {header_len} is larger than the {file_size - 8} bytes after the length field"
                )
            chunks, got = [], 0
            while got < header_len and (chunk := handle.read(header_len - got)):  # raw reads may return short
                chunks.append(chunk)
                got += len(chunk)
            raw = b"".join(chunks)
            if len(raw) != header_len:
                raise _bad(path, f"the header ends after {len(raw)} of its {header_len} bytes")
            # The header's pages came in as 4 KiB folios; left cached, they would make the 2 MiB
            # folio that the first tensor's fault reads impossible (and small ones follow it).
            # Dropped now, that fault reads them into a huge folio with their neighbours.
            _advise_file(handle.fileno(), "POSIX_FADV_DONTNEED", -(-(8 + header_len) // mmap.PAGESIZE) * mmap.PAGESIZE)
    except OSError as err:
        raise CheckpointError(f"cannot read safetensors file '{path}': {err.strerror or err}") from err
    # A big header makes hundreds of thousands of small containers; the cyclic GC
    # would rescan them over and over (2-4x slower), and none of them form cycles.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _parse_header(path, raw, header_len, file_size)
    finally:
        if gc_was_enabled:
            gc.enable()


def _parse_header(
    path: Path, raw: bytes, header_len: int, file_size: int
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise _bad(path, f"the header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise _bad(path, f"the header is a JSON {type(header).__name__}, not an object")

    metadata_raw = header.pop("__metadata__", None) or {}
    if not isinstance(metadata_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata_raw.items()
    ):
        raise _bad(path, f"__metadata__ must map strings to strings, got {metadata_raw!r:.200}")

    data_start = 8 + header_len
    data_size = file_size - data_start
    itemsizes = _ITEMSIZE
    prod = math.prod
    entries: list[tuple[int, int, str, str, list[int]]] = []
    append = entries.append
    # Fast path: any surprise (wrong type, missing key, bad value) falls through to
    # _entry_problem, which finds and words the exact problem.
    for name, entry in header.items():
        try:
            dtype_str = entry["dtype"]
            shape = entry["shape"]
            begin, end = entry["data_offsets"]
            ok = (
                type(shape) is list
                and type(begin) is int
                and type(end) is int
                and 0 <= begin <= end <= data_size
                and all(type(dim) is int and dim >= 0 for dim in shape)
                and end - begin == prod(shape) * itemsizes[dtype_str]
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise _bad(path, _entry_problem(name, entry, data_size, file_size))
        append((begin, end, name, dtype_str, shape))

    entries.sort()  # names are unique, so ties on offsets never compare further
    infos: dict[str, TensorInfo] = {}
    dtypes = _NAME_TO_DTYPE
    previous_end = 0
    previous_name = ""
    for begin, end, name, dtype_str, shape in entries:
        if end > begin:
            if begin < previous_end:
                raise _bad(
                    path,
                    f"tensors '{previous_name}' and '{name}' overlap (data bytes {begin}..{previous_end})",
                )
            previous_end, previous_name = end, name
        infos[name] = TensorInfo(name, dtypes[dtype_str], tuple(shape), path, data_start + begin, end - begin)
    return infos, dict(metadata_raw)


__all__ = [
    "MAX_HEADER_BYTES",
    "TensorInfo",
    "dtype_name",
    "read_header",
]
