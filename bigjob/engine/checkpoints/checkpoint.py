"""The interface of an opened checkpoint: names, shapes, one tensor at a time, and an identity.

A :class:`Checkpoint` lists tensor names and their :class:`TensorMeta` without
reading data, hands out one tensor at a time (:meth:`Checkpoint.view`,
:meth:`Checkpoint.load`) and describes its files for use as a cache key
(:meth:`Checkpoint.identity`). The formats implement it in
:mod:`.safetensors_checkpoint` and :mod:`.torch_checkpoint`;
:func:`~bigjob.engine.checkpoints.opening.open_checkpoint` picks one.

>>> import tempfile, pathlib, torch
>>> from bigjob.engine.checkpoints.safetensors_writer import write_file
>>> from bigjob.engine.checkpoints.opening import open_checkpoint
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> write_file(folder / "model.safetensors", {"w": torch.ones(2, 3)})
>>> with open_checkpoint(folder) as ckpt:
...     print(isinstance(ckpt, Checkpoint), "w" in ckpt, len(ckpt), ckpt.load("w", torch.float16).dtype)
True True 1 torch.float16
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from bigjob.engine.checkpoints.safetensors_header import TensorInfo

_HASH_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class TensorMeta:
    """Name, shape and dtype of a checkpoint tensor (known without reading its data)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class Checkpoint:
    """A checkpoint opened for tensor-by-tensor reading; use :func:`~.opening.open_checkpoint`.

    ``root`` is the folder that shard and index names are relative to;
    ``files`` are the data files (shards) in the order their tensors are listed.
    """

    format: str = ""

    def __init__(
        self,
        root: Path,
        files: list[Path],
        index_file: Path | None = None,
        weight_map: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self._files = files
        self.index_file = index_file
        self._weight_map = weight_map

    # -- listing
    @property
    def files(self) -> list[Path]:
        """The data files, in shard order."""
        return list(self._files)

    def keys(self) -> list[str]:
        """Tensor names, in shard order then file order."""
        raise NotImplementedError

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __len__(self) -> int:
        return len(self._names())

    def _names(self) -> Mapping[str, object] | set[str]:
        raise NotImplementedError

    def _unknown(self, name: str) -> KeyError:
        return KeyError(f"checkpoint '{self.root}' has no tensor named '{name}'")

    # -- tensors
    def meta(self, name: str) -> TensorMeta:
        """Shape and dtype of ``name``, without reading its data."""
        raise NotImplementedError

    def info(self, name: str) -> TensorInfo | None:
        """The tensor's location in a safetensors file, or ``None`` for other formats."""
        return None

    def view(self, name: str) -> torch.Tensor:
        """The tensor, sharing memory with the file mapping where the format allows it."""
        raise NotImplementedError

    def load(
        self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """An owned, contiguous copy of ``name`` on ``device``.

        Floating-point tensors are converted to ``dtype`` when it is given;
        integer and bool tensors keep their dtype. Only this tensor is read.
        """
        return _owned(self.view(name), dtype, device)

    # -- cache key
    def identity(self, content_hash: bool = False) -> dict[str, Any]:
        """A JSON-serialisable description of the files, for use as a cache key.

        Lists each data file (name relative to ``root``, size, ``mtime_ns``) and
        the sha256 of the index file if there is one. With ``content_hash`` every
        file's bytes are hashed too (slow for big checkpoints); without it the
        folder's absolute path is part of the identity, so two checkpoints in two
        folders never share an identity even when their file names, sizes and
        mtimes agree (copies made with ``cp -p``, ``rsync -a`` or ``tar``).
        """
        files = []
        for path in self._files:
            stat = path.stat()
            entry: dict[str, Any] = {
                "name": self._relative(path),
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
            }
            if content_hash:
                entry["sha256"] = _sha256(path)
            files.append(entry)
        index = None
        if self.index_file is not None:
            index = {"name": self._relative(self.index_file), "sha256": _sha256(self.index_file)}
        identity = {"format": self.format, "files": files, "index": index}
        if not content_hash:
            identity["folder"] = str(self.root.resolve())
        return identity

    def _relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.name

    # -- lifetime
    def close(self) -> None:
        """Release mappings and loaded shards. Tensors already returned stay valid."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}('{self.root}', files={len(self._files)})"


def _owned(tensor: torch.Tensor, dtype: torch.dtype | None, device: str | torch.device) -> torch.Tensor:
    """A fresh contiguous copy of ``tensor`` on ``device``, floats converted to ``dtype``."""
    target = torch.device(device)
    convert = dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype
    if target.type != "cpu":
        out = tensor.to(device=target, copy=True)
        return out.to(dtype) if convert else out
    if convert:
        return tensor.to(dtype=dtype, memory_format=torch.contiguous_format)
    return tensor.clone(memory_format=torch.contiguous_format)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = [
    "Checkpoint",
    "TensorMeta",
]
