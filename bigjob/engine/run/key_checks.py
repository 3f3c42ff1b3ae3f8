"""Checking a checkpoint against a model before anything is loaded: its keys, shapes and dtypes.

Every problem with the keys is found from the checkpoint's headers and reported at once in
one :class:`~bigjob.errors.CheckpointError`: missing keys (an error: nothing is left silently
on ``meta``), shape and dtype-kind mismatches (errors), unexpected keys (a warning, an error
with ``strict=True``), and a prefix such as ``model.`` that explains a mismatch (applied, and
said at INFO). :func:`checkpoint_dtype` and :func:`stored_dtypes` say which dtypes a load that
keeps the checkpoint's own dtype gives each tensor.

>>> import tempfile
>>> from pathlib import Path
>>> from torch import nn
>>> from bigjob.engine.checkpoints.opening import open_checkpoint
>>> from bigjob.engine.checkpoints.safetensors_writer import write_file
>>> path = Path(tempfile.mkdtemp()) / "m.safetensors"
>>> write_file(path, nn.Linear(3, 2).state_dict())
>>> with open_checkpoint(path) as ckpt:
...     check_checkpoint(nn.Linear(3, 2), ckpt)  # its own model: nothing to say
...     try:
...         check_checkpoint(nn.Linear(4, 2), ckpt)
...     except CheckpointError as err:
...         print("mismatched shapes" in str(err), "weight [2, 4] vs [2, 3]" in str(err))
True True
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping

import torch
from torch import nn

from bigjob.engine.checkpoints.checkpoint import Checkpoint

from bigjob.engine.checkpoints.keys import KeyReport, compare_keys, resolve_name
from bigjob.engine.plan.dtypes import resolve_dtype
from bigjob.engine.plan.inventory import Inventory, build_inventory
from bigjob.errors import CheckpointError

__all__ = ["check_checkpoint", "check_keys", "check_unsaved_buffers", "checkpoint_dtype", "stored_dtypes"]

log = logging.getLogger(__name__)


def checkpoint_dtype(checkpoint: Checkpoint) -> torch.dtype | None:
    """The floating dtype holding most of the checkpoint's bytes (its "own" dtype), or ``None``."""
    totals: dict[torch.dtype, int] = {}
    for name in checkpoint.keys():
        meta = checkpoint.meta(name)
        if meta.dtype.is_floating_point:
            count = 1
            for dim in meta.shape:
                count *= dim
            totals[meta.dtype] = totals.get(meta.dtype, 0) + count * meta.dtype.itemsize
    return max(totals, key=lambda d: totals[d]) if totals else None


def check_keys(inventory: Inventory, checkpoint: Checkpoint, strict: bool) -> tuple[KeyReport, dict[str, str]]:
    """Match every persistent tensor to a checkpoint key; raise with every problem found at once."""
    expected: dict[str, tuple[int, ...]] = {}
    for record in inventory.tensors.values():
        if record.persistent:
            for name in (record.name, *record.aliases):
                expected[name] = tuple(record.shape)
    report = compare_keys(expected, checkpoint)
    missing = set(report.missing)
    source: dict[str, str] = {}
    really_missing: list[str] = []
    for record in inventory.tensors.values():
        if not record.persistent:
            continue
        names = (record.name, *record.aliases)
        present = [n for n in names if n not in missing]
        if present:
            source[record.name] = resolve_name(report, present[0])
        else:
            really_missing.append(record.name)
    # A tied tensor found under one of its names is not missing under the others.
    tied_found = {n for r in inventory.tensors.values() if r.name in source for n in r.aliases}
    unexpected = [n for n in report.unexpected if n not in tied_found]
    problems: list[str] = []
    if report.prefix is not None:
        log.info(
            "checkpoint keys and model keys differ by the prefix %r (%s side); mapping them",
            report.prefix,
            report.prefix_mode,
        )
    if really_missing:
        problems.append(_listing("missing from the checkpoint", really_missing))
    mismatched = report.mismatched
    if mismatched:
        problems.append(
            _listing(
                "with mismatched shapes (model vs checkpoint)",
                [f"{name} {list(model)} vs {list(ckpt)}" for name, model, ckpt in mismatched],
            )
        )
    kinds = []
    for name, key in source.items():
        record = inventory.tensors[name]
        stored = checkpoint.meta(key).dtype
        if record.dtype.is_floating_point != stored.is_floating_point or (
            not record.dtype.is_floating_point and record.dtype != stored
        ):
            kinds.append(f"{name} model {record.dtype} vs checkpoint {stored}")
    if kinds:
        problems.append(_listing("with dtypes the model cannot take", kinds))
    if unexpected and strict:
        problems.append(_listing("unexpected in the checkpoint (strict=True)", unexpected))
    if problems:
        hint = ""
        if report.prefix is not None:
            hint = f" (checkpoint and model keys differ by the prefix {report.prefix!r}, already applied)"
        raise CheckpointError(
            f"checkpoint '{checkpoint.root}' does not match the model{hint}: " + "; ".join(problems) + "; "
            "pass the checkpoint of this model as `checkpoint`, or strict=False to ignore unexpected keys"
        )
    if unexpected:
        log.warning("%s", _listing("unexpected keys in the checkpoint, ignored", unexpected))
    return report, source


def stored_dtypes(
    inventory: Inventory,
    ckpt: Checkpoint,
    source: Mapping[str, str],
    target: torch.dtype | None,
    special_dtypes: Mapping[str, torch.dtype | str] | None,
) -> dict[str, torch.dtype]:
    """Floating tensors stored in another floating dtype than ``target`` (and not chosen by ``special_dtypes``)."""
    keys = list(special_dtypes or ())
    out: dict[str, torch.dtype] = {}
    for record in inventory.tensors.values():
        key = source.get(record.name)
        if key is None or not record.dtype.is_floating_point:
            continue
        stored = ckpt.meta(key).dtype
        if stored == target or not stored.is_floating_point:
            continue
        if not any(_selected(name, keys) for name in (record.name, *record.aliases)):
            out[record.name] = stored
    return out


def _selected(name: str, keys: list[str]) -> bool:
    """Whether a ``special_dtypes`` key (a module or tensor name, or a glob) applies to tensor ``name``."""
    prefix = name
    while True:
        if any(prefix == key or fnmatch.fnmatchcase(prefix, key) for key in keys):
            return True
        if not prefix:
            return False
        prefix = prefix.rpartition(".")[0]


def check_unsaved_buffers(inventory: Inventory, source: Mapping[str, str], modules: Mapping[str, nn.Module]) -> None:
    """Non-persistent buffers come from the model itself: fail before loading anything if it has no value for one."""
    unset = []
    for record in inventory.tensors.values():
        if record.name in source:
            continue
        owner, _, local = record.name.rpartition(".")
        current = modules[owner]._buffers.get(local)
        if current is None or current.is_meta:
            unset.append(record.name)
    if unset:
        raise CheckpointError(
            f"{_listing('buffers that checkpoints do not save and the model holds no value for', unset)} "
            "(built with include_buffers=True?); build the model with init_empty_weights(include_buffers=False)"
        )


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)} {title}: {', '.join(items[:limit])}{more}"


def check_checkpoint(
    model: nn.Module,
    checkpoint: Checkpoint,
    dtype: torch.dtype | str | None = None,
    special_dtypes: Mapping[str, torch.dtype | str] | None = None,
    strict: bool = False,
) -> None:
    """Raise the :class:`CheckpointError` that loading ``checkpoint`` into ``model`` would raise about its keys.

    The same checks as :func:`load_checkpoint_in_model` (missing keys, shapes, dtypes the model
    cannot take, unexpected keys with ``strict``), from the checkpoint's headers alone: a job
    runs them before it plans, caches or loads anything.
    """
    target = resolve_dtype(dtype)
    inventory = build_inventory(model, target if target is not None else checkpoint_dtype(checkpoint), special_dtypes)
    check_keys(inventory, checkpoint, strict)
