"""Opening a checkpoint: which file of a folder, which format, and the shards an index names.

:func:`open_checkpoint` accepts a ``.safetensors`` file, a sharded
``*.safetensors.index.json``, PyTorch state-dict files (``.bin``/``.pt``/
``.pth``, single or sharded through ``pytorch_model.bin.index.json``) or a
folder holding any of these, and returns the :class:`~.checkpoint.Checkpoint`
of that format.

>>> import tempfile, pathlib, torch
>>> from bigjob.engine.checkpoints.safetensors_writer import write_file
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> write_file(folder / "model.safetensors", {"model.w": torch.ones(2, 3)})
>>> with open_checkpoint(folder) as ckpt:
...     print(ckpt.format, ckpt.keys(), ckpt.meta("model.w").shape)
safetensors ['model.w'] (2, 3)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from bigjob.engine.checkpoints.checkpoint import Checkpoint
from bigjob.engine.checkpoints.index import _check_shard_name, _read_index
from bigjob.engine.checkpoints.safetensors_checkpoint import SafetensorsCheckpoint
from bigjob.engine.checkpoints.torch_checkpoint import _TORCH_SUFFIXES, TorchCheckpoint
from bigjob.errors import CheckpointError

logger = logging.getLogger(__name__)


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


__all__ = [
    "open_checkpoint",
]
