"""The PyTorch checkpoint: state-dict files read with ``torch.load(weights_only=True)``, one shard at a time.

PyTorch pickles are only ever read with ``torch.load(weights_only=True)``;
anything that needs arbitrary code is refused with
:class:`~bigjob.errors.UnsafeCheckpointError` by :func:`load_torch_file`.
:class:`TorchCheckpoint` keeps one shard's state dict at a time.

>>> import tempfile, pathlib, torch
>>> path = pathlib.Path(tempfile.mkdtemp()) / "pytorch_model.bin"
>>> torch.save({"w": torch.ones(2)}, path)
>>> with TorchCheckpoint(path.parent, [path]) as ckpt:
...     print(ckpt.format, ckpt.keys(), ckpt.meta("w").shape)
torch ['w'] (2,)
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from bigjob.engine.checkpoints.checkpoint import Checkpoint, TensorMeta
from bigjob.engine.checkpoints.index import _names_by_shard
from bigjob.errors import CheckpointError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_ZIP_MAGIC = b"PK\x03\x04"


class TorchCheckpoint(Checkpoint):
    """PyTorch state-dict backend: ``torch.load(weights_only=True, mmap=True)``, one shard at a time.

    Only one shard's state dict is referenced at a time; shapes and dtypes of
    every shard seen are remembered so :meth:`meta` rarely reloads.
    """

    format = "torch"

    def __init__(
        self,
        root: Path,
        files: list[Path],
        index_file: Path | None = None,
        weight_map: dict[str, str] | None = None,
    ) -> None:
        super().__init__(root, files, index_file, weight_map)
        self._wanted = _names_by_shard(root, weight_map) if weight_map is not None else None
        self._shard_of: dict[str, Path] = (
            {name: root / shard for name, shard in weight_map.items()} if weight_map is not None else {}
        )
        self._metas: dict[str, TensorMeta] = {}
        self._scanned: dict[Path, list[str]] = {}
        self._current: tuple[Path, dict[str, torch.Tensor]] | None = None
        if weight_map is None:
            self._shard(files[0])  # one file: read its pickle now so bad files fail at open

    def _shard(self, path: Path) -> dict[str, torch.Tensor]:
        if self._current is not None and self._current[0] == path:
            return self._current[1]
        self._current = None  # drop the previous shard before loading the next
        tensors = load_torch_file(path)
        wanted = self._wanted.get(path) if self._wanted is not None else None
        if wanted is not None:
            absent = sorted(wanted.difference(tensors))
            if absent:
                raise CheckpointError(
                    f"index '{self.index_file}' lists {len(absent)} tensor(s) in shard '{path.name}' that the "
                    f"shard does not hold: {absent[:20]}; re-download the shard or fix the index"
                )
            extra = len(tensors) - len(wanted)
            if extra:
                logger.warning("shard '%s' holds %d tensor(s) its index does not list; ignoring them", path, extra)
            tensors = {name: t for name, t in tensors.items() if name in wanted}
        if path not in self._scanned:
            self._scanned[path] = list(tensors)
            for name, tensor in tensors.items():
                self._metas[name] = TensorMeta(name, tuple(tensor.shape), tensor.dtype)
        self._current = (path, tensors)
        return tensors

    def _scan_all(self) -> None:
        for path in self._files:
            if path not in self._scanned:
                self._shard(path)

    def keys(self) -> list[str]:
        self._scan_all()
        return [name for path in self._files for name in self._scanned[path]]

    def _names(self) -> Mapping[str, object]:
        if self._weight_map is not None:
            return self._weight_map
        self._scan_all()
        return self._metas

    def _path_of(self, name: str) -> Path:
        if self._weight_map is None:
            self._scan_all()
            if name not in self._metas:
                raise self._unknown(name)
            return self._files[0]
        try:
            return self._shard_of[name]
        except KeyError:
            raise self._unknown(name) from None

    def meta(self, name: str) -> TensorMeta:
        meta = self._metas.get(name)
        if meta is None:
            self._shard(self._path_of(name))
            meta = self._metas[name]
        return meta

    def view(self, name: str) -> torch.Tensor:
        """The tensor as ``torch.load(mmap=True)`` returned it (zero-copy, file-backed).

        For legacy (pre-zip) files it is an in-memory tensor of the loaded shard.
        """
        return self._shard(self._path_of(name))[name].detach()

    def close(self) -> None:
        self._current = None


def _weights_only_reason(message: str) -> str:
    """The part of torch's weights_only error that says what was refused (without its advice)."""
    reason = message.split("WeightsUnpickler error:", 1)[-1]
    for cut in ("Please use `torch.serialization", "Check the documentation"):
        reason = reason.split(cut, 1)[0]
    return " ".join(reason.split()) or "unknown reason"


_REFUSAL_MARKERS = ("GLOBAL", "allowlist", "add_safe_globals", "Can only")


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """Load one PyTorch state-dict file safely and return its tensors.

    Uses ``torch.load(map_location="cpu", weights_only=True, mmap=True)`` (the
    tensors are file-backed, not copied into memory); legacy non-zip files
    cannot be mapped and are loaded with ``mmap=False``, still weights-only.
    Non-tensor entries are dropped with a debug log.
    """
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint file '{path}': {err.strerror or err}") from err
    use_mmap = magic == _ZIP_MAGIC
    if not use_mmap:
        logger.info("'%s' is not a zip-format torch.save file; loading it into memory (no mmap)", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as err:
        reason = _weights_only_reason(str(err))
        never = (
            "bigjob never loads pickles with weights_only=False; convert the checkpoint to safetensors in an "
            "environment you trust, or pass a different file as `checkpoint`"
        )
        if any(marker in reason for marker in _REFUSAL_MARKERS):
            raise UnsafeCheckpointError(
                f"checkpoint file '{path}' was refused: loading it would run code that "
                f"torch.load(weights_only=True) does not allow ({reason}); {never}"
            ) from None
        raise CheckpointError(
            f"checkpoint file '{path}' is corrupt or not a PyTorch state dict: torch.load(weights_only=True) "
            f"failed ({reason}); {never}"
        ) from None
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError/EOFError/... for broken files
        raise CheckpointError(
            f"checkpoint file '{path}' could not be read by torch.load(weights_only=True): "
            f"{type(err).__name__}: {err}; re-download it or pass a different file as `checkpoint`"
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint file '{path}' holds a {type(obj).__name__}, not a state dict; "
            f"pass a file saved from model.state_dict() as `checkpoint`"
        )
    tensors: dict[str, torch.Tensor] = {}
    nested = []
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            logger.debug("ignoring non-tensor entry %r (%s) in '%s'", key, type(value).__name__, path)
            if isinstance(value, Mapping):
                nested.append(key)
    if not tensors and nested:
        raise CheckpointError(
            f"checkpoint file '{path}' holds no tensors at its top level, only nested dicts under {nested[:10]}; "
            f"save the state dict itself (e.g. torch.save(obj[{nested[0]!r}], ...)) and pass that as `checkpoint`"
        )
    return tensors


__all__ = [
    "TorchCheckpoint",
    "load_torch_file",
]
