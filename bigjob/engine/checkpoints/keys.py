"""Key comparison: a model's parameter names and shapes against a checkpoint's tensors.

:func:`compare_keys` reports missing, unexpected and mismatched keys in a
:class:`KeyReport` and detects a prefix that one side carries and the other
lacks; :func:`resolve_name` applies that prefix to a model key.

>>> import tempfile, pathlib, torch
>>> from bigjob.engine.checkpoints.safetensors_writer import write_file
>>> from bigjob.engine.checkpoints.opening import open_checkpoint
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> write_file(folder / "model.safetensors", {"model.w": torch.ones(2, 3)})
>>> with open_checkpoint(folder) as ckpt:
...     report = compare_keys({"w": (2, 3)}, ckpt)
>>> report.ok, report.prefix, resolve_name(report, "w")
(True, 'model.', 'model.w')
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from bigjob.engine.checkpoints.checkpoint import Checkpoint

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
    "KeyReport",
    "PrefixMode",
    "compare_keys",
    "resolve_name",
]
