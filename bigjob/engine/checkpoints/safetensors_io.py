"""Our own reader and streaming writer for the safetensors format.

A safetensors file is an 8-byte little-endian header length ``N``, then ``N``
bytes of JSON header mapping each tensor name to its ``dtype``, ``shape`` and
``data_offsets`` (``[begin, end)`` relative to the data buffer, which starts at
byte ``8 + N``), with an optional ``"__metadata__"`` object of strings, then the
data buffer.

* :func:`read_header` validates a header and returns one :class:`TensorInfo`
  per tensor, with the ABSOLUTE file offset of its bytes.
* :class:`MappedFile` maps a file once and hands out tensors that share memory
  with the mapping (the disk tier of the dispatcher reads through these).
* :class:`SafetensorsWriter` streams tensors into a file whose header is known
  up front; :func:`write_file` is the one-call convenience.

This module assumes a little-endian host (as the format does).

>>> import tempfile, pathlib, torch
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> write_file(folder / "a.safetensors", {"w": torch.arange(4, dtype=torch.float32)})
>>> infos, meta = read_header(folder / "a.safetensors")
>>> infos["w"].shape, infos["w"].nbytes
((4,), 16)
>>> with MappedFile(folder / "a.safetensors") as mapped:
...     mapped.view(infos["w"]).tolist()
[0.0, 1.0, 2.0, 3.0]
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import mmap
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from bigjob.engine.tiers.pages import Range, prefer_huge
from bigjob.errors import CheckpointError, OffloadError

logger = logging.getLogger(__name__)

#: The largest header we accept (the reference implementation uses the same cap).
MAX_HEADER_BYTES = 100_000_000
# Files this module writes start their data buffer at a multiple of this (one cache line, the
# widest SIMD load), and lay tensors out so weight matrices start on such a boundary: a
# matrix-vector product (decoding one token) over a zero-copy view ran 6-10% slower on this
# project's machine when its weight started mid-line (fp32 and bf16, AMD EPYC).
DATA_ALIGN = 64

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


class MappedFile:
    """One read-only-on-disk memory mapping of a safetensors file.

    The file is mapped once with ``mmap.ACCESS_COPY`` (``MAP_PRIVATE``): clean
    pages are shared with the page cache, nothing is read until touched, and
    the buffer is writable for :func:`torch.frombuffer` (writes stay private to
    this process and never reach the file).

    :meth:`view` returns tensors that share memory with the mapping. Each view
    holds a ``memoryview`` export of the mapping, so the mapping stays valid as
    long as any view (or a tensor sharing its storage) is alive, even after
    :meth:`close`; the pages are unmapped when the last one goes away.

    >>> import tempfile, pathlib, torch
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.safetensors"
    >>> write_file(p, {"x": torch.ones(3)})
    >>> infos, _ = read_header(p)
    >>> mapped = MappedFile(p)
    >>> t = mapped.view(infos["x"])
    >>> mapped.address(infos["x"]) == t.data_ptr()
    True
    >>> mapped.close()
    >>> t.sum().item()
    3.0
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as err:
            raise CheckpointError(f"cannot open safetensors file '{self.path}': {err.strerror or err}") from err
        try:
            self.size = os.fstat(fd).st_size
            if self.size == 0:
                raise _bad(self.path, "the file is empty")
            self._mm: mmap.mmap | None = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot map safetensors file '{self.path}': {err}") from err
        finally:
            os.close(fd)
        anchor = ctypes.c_char.from_buffer(self._mm)
        self.base_address: int = ctypes.addressof(anchor)
        del anchor  # release the buffer export at once so close() can unmap
        prefer_huge([Range(self.base_address, self.size)])  # pages it reads come in 2 MiB folios

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._mm is None

    def _check(self, info: TensorInfo) -> mmap.mmap:
        if self._mm is None:
            raise ValueError(f"mapping of '{self.path}' is closed")
        if info.offset < 0 or info.offset + info.nbytes > self.size:
            raise ValueError(
                f"tensor '{info.name}' (bytes {info.offset}..{info.offset + info.nbytes}) lies outside "
                f"'{self.path}' ({self.size} bytes); was the info read from another file?"
            )
        return self._mm

    def address(self, info: TensorInfo) -> int:
        """Virtual address of the tensor's first byte inside this mapping (for ``madvise``)."""
        self._check(info)
        return self.base_address + info.offset

    def view(self, info: TensorInfo) -> torch.Tensor:
        """A tensor sharing memory with the mapping (zero-copy).

        Exceptions, which return a fresh (owned) tensor instead: a tensor with
        no elements, and a tensor whose offset is not a multiple of its dtype's
        itemsize (misaligned data cannot be viewed safely, so it is copied).
        In-place writes to a view modify this process's private copy of the
        page, never the file.
        """
        mm = self._check(info)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if info.offset % info.dtype.itemsize:
            logger.debug("tensor '%s' in '%s' is misaligned; copying it", info.name, self.path)
            return self.read(info)
        chunk = memoryview(mm)[info.offset : info.offset + info.nbytes]
        return torch.frombuffer(chunk, dtype=info.dtype).view(info.shape)

    def read(self, info: TensorInfo) -> torch.Tensor:
        """An owned copy of the tensor (reads its bytes once; shares nothing with the mapping)."""
        mm = self._check(info)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        raw = torch.frombuffer(memoryview(mm)[info.offset : info.offset + info.nbytes], dtype=torch.uint8)
        return raw.clone().view(info.dtype).view(info.shape)

    def close(self) -> None:
        """Drop this object's hold on the mapping.

        If no view is alive the pages are unmapped now; otherwise the mapping
        lives on until the last view is garbage collected. Idempotent.
        """
        mm, self._mm = self._mm, None
        if mm is None:
            return
        try:
            mm.close()
        except BufferError:
            logger.debug("'%s' still has live views; it is unmapped when the last one is freed", self.path)

    def __enter__(self) -> MappedFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MappedFile('{self.path}', size={self.size}, closed={self.closed})"


def _write_all(fd: int, data: memoryview | bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _tensor_bytes(tensor: torch.Tensor) -> tuple[memoryview, torch.Tensor]:
    """A byte view of a tensor's data plus the tensor that must stay alive while it is used."""
    flat = tensor.detach()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b""), flat
    nbytes = flat.numel() * flat.element_size()
    buffer = (ctypes.c_char * nbytes).from_address(flat.data_ptr())
    return memoryview(buffer).cast("B"), flat


class SafetensorsWriter:
    """Stream tensors into a safetensors file whose entries are known up front.

    The header (with space padding so the data starts at a multiple of
    :data:`DATA_ALIGN` bytes) is written at construction; then :meth:`write`
    must be called once per entry, in the given order, and :meth:`close`
    flushes and fsyncs. Tensors are laid out back to back with no gaps, as the
    format requires, so a tensor's alignment is decided by the order of
    ``entries``: order them by :func:`layout_key` (as :func:`write_file` does)
    and every tensor is aligned to its itemsize, every one whose size is a
    multiple of :data:`DATA_ALIGN` to that. ``data_align=8`` lays the data out
    as the ``safetensors`` library does (at a multiple of 8 only).

    Any ``OSError`` (for example ``ENOSPC``) removes the partial file and is
    raised as :class:`~bigjob.errors.OffloadError`. Used as a context manager,
    an exception inside the block also removes the partial file.

    >>> import tempfile, pathlib, torch
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "s.safetensors"
    >>> with SafetensorsWriter(p, [("a", torch.float32, (2,)), ("b", torch.int8, ())]) as writer:
    ...     writer.write("a", torch.tensor([1.0, 2.0]))
    ...     writer.write("b", torch.tensor(7, dtype=torch.int8))
    >>> sorted(read_header(p)[0])
    ['a', 'b']
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
        data_align: int = DATA_ALIGN,
    ) -> None:
        if data_align <= 0 or data_align % 8:
            raise ValueError(f"data_align must be a positive multiple of 8, got {data_align}")
        self.path = Path(path)
        self._entries = [(str(name), dtype, tuple(int(d) for d in shape)) for name, dtype, shape in entries]
        names = [name for name, _, _ in self._entries]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"entries name tensors more than once: {dupes[:20]}")
        if "__metadata__" in names:
            raise ValueError("'__metadata__' is reserved by the safetensors format and cannot name a tensor")
        header: dict[str, object] = {}
        if metadata:
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise ValueError(f"metadata must map strings to strings, got {dict(metadata)!r:.200}")
            header["__metadata__"] = dict(metadata)
        position = 0
        for name, dtype, shape in self._entries:
            if any(d < 0 for d in shape):
                raise ValueError(f"entry '{name}' has negative dimension in shape {shape}")
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": dtype_name(dtype),
                "shape": list(shape),
                "data_offsets": [position, position + nbytes],
            }
            position += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-(8 + len(encoded)) % data_align)  # the data buffer starts on a cache line
        self.data_size = position
        self._next = 0
        self._fd: int | None = None
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as err:
            raise self._error(err) from err
        try:
            _write_all(self._fd, struct.pack("<Q", len(encoded)) + encoded)
        except OSError as err:
            raise self._fail(err) from err

    def _fail(self, err: OSError) -> OffloadError:
        """Close and remove the partial file; return the error to raise."""
        self.abort()
        return self._error(err)

    def _error(self, err: OSError) -> OffloadError:
        reason = os.strerror(err.errno) if err.errno else str(err)
        return OffloadError(
            f"cannot write '{self.path}': {reason} (errno {err.errno}); free space on that disk "
            f"or point the offload folder / output path elsewhere"
        )

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next entry's data; ``name``, dtype and shape must match the entry."""
        if self._fd is None:
            raise ValueError(f"writer for '{self.path}' is closed")
        if self._next >= len(self._entries):
            raise ValueError(f"all {len(self._entries)} entries of '{self.path}' are written; got extra '{name}'")
        want_name, want_dtype, want_shape = self._entries[self._next]
        if name != want_name:
            raise ValueError(f"expected entry '{want_name}' next in '{self.path}', got '{name}'")
        if tensor.dtype != want_dtype or tuple(tensor.shape) != want_shape:
            raise ValueError(
                f"entry '{name}' was declared {want_dtype} {list(want_shape)}, "
                f"got {tensor.dtype} {list(tensor.shape)}"
            )
        if tensor.device.type == "meta":
            raise ValueError(f"entry '{name}' is on the meta device and has no data to write")
        data, keepalive = _tensor_bytes(tensor)
        try:
            _write_all(self._fd, data)
        except OSError as err:
            raise self._fail(err) from err
        finally:
            data.release()
            del keepalive
        self._next += 1

    def close(self) -> None:
        """Flush and fsync; raise ``ValueError`` (and remove the file) if entries are missing."""
        if self._fd is None:
            return
        if self._next != len(self._entries):
            missing = [name for name, _, _ in self._entries[self._next :]]
            self.abort()
            raise ValueError(
                f"'{self.path}' was closed with {len(missing)} entries unwritten ({missing[:20]}); file removed"
            )
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
            os.close(fd)
        except OSError as err:
            self._fd = fd
            raise self._fail(err) from err

    def abort(self) -> None:
        """Close without finishing and remove the partial file. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            logger.warning("could not remove partial file '%s': %s", self.path, err)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        elif self._fd is not None:
            self.abort()


def layout_key(name: str, dtype: torch.dtype, shape: Sequence[int]) -> tuple[bool, int, str]:
    """Sort key that lays tensors out aligned in a file whose data starts at a multiple of :data:`DATA_ALIGN`.

    Tensors whose size is a multiple of :data:`DATA_ALIGN` (nearly every weight matrix) come
    first, so each starts on a cache line; the rest follow by itemsize, largest first, so each
    is aligned to its own itemsize. Ties go by name.

    >>> entries = [("b", torch.int8, (3,)), ("w", torch.float32, (4, 16)), ("h", torch.float16, (5,))]
    >>> [name for name, _, _ in sorted(entries, key=lambda e: layout_key(*e))]
    ['w', 'h', 'b']
    """
    nbytes = math.prod(shape) * dtype.itemsize
    whole = nbytes % DATA_ALIGN == 0
    return (not whole, 0 if whole else -dtype.itemsize, name)


def write_file(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` to a safetensors file, in the order of :func:`layout_key`.

    Every tensor is aligned to its itemsize, and every tensor whose size is a multiple of
    :data:`DATA_ALIGN` starts on a :data:`DATA_ALIGN` boundary of the file.

    >>> import tempfile, pathlib, torch
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "w.safetensors"
    >>> write_file(p, {"i8": torch.zeros(3, dtype=torch.int8), "f64": torch.ones(1, dtype=torch.float64),
    ...                "w": torch.ones(4, 16)})
    >>> [(i.name, i.offset % 64) for i in read_header(p)[0].values()]
    [('w', 0), ('f64', 0), ('i8', 8)]
    """
    order = sorted(tensors, key=lambda name: layout_key(name, tensors[name].dtype, tuple(tensors[name].shape)))
    entries = [(name, tensors[name].dtype, tuple(tensors[name].shape)) for name in order]
    with SafetensorsWriter(path, entries, metadata) as writer:
        for name in order:
            writer.write(name, tensors[name])


__all__ = [
    "DATA_ALIGN",
    "MAX_HEADER_BYTES",
    "MappedFile",
    "SafetensorsWriter",
    "TensorInfo",
    "dtype_name",
    "read_header",
    "write_file",
]
