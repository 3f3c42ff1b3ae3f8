"""Read model checkpoints tensor by tensor, whatever their format.

:func:`open_checkpoint` accepts a ``.safetensors`` file, a sharded
``*.safetensors.index.json``, PyTorch state-dict files (``.bin``/``.pt``/
``.pth``, single or sharded through ``pytorch_model.bin.index.json``) or a
folder holding any of these. The returned :class:`Checkpoint` lists names and
shapes without reading data and loads one tensor at a time.

PyTorch pickles are only ever read with ``torch.load(weights_only=True)``;
anything that needs arbitrary code is refused with
:class:`~bigjob.errors.UnsafeCheckpointError`.

:func:`compare_keys` matches a model's parameter names against a checkpoint
and detects a prefix that one side carries and the other lacks.

>>> import tempfile, pathlib, torch
>>> from bigjob.engine.checkpoints.safetensors_writer import write_file
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> write_file(folder / "model.safetensors", {"model.w": torch.ones(2, 3)})
>>> with open_checkpoint(folder) as ckpt:
...     print(ckpt.format, ckpt.keys(), ckpt.meta("model.w").shape)
...     report = compare_keys({"w": (2, 3)}, ckpt)
safetensors ['model.w'] (2, 3)
>>> report.ok, report.prefix, resolve_name(report, "w")
(True, 'model.', 'model.w')
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import posixpath
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import torch

from bigjob.engine.checkpoints.safetensors_header import TensorInfo, read_header
from bigjob.engine.checkpoints.safetensors_mapping import MappedFile
from bigjob.errors import CheckpointError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_HASH_CHUNK = 16 * 1024 * 1024
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class TensorMeta:
    """Name, shape and dtype of a checkpoint tensor (known without reading its data)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


# --------------------------------------------------------------------------- checkpoints


class Checkpoint:
    """A checkpoint opened for tensor-by-tensor reading; use :func:`open_checkpoint`.

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


# --------------------------------------------------------------------------- torch pickles


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


# --------------------------------------------------------------------------- opening


def _names_by_shard(root: Path, weight_map: Mapping[str, str]) -> dict[Path, set[str]]:
    by_shard: dict[Path, set[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(root / shard, set()).add(name)
    return by_shard


def _read_index(index: Path) -> dict[str, str]:
    try:
        text = index.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read checkpoint index '{index}': {err}") from err
    try:
        data = json.loads(text)
    except ValueError as err:
        raise CheckpointError(
            f"checkpoint index '{index}' is not valid JSON ({err}); re-download it or pass a shard as `checkpoint`"
        ) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if weight_map is None and isinstance(data, dict) and data and all(isinstance(v, str) for v in data.values()):
        weight_map = data  # a bare name -> shard map, as Accelerate's load_checkpoint_in_model accepts
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"checkpoint index '{index}' has no `weight_map` object mapping tensor names to shard files; "
            f"fix the index or pass a single checkpoint file as `checkpoint`"
        )
    return weight_map


def _check_shard_name(index: Path, shard: str) -> None:
    normalized = posixpath.normpath(shard)
    if (
        not shard
        or os.path.isabs(shard)
        or normalized == ".."
        or normalized.startswith("../")
        or normalized == "."
    ):
        raise CheckpointError(
            f"checkpoint index '{index}' names shard {shard!r}, which lies outside the checkpoint folder; "
            f"refusing it: shard names must be relative paths inside '{index.parent}'"
        )


def _open_index(index: Path) -> Checkpoint:
    weight_map = _read_index(index)
    root = index.parent
    shards: list[str] = []
    for shard in dict.fromkeys(weight_map.values()):
        _check_shard_name(index, shard)
        shards.append(shard)
    shards.sort()
    files = [root / shard for shard in shards]
    for shard, path in zip(shards, files):
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint index '{index}' names shard '{shard}', which does not exist in '{root}'; "
                f"download the missing shard or pass a complete checkpoint as `checkpoint`"
            )
    if all(shard.endswith(".safetensors") for shard in shards):
        return SafetensorsCheckpoint(root, files, index, weight_map)
    if all(shard.endswith(_TORCH_SUFFIXES) for shard in shards):
        return TorchCheckpoint(root, files, index, weight_map)
    raise CheckpointError(
        f"checkpoint index '{index}' mixes shard formats ({sorted({Path(s).suffix for s in shards})}); "
        f"all shards must be .safetensors or all .bin/.pt/.pth"
    )


def _open_file(path: Path) -> Checkpoint:
    name = path.name
    if name.endswith(".json"):
        return _open_index(path)
    if name.endswith(".safetensors"):
        return SafetensorsCheckpoint(path.parent, [path])
    if name.endswith(_TORCH_SUFFIXES):
        return TorchCheckpoint(path.parent, [path])
    raise CheckpointError(
        f"checkpoint '{path}' has unsupported type '{path.suffix}'; pass a .safetensors, .bin, .pt or .pth "
        f"file, an *.index.json, or a folder holding them as `checkpoint`"
    )


_LOOKED_FOR = (
    "model.safetensors.index.json, model.safetensors, *.safetensors.index.json, *.safetensors, "
    "pytorch_model.bin.index.json, *.bin.index.json, pytorch_model.bin, *.bin, *.pt, *.pth"
)


def _single(folder: Path, found: list[Path], what: str) -> Path | None:
    if len(found) > 1:
        raise CheckpointError(
            f"checkpoint folder '{folder}' holds {len(found)} {what} files ({[p.name for p in found[:10]]}) and no "
            f"index saying how they fit together; pass one file, or an index, as `checkpoint`"
        )
    return found[0] if found else None


def _choose_in_folder(folder: Path) -> Path:
    entries = sorted(p for p in folder.iterdir() if p.is_file())
    names = {p.name for p in entries}
    for preferred in ("model.safetensors.index.json", "model.safetensors"):
        if preferred in names:
            return folder / preferred
    steps: list[tuple[str, Iterable[str]]] = [
        ("*.safetensors.index.json", (".safetensors.index.json",)),
        ("*.safetensors", (".safetensors",)),
    ]
    for what, suffixes in steps:
        chosen = _single(folder, [p for p in entries if p.name.endswith(tuple(suffixes))], what)
        if chosen is not None:
            return chosen
    if "pytorch_model.bin.index.json" in names:
        return folder / "pytorch_model.bin.index.json"
    torch_indexes = [p for p in entries if p.name.endswith(tuple(s + ".index.json" for s in _TORCH_SUFFIXES))]
    chosen = _single(folder, torch_indexes, "*.bin.index.json")
    if chosen is not None:
        return chosen
    if "pytorch_model.bin" in names:
        return folder / "pytorch_model.bin"
    chosen = _single(folder, [p for p in entries if p.name.endswith(".index.json")], "*.index.json")
    if chosen is not None:
        return chosen
    chosen = _single(folder, [p for p in entries if p.name.endswith(_TORCH_SUFFIXES)], ".bin/.pt/.pth")
    if chosen is not None:
        return chosen
    listing = ", ".join(sorted(names)[:20]) if names else "nothing"
    raise CheckpointError(
        f"checkpoint folder '{folder}' holds no checkpoint files (looked for {_LOOKED_FOR}; found {listing}); "
        f"pass a folder or file holding the weights as `checkpoint`"
    )


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint file, index or folder for tensor-by-tensor reading.

    In a folder the first match wins: ``model.safetensors.index.json``,
    ``model.safetensors``, a single ``*.safetensors.index.json``, a single
    ``*.safetensors``, ``pytorch_model.bin.index.json``, a single
    ``*.bin.index.json``, ``pytorch_model.bin``, a single ``*.index.json``, a single
    ``.bin``/``.pt``/``.pth``. An index is ``{"weight_map": {name: shard}}`` or, as Accelerate
    also accepts, the bare ``{name: shard}`` map.
    Shard names in an index must stay inside the index's folder (symbolic
    links, as in the Hugging Face cache, are followed).

    >>> open_checkpoint("/no/such/place")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    bigjob.errors.CheckpointError: checkpoint '/no/such/place' does not exist; pass an existing ...
    """
    location = Path(path)
    if not location.exists():
        raise CheckpointError(
            f"checkpoint '{location}' does not exist; pass an existing file or folder as `checkpoint`"
        )
    if location.is_dir():
        location = _choose_in_folder(location)
        logger.debug("using checkpoint file '%s'", location)
    return _open_file(location)


# --------------------------------------------------------------------------- key matching

PrefixMode = Literal["checkpoint", "model"]


@dataclass(frozen=True)
class KeyReport:
    """How a model's parameter names match a checkpoint's tensor names.

    ``prefix_mode == "checkpoint"`` means checkpoint keys carry ``prefix`` in
    front of the model's keys (``model.layers.0.w`` for ``layers.0.w``);
    ``"model"`` means the model's keys carry it and the checkpoint's do not.
    Keys that match without the prefix still match (mixed checkpoints).
    """

    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    prefix: str | None = None
    prefix_mode: PrefixMode | None = None
    matched: int = 0
    checkpoint_keys: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """Every model key has a checkpoint tensor of the same shape (unexpected keys are allowed)."""
        return not self.missing and not self.mismatched

    def describe(self, limit: int = 20) -> str:
        """A readable summary listing up to ``limit`` names of each kind."""
        lines = [f"{self.matched} model key(s) found in the checkpoint"]
        if self.prefix is not None:
            if self.prefix_mode == "checkpoint":
                lines.append(
                    f"checkpoint keys carry the prefix '{self.prefix}' that the model's keys lack; "
                    f"model key 'x' is read from checkpoint key '{self.prefix}x'"
                )
            else:
                lines.append(
                    f"model keys carry the prefix '{self.prefix}' that the checkpoint's keys lack; "
                    f"model key '{self.prefix}x' is read from checkpoint key 'x'"
                )

        def listing(title: str, items: list[str]) -> None:
            if items:
                more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
                lines.append(f"{len(items)} {title}: {', '.join(items[:limit])}{more}")

        listing("missing from the checkpoint", self.missing)
        listing("unexpected in the checkpoint", self.unexpected)
        listing(
            "with mismatched shapes (model vs checkpoint)",
            [f"{name} {list(model)} vs {list(ckpt)}" for name, model, ckpt in self.mismatched],
        )
        return "\n".join(lines)


def _mapped_name(
    key: str, prefix: str | None, mode: PrefixMode | None, available: Mapping[str, object] | frozenset[str]
) -> str:
    if prefix is not None:
        if mode == "checkpoint":
            candidate = prefix + key
            if candidate in available:
                return candidate
        elif key.startswith(prefix) and key[len(prefix) :] in available:
            return key[len(prefix) :]
    return key


def resolve_name(report: KeyReport, model_key: str) -> str:
    """The checkpoint key holding ``model_key``, applying the report's prefix mapping.

    >>> r = KeyReport([], [], [], prefix="model.", prefix_mode="model", checkpoint_keys=frozenset({"w"}))
    >>> resolve_name(r, "model.w"), resolve_name(r, "lm_head.w")
    ('w', 'lm_head.w')
    """
    return _mapped_name(model_key, report.prefix, report.prefix_mode, report.checkpoint_keys)


def _candidate_prefixes(keys: list[str]) -> list[str]:
    """Leading 1- or 2-component prefixes (with their dot) carried by at least half of ``keys``."""
    counts: Counter[str] = Counter()
    for key in keys:
        parts = key.split(".", 2)
        if len(parts) >= 2:
            counts[parts[0] + "."] += 1
        if len(parts) == 3:
            counts[parts[0] + "." + parts[1] + "."] += 1
    return [prefix for prefix, count in counts.most_common(8) if 2 * count >= len(keys)]


def compare_keys(expected: Mapping[str, tuple[int, ...]], checkpoint: Checkpoint) -> KeyReport:
    """Compare model parameter names and shapes with a checkpoint's tensors.

    When one prefix, added to or stripped from the model's keys, matches
    (almost, >= 90 %) all keys and more than the plain names do, it is
    reported and applied (see :func:`resolve_name`).
    """
    shapes = {name: checkpoint.meta(name).shape for name in checkpoint.keys()}
    model_keys = list(expected)
    available = frozenset(shapes)
    best: tuple[int, str | None, PrefixMode | None] = (sum(1 for k in model_keys if k in shapes), None, None)
    if best[0] < len(model_keys) and shapes:
        modes: list[tuple[PrefixMode, list[str]]] = [
            ("checkpoint", _candidate_prefixes(list(shapes))),
            ("model", _candidate_prefixes(model_keys)),
        ]
        direct = best[0]
        for mode, prefixes in modes:
            for prefix in prefixes:
                score = sum(1 for k in model_keys if _mapped_name(k, prefix, mode, available) in shapes)
                if score > best[0]:
                    best = (score, prefix, mode)
        if best[1] is not None and (best[0] < 0.9 * min(len(model_keys), len(shapes)) or best[0] <= direct):
            best = (direct, None, None)
    _, prefix, mode = best

    missing: list[str] = []
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    used: set[str] = set()
    for key in model_keys:
        target = _mapped_name(key, prefix, mode, available)
        if target not in shapes:
            missing.append(key)
            continue
        used.add(target)
        model_shape = tuple(int(d) for d in expected[key])
        if model_shape != shapes[target]:
            mismatched.append((key, model_shape, shapes[target]))
    unexpected = [name for name in shapes if name not in used]
    return KeyReport(
        missing=missing,
        unexpected=unexpected,
        mismatched=mismatched,
        prefix=prefix,
        prefix_mode=mode,
        matched=len(model_keys) - len(missing),
        checkpoint_keys=available,
    )


__all__ = [
    "Checkpoint",
    "KeyReport",
    "SafetensorsCheckpoint",
    "TensorMeta",
    "TorchCheckpoint",
    "compare_keys",
    "load_torch_file",
    "open_checkpoint",
    "resolve_name",
]
