"""The safetensors mapping: a file mapped once, handing out tensors that share its memory.

:class:`MappedFile` maps a safetensors file privately (the disk tier of the
dispatcher reads through these); offsets come from
:func:`~.safetensors_header.read_header`.

>>> import tempfile, pathlib, torch
>>> from bigjob.engine.checkpoints.safetensors_header import read_header
>>> from bigjob.engine.checkpoints.safetensors_writer import write_file
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> write_file(folder / "a.safetensors", {"w": torch.arange(4, dtype=torch.float32)})
>>> infos, meta = read_header(folder / "a.safetensors")
>>> with MappedFile(folder / "a.safetensors") as mapped:
...     mapped.view(infos["w"]).tolist()
[0.0, 1.0, 2.0, 3.0]
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from pathlib import Path
from types import TracebackType

import torch

from bigjob.engine.checkpoints.safetensors_header import TensorInfo, _bad
from bigjob.engine.tiers.pages import Range, prefer_huge
from bigjob.errors import CheckpointError

logger = logging.getLogger(__name__)


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
    >>> from bigjob.engine.checkpoints.safetensors_header import read_header
    >>> from bigjob.engine.checkpoints.safetensors_writer import write_file
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


__all__ = [
    "MappedFile",
]
