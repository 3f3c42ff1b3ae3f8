"""The safetensors writer: tensors streamed into a file whose header is written first, laid out aligned.

:class:`SafetensorsWriter` streams tensors into a file whose header is known
up front; :func:`write_file` is the one-call convenience, ordering tensors by
:func:`layout_key` so each starts aligned.

>>> import tempfile, pathlib, torch
>>> from bigjob.engine.checkpoints.safetensors_header import read_header
>>> path = pathlib.Path(tempfile.mkdtemp()) / "a.safetensors"
>>> write_file(path, {"w": torch.arange(4, dtype=torch.float32)})
>>> read_header(path)[0]["w"].offset % DATA_ALIGN
0
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import torch

from bigjob.engine.checkpoints.safetensors_header import dtype_name
from bigjob.errors import OffloadError

logger = logging.getLogger(__name__)

# Files this module writes start their data buffer at a multiple of this (one cache line, the
# widest SIMD load), and lay tensors out so weight matrices start on such a boundary: a
# matrix-vector product (decoding one token) over a zero-copy view ran 6-10% slower on this
# project's machine when its weight started mid-line (fp32 and bf16, AMD EPYC).
DATA_ALIGN = 64


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
    >>> from bigjob.engine.checkpoints.safetensors_header import read_header
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
    >>> from bigjob.engine.checkpoints.safetensors_header import read_header
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
    "SafetensorsWriter",
    "layout_key",
    "write_file",
]
