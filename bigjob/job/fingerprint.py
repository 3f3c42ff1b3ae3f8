"""Cache keys as pure functions: sha256 over canonical JSON of everything that decides a result.

* :func:`plan_fingerprint` keys a device map. Every input that changes the plan is in
  :class:`PlanInputs` (model class and kwargs, every tensor's name/shape/dtype and which
  names share a tensor, target and per-tensor dtypes, budgets in bytes, strategy,
  no-split classes, prefetch depth, the working memory kept free, strict budgets, the offload
  compression, the devices present with their total memory, the checkpoint's identity, the planner
  version); nothing else is.
* :func:`offload_fingerprint` keys an offload folder: the checkpoint, the tensors, their
  target dtypes, which modules live on disk and how their weights are compressed.
* :func:`job_key` keys a whole job's resolved config (resume and sweep skipping).
* :func:`working_memory_key` keys a forward's estimated working memory.

Keys are stable across processes and machines (no ``hash()``, no object ids, sorted
JSON) and carry a version, so a change of format never serves an old entry.

>>> inputs = PlanInputs(model_class="m.Net", model_kwargs={"width": 8},
...     tensors=[("w", (8, 8), "float32", "w")], dtype="float16", special_dtypes={},
...     budgets={"cpu": 1024, "disk": 2**62}, strategy="auto", no_split=["Block"], prefetch=1,
...     devices=[{"device": "cpu", "total_bytes": 2**34}], checkpoint={"files": []}, planner_version="1")
>>> key = plan_fingerprint(inputs)
>>> len(key), key == plan_fingerprint(inputs)
(64, True)
>>> key == plan_fingerprint(dataclasses.replace(inputs, budgets={"cpu": 2048, "disk": 2**62}))
False
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = [
    "FINGERPRINT_VERSION",
    "OffloadInputs",
    "PlanInputs",
    "canonical_json",
    "device_signature",
    "job_key",
    "offload_fingerprint",
    "plan_fingerprint",
    "plan_key_of",
    "tensor_signature",
]

# Bump when the meaning of any field changes: old cache entries then simply miss.
# 2: a plan key hashes PlanInputs.describe() (tensors as count + full sha256), so it can be
#    recomputed from a cache entry alone (plan export/import checks it).
FINGERPRINT_VERSION = 2

TensorSig = tuple[str, tuple[int, ...], str, str]  # name, shape, dtype, name of the tensor it shares storage with


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace; tuples become lists.

    >>> canonical_json({"b": (1, 2), "a": None})
    '{"a":null,"b":[1,2]}'
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _sha256(kind: str, payload: Any) -> str:
    text = canonical_json({"kind": kind, "version": FINGERPRINT_VERSION, "payload": payload})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tensor_signature(model: nn.Module) -> list[TensorSig]:
    """Name, shape, dtype and tie group of every parameter and buffer, in registration order.

    Works on an empty (meta) model. A tied parameter appears under each of its names, the
    fourth field naming the first one, so tying or untying weights changes the signature.

    >>> lin = nn.Linear(2, 3)
    >>> tensor_signature(lin)[0]
    ('weight', (3, 2), 'float32', 'weight')
    """
    first_name: dict[int, str] = {}
    out: list[TensorSig] = []
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        owner = first_name.setdefault(id(tensor), name)
        out.append((name, tuple(int(d) for d in tensor.shape), str(tensor.dtype).removeprefix("torch."), owner))
    return out


def device_signature(inventory: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The parts of a device inventory that a plan depends on: names and total memory.

    Free memory moves from run to run; it enters the key only through the budgets.

    >>> device_signature([{"device": "cpu", "total_bytes": 8, "free_bytes": 3}])
    [{'device': 'cpu', 'total_bytes': 8}]
    """
    return sorted(({"device": str(d["device"]), "total_bytes": int(d["total_bytes"])} for d in inventory), key=lambda d: d["device"])


@dataclass(frozen=True)
class PlanInputs:
    """Everything a device map depends on."""

    model_class: str
    model_kwargs: Mapping[str, Any]
    tensors: Sequence[TensorSig]
    dtype: str | None  # None: each tensor's stored dtype
    special_dtypes: Mapping[str, str]
    budgets: Mapping[str, int]  # bytes per canonical device
    strategy: str
    no_split: Sequence[str]
    prefetch: int
    devices: Sequence[Mapping[str, Any]]
    checkpoint: Mapping[str, Any]
    planner_version: str
    working_memory: int = 0  # bytes kept free on the executing device for the forward
    strict_budget: bool = False  # an error, not a fallback, where budgets are too small to stream with prefetch
    offload_compression: str = "none"  # streamed tiers count compressed bytes (bigjob.engine.plan.compression)

    def to_json(self) -> dict[str, Any]:
        """The inputs as canonical JSON data (no-split classes as a sorted set)."""
        data = dataclasses.asdict(self)
        if self.offload_compression == "none":
            del data["offload_compression"]  # plans made before it existed keep their keys
        if not self.working_memory:
            del data["working_memory"]  # plans made before it existed keep their keys
        if not self.strict_budget:
            del data["strict_budget"]  # likewise: every plan made before served the budgets strict_budget=True does
        data["tensors"] = [list(t[:1]) + [list(t[1])] + list(t[2:]) for t in self.tensors]
        data["no_split"] = sorted(set(self.no_split))
        data["devices"] = device_signature(self.devices)
        return json.loads(canonical_json(data))

    def describe(self) -> dict[str, Any]:
        """The inputs as JSON with the tensor list as a count and its sha256: what plan keys hash."""
        data = self.to_json()
        tensors = data.pop("tensors")
        data["tensors"] = {"count": len(tensors), "sha256": hashlib.sha256(canonical_json(tensors).encode()).hexdigest()}
        return data


def plan_fingerprint(inputs: PlanInputs) -> str:
    """The sha256 hex key of the device map ``inputs`` determine."""
    return plan_key_of(inputs.describe())


def plan_key_of(described: Mapping[str, Any]) -> str:
    """The plan key of :meth:`PlanInputs.describe` data, as a plan cache entry stores it under ``inputs``.

    Lets an entry read from elsewhere (``bigjob-cache import``) be checked against its key.

    >>> plan_key_of({"strategy": "auto"}) == plan_key_of({"strategy": "balanced"})
    False
    """
    return _sha256("plan", described)


@dataclass(frozen=True)
class OffloadInputs:
    """Everything the content of an offload folder depends on."""

    checkpoint: Mapping[str, Any]
    tensors: Sequence[TensorSig]
    dtype: str | None
    special_dtypes: Mapping[str, str]
    disk_modules: Sequence[str]  # device-map keys placed on "disk"
    offload_buffers: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)
    compression: str = "none"  # placement.offload_compression: the disk tier's Linear weights stored quantized

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.compression == "none":
            del data["compression"]  # folders built before it existed keep their keys
        data["tensors"] = [list(t[:1]) + [list(t[1])] + list(t[2:]) for t in self.tensors]
        data["disk_modules"] = sorted(set(self.disk_modules))
        return json.loads(canonical_json(data))


def offload_fingerprint(inputs: OffloadInputs) -> str:
    """The sha256 hex key of an offload folder's content.

    >>> a = OffloadInputs({"files": []}, [("w", (2,), "float32", "w")], "float16", {}, ["blocks.1"])
    >>> offload_fingerprint(a) == offload_fingerprint(dataclasses.replace(a, dtype="bfloat16"))
    False
    >>> offload_fingerprint(a) == offload_fingerprint(dataclasses.replace(a, compression="int8"))
    False
    """
    return _sha256("offload", inputs.to_json())


# Keys that change how a job is shown or scheduled, never what it computes.
_PRESENTATION_KEYS = ("quiet", "skip_completed", "runner")


def working_memory_key(forward: Mapping[str, Any]) -> str:
    """The sha256 hex key of an estimated working memory: the model, its tensors and dtypes, the forward's inputs, the versions tracing it."""
    return _sha256("working", dict(forward))


def job_key(resolved_config: Mapping[str, Any]) -> str:
    """The sha256 hex key of a job's resolved config, ignoring presentation-only keys.

    >>> job_key({"data": {"batch_size": 4}, "quiet": True}) == job_key({"data": {"batch_size": 4}, "quiet": False})
    True
    >>> job_key({"data": {"batch_size": 4}}) == job_key({"data": {"batch_size": 8}})
    False
    >>> job_key({"cache": {"dir": None, "max_size": "5GB"}}) == job_key({"cache": {"dir": None}})
    True
    >>> job_key({"placement": {"offload_compression": "none"}}) == job_key({"placement": {}})
    True
    >>> job_key({"placement": {"offload_compression": "int8"}}) == job_key({"placement": {}})
    False
    """
    data = {k: v for k, v in resolved_config.items() if k not in _PRESENTATION_KEYS}
    if isinstance(data.get("cache"), Mapping):  # how big the cache may grow: housekeeping, not the job
        data["cache"] = {k: v for k, v in data["cache"].items() if k != "max_size"}
    placement = data.get("placement")
    if isinstance(placement, Mapping) and placement.get("offload_compression") == "none":
        data["placement"] = {k: v for k, v in placement.items() if k != "offload_compression"}  # jobs run before it keep their keys
    return _sha256("job", data)
