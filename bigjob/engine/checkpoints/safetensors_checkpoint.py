"""The safetensors checkpoint: headers read at open, tensors viewed through a mapping or read with pread.

:class:`SafetensorsCheckpoint` reads every file's header when it is opened
(checking each shard against its index), maps a file once on first use for
zero-copy :meth:`~SafetensorsCheckpoint.view`, and reads owned copies with
positioned reads (:meth:`~SafetensorsCheckpoint.load`) so the file's pages
stay out of the process.

>>> import tempfile, pathlib, torch
>>> from bigjob.engine.checkpoints.safetensors_writer import write_file
>>> path = pathlib.Path(tempfile.mkdtemp()) / "model.safetensors"
>>> write_file(path, {"w": torch.arange(3.0)})
>>> with SafetensorsCheckpoint(path.parent, [path]) as ckpt:
...     print(ckpt.format, ckpt.info("w").nbytes, ckpt.load("w").tolist())
safetensors 12 [0.0, 1.0, 2.0]
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bigjob.engine.checkpoints.checkpoint import Checkpoint, TensorMeta
from bigjob.engine.checkpoints.index import _names_by_shard
from bigjob.engine.checkpoints.safetensors_header import TensorInfo, read_header
from bigjob.engine.checkpoints.safetensors_mapping import MappedFile
from bigjob.errors import CheckpointError

logger = logging.getLogger(__name__)


class SafetensorsCheckpoint(Checkpoint):
    """Safetensors backend: headers are read at open, each file is mapped once on first use."""

    format = "safetensors"

    def __init__(
        self,
        root: Path,
        files: list[Path],
        index_file: Path | None = None,
        weight_map: dict[str, str] | None = None,
    ) -> None:
        super().__init__(root, files, index_file, weight_map)
        self._infos: dict[str, TensorInfo] = {}
        self._mapped: dict[Path, MappedFile] = {}
        self._fds: dict[Path, int] = {}
        wanted = _names_by_shard(root, weight_map) if weight_map is not None else None
        for path in files:
            infos, _ = read_header(path)
            if wanted is None:
                self._infos.update(infos)
                continue
            names = wanted.get(path, set())
            absent = sorted(names.difference(infos))
            if absent:
                raise CheckpointError(
                    f"index '{index_file}' lists {len(absent)} tensor(s) in shard '{path.name}' that the shard "
                    f"does not hold: {absent[:20]}; re-download the shard or fix the index"
                )
            extra = len(infos) - len(names)
            if extra:
                logger.warning("shard '%s' holds %d tensor(s) its index does not list; ignoring them", path, extra)
            self._infos.update((name, info) for name, info in infos.items() if name in names)

    def keys(self) -> list[str]:
        return list(self._infos)

    def _names(self) -> Mapping[str, object]:
        return self._infos

    def _info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise self._unknown(name) from None

    def meta(self, name: str) -> TensorMeta:
        info = self._info(name)
        return TensorMeta(name, info.shape, info.dtype)

    def info(self, name: str) -> TensorInfo | None:
        return self._info(name)

    def mapped(self, path: Path) -> MappedFile:
        """The (cached) mapping of one of this checkpoint's files."""
        mapped = self._mapped.get(path)
        if mapped is None:
            mapped = self._mapped[path] = MappedFile(path)
        return mapped

    def view(self, name: str) -> torch.Tensor:
        info = self._info(name)
        return self.mapped(info.path).view(info)

    def load(
        self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """An owned copy read with positioned reads, not through the mapping.

        Reading into the destination directly keeps the file's pages out of the process
        (a mapped-then-copied tensor would leave its source pages in RSS) and makes one
        copy instead of two when no conversion is needed.
        """
        info = self._info(name)
        raw = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes:
            _read_exact(info.path, info.offset, raw.view(-1).view(torch.uint8).numpy(), self._fds)
        convert = dtype is not None and raw.is_floating_point() and raw.dtype != dtype
        out = raw.to(dtype) if convert else raw
        return out if torch.device(device).type == "cpu" else out.to(device)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for mapped in self._mapped.values():
            mapped.close()
        self._mapped.clear()


def _read_exact(path: Path, offset: int, into: Any, fds: dict[Path, int]) -> None:
    """Fill the writable buffer ``into`` with the bytes of ``path`` from ``offset`` (pread; releases the GIL)."""
    fd = fds.get(path)
    if fd is None:
        try:
            fd = fds[path] = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise CheckpointError(f"cannot open '{path}': {err.strerror or err}") from err
    view = memoryview(into).cast("B")
    done = 0
    while done < len(view):
        try:
            count = os.preadv(fd, [view[done:]], offset + done)
        except OSError as err:
            raise CheckpointError(f"cannot read '{path}' at byte {offset + done}: {err.strerror or err}") from err
        if count == 0:
            raise CheckpointError(f"'{path}' ended at byte {offset + done}, inside a tensor; the file is truncated")
        done += count


__all__ = [
    "SafetensorsCheckpoint",
]
