"""The checkpoint index: a ``*.index.json`` whose ``weight_map`` names the shard holding each tensor.

An index is ``{"weight_map": {name: shard}}`` or, as Accelerate also accepts,
the bare ``{name: shard}`` map. Shard names must be relative paths inside the
index's folder. These helpers read and check an index;
:mod:`.opening` turns it into a checkpoint.

>>> import json, tempfile, pathlib
>>> index = pathlib.Path(tempfile.mkdtemp()) / "model.safetensors.index.json"
>>> _ = index.write_text(json.dumps({"weight_map": {"a": "one.safetensors", "b": "one.safetensors"}}))
>>> weight_map = _read_index(index)
>>> {path.name: sorted(names) for path, names in _names_by_shard(index.parent, weight_map).items()}
{'one.safetensors': ['a', 'b']}
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Mapping
from pathlib import Path

from bigjob.errors import CheckpointError


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
