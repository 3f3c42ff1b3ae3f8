"""The files a dispatched model's weights are mapped from, and whether one was changed in place.

Zero-copy weights (the disk tier, and the CPU tier where the checkpoint's dtype is the one
run) are views of memory-mapped checkpoint files. Rewriting such a file *in place* (saving a
checkpoint over the old one with ``open(path, "wb")``, as most savers do) changes the bytes
under the running model: some layers would compute with new weights and some with old, and
a file that shrank makes the next read of its missing pages kill the process with
``SIGBUS``. Replacing the file by renaming a new one over it, or deleting it, is harmless:
the mapping keeps the old file's pages.

:class:`Sources` records each backing file's identity and size and modification time at
dispatch; :meth:`Sources.check`, called before and after every forward, raises a
:class:`~bigjob.errors.CheckpointError` naming the file once it was changed in place. The
check after the forward fails a forward during which a file changed, so that its output (part
old weights, part new) is never returned. The check is one ``stat`` a file (microseconds), so a
model over hundreds of shards pays well under a millisecond a forward.

>>> Sources.of([]).paths
[]
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from bigjob.engine.tiers.folios import file_mappings
from bigjob.errors import CheckpointError

__all__ = ["Sources"]


@dataclass(frozen=True)
class _Stamp:
    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, status: os.stat_result) -> _Stamp:
        return cls(status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


@dataclass
class Sources:
    """Files backing a model's mapped weights, each with what it was at dispatch."""

    stamps: dict[str, _Stamp] = field(default_factory=dict)

    @property
    def paths(self) -> list[str]:
        return sorted(self.stamps)

    @classmethod
    def of(cls, tensors: Iterable[torch.Tensor]) -> Sources:
        """The files that the CPU ``tensors`` which are views of file mappings come from (Linux; else none)."""
        mappings = file_mappings(t.data_ptr() for t in tensors if t.device.type == "cpu" and t.numel() > 0)
        stamps: dict[str, _Stamp] = {}
        for path, inode in {(m.path, m.inode) for m in mappings.values()}:
            try:
                status = os.stat(path)
            except OSError:
                continue  # deleted already (the path reads "... (deleted)"): nothing can change it
            if status.st_ino == inode:  # else the path already names another file: ours is unaffected
                stamps[path] = _Stamp.of(status)
        return cls(stamps)

    def check_since(self, checked: dict[str, tuple[int, int, int, int]]) -> None:
        """Raise :class:`CheckpointError` if a file mapped now is not what it was when ``checked`` was taken
        (``(device, inode, size, mtime)`` by real path: an offload folder's files when its check passed).

        The check of a folder and the mapping of its files are apart by the whole load: a file
        changed in between would be stamped as it is now, and never be found changed.
        """
        for path, stamp in self.stamps.items():
            then = checked.get(path)
            if then is not None and then != (stamp.device, stamp.inode, stamp.size, stamp.mtime_ns):
                raise CheckpointError(
                    f"weight file '{path}' was changed while the model loaded, after its offload folder was checked; "
                    "load the model again: the folder is checked again then, and rebuilt if it is damaged"
                )

    def check(self) -> None:
        """Raise :class:`CheckpointError` if a backing file was changed in place since :meth:`of`."""
        for path, stamp in self.stamps.items():
            try:
                now = _Stamp.of(os.stat(path))
            except OSError:
                continue  # deleted: the mapping keeps the old file alive
            if (now.device, now.inode) != (stamp.device, stamp.inode) or now == stamp:
                continue  # replaced by another file (renamed over it), or unchanged
            change = (f"its size went from {stamp.size} to {now.size} bytes" if now.size != stamp.size
                      else "it was modified, same size")
            raise CheckpointError(
                f"checkpoint file '{path}' was changed in place since the model was loaded ({change}); "
                "the weights mapped from it are no longer the ones loaded, and pages cut off by a "
                "shrinking file would crash the process. Load the model again. To update a checkpoint "
                "that running jobs use, write the new file beside it and rename it over the old one."
            )
