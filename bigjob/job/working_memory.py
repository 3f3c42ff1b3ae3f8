"""``placement.working_memory``: the bytes a plan keeps free of weights on the executing device for the forward.

A size is taken as given; ``auto`` estimates the largest batch's forward (a traced run on
PyTorch's fake tensors: 0.25 s for a 24-layer decoder, no memory allocated) and caches the
estimate under the model, its tensors, the dtypes, the forward's inputs and the library
versions that trace it.

>>> describe_forward((torch.zeros(2, 3, dtype=torch.long),), {"use_cache": False})
{'args': [{'shape': [2, 3], 'dtype': 'torch.int64'}], 'kwargs': {'use_cache': False}}
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

import torch

from bigjob.errors import ConfigError
from bigjob.job.cache import JobCache
from bigjob.job.checked_job import CheckedJob
from bigjob.job.fingerprint import PlanInputs, working_memory_key
from bigjob.job.report import versions

__all__ = ["describe_forward", "working_memory_bytes"]

logger = logging.getLogger(__name__)


def describe_forward(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A forward call as JSON (part of the estimate's cache key): tensors by shape and dtype, other values as they are."""

    def one(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {"shape": list(value.shape), "dtype": str(value.dtype)}
        return value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)

    return {"args": [one(a) for a in args], "kwargs": {k: one(v) for k, v in sorted(kwargs.items())}}


def working_memory_bytes(job: CheckedJob, inputs: PlanInputs, cache: JobCache | None) -> int:
    """Bytes ``placement.working_memory`` keeps free: a size as given, or ``auto``'s estimate for the largest batch.

    ``inputs`` are the plan's other inputs: the estimate is cached under the model and dtypes they name.
    """
    from bigjob.engine.plan.devices import parse_size

    setting = job.cfg.placement.working_memory
    if setting is None:
        return 0
    if setting != "auto":
        return parse_size(setting, key="placement.working_memory")
    if not job.batches:
        return 0
    return _estimate(job, inputs, cache)


def _estimate(job: CheckedJob, inputs: PlanInputs, cache: JobCache | None) -> int:
    """``auto``: the traced working memory of the largest batch's forward, computed once per key across processes."""
    from bigjob.engine.plan.devices import format_size
    from bigjob.engine.plan.working_memory import ESTIMATE_VERSION, estimate_working_memory

    model, task = job.model, job.task
    shape = max((tuple(b.input_ids.shape) for b in job.batches), key=lambda rows_tokens: rows_tokens[0] * rows_tokens[1])
    args, kwargs = task.forward_for(model, shape)
    forward = {"task": task.name, **describe_forward(args, kwargs)}

    def compute() -> dict[str, Any]:
        try:
            estimate = estimate_working_memory(model, *args, dtype=job.dtypes.dtype, **kwargs)
        except ConfigError as err:
            raise ConfigError(f"placement.working_memory=auto: {err} (placement.working_memory=200MiB, say)") from None
        return {"kind": "working", "bytes": estimate, "forward": forward}

    if cache is None:
        entry, hit = compute(), False
    else:
        described = inputs.describe()
        identity = {name: described[name] for name in ("model_class", "model_kwargs", "tensors", "dtype", "special_dtypes")}
        traced_by = {**versions(), "estimate": ESTIMATE_VERSION}
        if "transformers" in sys.modules:  # the model code that is traced
            traced_by["transformers"] = getattr(sys.modules["transformers"], "__version__", "unknown")
        key = working_memory_key({**identity, "forward": forward, "versions": traced_by})
        entry, hit = cache.compute_once(f"working:{key}", compute)
    logger.info(
        "working memory of the largest batch %s: %s (placement.working_memory=auto, %s)",
        shape, format_size(entry["bytes"]), "from the cache" if hit else "estimated",
    )
    return int(entry["bytes"])
