"""Hugging Face Transformers model folders, served by bigjob's own planner, loader and dispatcher.

:func:`from_pretrained` is the one-call path::

    model = from_pretrained("/models/llama", max_memory={"cpu": "8GiB"}, dtype="auto")

It builds the model class named by ``config.architectures`` under bigjob's
:func:`~bigjob.engine.plan.empty.init_empty_weights` (no memory), keeps tied embeddings
tied, takes the no-split classes from the class's ``_no_split_modules``, then loads and
dispatches with :func:`~bigjob.engine.run.entry_points.load_checkpoint_and_dispatch` (not
Transformers' ``device_map`` path) and returns the model in ``eval()`` mode. The steps are
separate functions so the job runner can cache the plan between them: the folder and its
config (:mod:`bigjob.models.hf_folder`), what to plan with (:mod:`bigjob.models.hf_planning`),
the empty model and its loading (here); the tokenizer and generation ids are in
:mod:`bigjob.models.hf_tokens`.

Transformers is an optional extra (``pip install ".[hf]"`` in bigjob's folder); this module imports
without it and says so when it is needed.

:data:`HF_TARGET` is ``model._target_`` of the ``model=hf`` option, and part of every plan's
cache key: it names :func:`empty_model` where it lives.

>>> import importlib
>>> module, name = HF_TARGET.rsplit(".", 1)
>>> getattr(importlib.import_module(module), name) is empty_model
True
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from bigjob.errors import CheckpointError, ConfigError
from bigjob.models.hf_folder import load_config, model_class, open_model_dir, transformers_module
from bigjob.models.hf_planning import dtype_exceptions, no_split_classes, resolve_dtype

__all__ = ["HF_TARGET", "empty_model", "from_pretrained", "ignorable_keys", "load_and_dispatch"]

log = logging.getLogger(__name__)

HF_TARGET = "bigjob.models.hf.empty_model"  # model._target_ of the `model=hf` option
_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def empty_model(path: str | os.PathLike[str], model_class_name: str | None = None, **config_overrides: Any) -> nn.Module:
    """The model of folder ``path`` with every parameter on the meta device, tied weights tied, in eval mode.

    This is ``model._target_`` of the ``model=hf`` option: the runner calls it with
    ``path=model.path`` and ``model.kwargs`` (attributes of the config to override, e.g.
    ``attn_implementation``; ``model_class_name`` picks another class than ``architectures``).
    """
    from bigjob.engine.plan.empty import init_empty_weights

    model_dir = open_model_dir(path)
    config = load_config(model_dir, **config_overrides)
    cls = model_class(config, model_class_name, key="model_class_name")
    with init_empty_weights():
        # _from_config, not cls(config): it picks the attention implementation as from_pretrained does.
        model = cls._from_config(config)
    model.tie_weights()  # the checkpoint may omit a tied head: it must share the embedding's tensor
    return model.eval()


@contextmanager
def _quiet_about(names: set[str]) -> Iterator[None]:
    """Drop the engine's "unexpected keys" warning while every key it lists is one Transformers ignores too."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            return not ("unexpected" in message and all(name in message for name in names))

    engine_log = logging.getLogger("bigjob.engine.run.loading")
    drop = _Filter()
    if names:
        engine_log.addFilter(drop)
    try:
        yield
    finally:
        engine_log.removeFilter(drop)


def ignorable_keys(model: nn.Module, checkpoint: str | os.PathLike[str], strict: bool = True) -> set[str]:
    """Checkpoint keys the model has no parameter for but Transformers skips on purpose.

    Those are tensors of non-persistent buffers (``position_ids`` in older BERT checkpoints)
    and keys matching the model's ``_keys_to_ignore_on_load_unexpected``. With ``strict``,
    any other unexpected key is a CheckpointError listing them.
    """
    from bigjob.engine.checkpoints.keys import compare_keys
    from bigjob.engine.checkpoints.opening import open_checkpoint

    state = model.state_dict()  # persistent tensors only, tied names included; costs nothing on meta
    with open_checkpoint(checkpoint) as ckpt:
        report = compare_keys({name: tuple(t.shape) for name, t in state.items()}, ckpt)
    if not report.unexpected:
        return set()
    transient = {name for name, _ in model.named_buffers()} - set(state)
    patterns = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]

    def model_name(key: str) -> str:
        if report.prefix_mode == "checkpoint" and report.prefix and key.startswith(report.prefix):
            return key[len(report.prefix) :]
        if report.prefix_mode == "model" and report.prefix:
            return report.prefix + key
        return key

    ignorable = {k for k in report.unexpected if model_name(k) in transient or k in transient or any(p.search(k) for p in patterns)}
    others = [k for k in report.unexpected if k not in ignorable]
    if others and strict:
        listed = ", ".join(others[:20]) + (f" (and {len(others) - 20} more)" if len(others) > 20 else "")
        raise CheckpointError(
            f"checkpoint '{checkpoint}' holds {len(others)} tensors {type(model).__name__} has no place for: {listed}; "
            "check that config.json's architectures match these weights, or pass strict=False to ignore them "
            "(checkpoint.strict=false in a job)"
        )
    return ignorable


def load_and_dispatch(
    model: nn.Module,
    checkpoint: str | os.PathLike[str],
    strict: bool = True,
    **engine_args: Any,
) -> nn.Module:
    """:func:`~bigjob.engine.run.entry_points.load_checkpoint_and_dispatch` for an empty Transformers model, in eval mode.

    ``engine_args`` go to the engine unchanged (device_map, max_memory, dtype, ...). Keys
    Transformers itself ignores are not reported (see :func:`ignorable_keys`); others are
    an error with ``strict``.
    """
    from bigjob.engine.run.entry_points import load_checkpoint_and_dispatch

    quiet = ignorable_keys(model, checkpoint, strict)
    with _quiet_about(quiet):
        # strict=False: the unexpected keys left are exactly the ignorable ones, checked above.
        model = load_checkpoint_and_dispatch(model, checkpoint, strict=False, **engine_args)
    return model.eval()


def _input_working_memory(model: nn.Module, shape: tuple[int, int], dtype: torch.dtype | None, key: str = "working_memory") -> int:
    """The working memory of ``model(input_ids)`` for a ``(batch, tokens)`` batch, weights in ``dtype``."""
    from bigjob.engine.plan.working_memory import estimate_working_memory

    if len(shape) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        raise ConfigError(f"{key}={shape!r}: give bytes, a size such as '200MiB', or (batch, tokens) as two positive ints")
    return estimate_working_memory(model, torch.zeros(shape, dtype=torch.long, device="meta"), dtype=dtype)


def from_pretrained(
    path: str | os.PathLike[str],
    device_map: str | Mapping[str, str | int] | None = "auto",
    max_memory: Mapping[str | int, str | int] | None = None,
    torch_dtype: torch.dtype | str | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    no_split_module_classes: Iterable[str] | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    model_class_name: str | None = None,
    strict: bool = True,
    prefetch: int = 1,
    offload_buffers: bool = False,
    execution: str | Mapping[str, str] = "stream",
    execution_rates: Mapping[str, Any] | None = None,
    disk_reads: str = "auto",
    working_memory: int | str | tuple[int, int] = 0,
    strict_budget: bool = False,
    offload_compression: str = "none",
    **config_overrides: Any,
) -> nn.Module:
    """Load a local Transformers model folder through bigjob's planner, loader and dispatcher.

    ``device_map`` is a strategy (``"auto"``, ``"balanced"``, ``"balanced_low_0"``,
    ``"sequential"``), a device or an explicit map, planned under ``max_memory`` (e.g.
    ``{"cuda:0": "10GiB", "cpu": "24GiB"}``). ``dtype`` (Transformers 5's name; ``torch_dtype``
    is Transformers 4's, and either may be given): ``None`` keeps each tensor's stored
    dtype, ``"auto"`` takes config.json's, or name one. ``no_split_module_classes``
    defaults to the class's ``_no_split_modules``. Other keyword arguments override config
    attributes (``attn_implementation="eager"``). Returns the dispatched model in eval mode;
    :func:`bigjob.get_dispatch_info` says where its weights went.

    ``execution`` (``"stream"``, ``"local"``, ``"auto"`` or per tier ``{"cpu": ..., "disk": ...}``)
    says how layers offloaded to CPU RAM or disk run when the model executes on a GPU: their
    weights streamed in, or run on the CPU (``auto``: for batches of few tokens, by a cost
    model over ``execution_rates`` such as ``{"h2d": "12GB/s", "cpu_flops": "250G",
    "device_flops": "50T"}``, measured when not given). To generate with ``auto``, decide once
    per generation with :func:`bigjob.execution_tokens` (as the job's ``generate`` task does),
    so no layer moves away from its KV cache between steps.

    ``disk_reads`` (``"auto"``, ``"mapped"``, ``"direct"``): how disk-tier layers run on the
    CPU get their bytes; see :func:`bigjob.engine.run.dispatch.dispatch_loaded`.

    ``working_memory``: room a planned map keeps free on the device that runs the model for
    the forward itself (activations, logits, the KV cache), so that the weights and the
    forward stay within ``max_memory`` together: bytes, a size, or ``(batch, tokens)`` to
    estimate it for ``model(input_ids)`` of that shape
    (:func:`~bigjob.engine.plan.working_memory.estimate_working_memory`). ``strict_budget``: raise where
    ``max_memory`` is smaller than streaming needs, not fall back (see :mod:`bigjob.engine.plan.budget_fallback`).

    ``offload_compression`` (``"none"``, ``"int8"``, ``"int4"``): the ``Linear`` weights of the layers
    offloaded to disk (and to CPU RAM when a GPU runs the model) are stored group-wise quantized and
    dequantized right before use: fewer bytes to read, outputs within the quantization error
    (measured in docs/benchmarks.md); see :mod:`bigjob.engine.plan.compression`.
    """
    transformers_module()  # a missing extra first: it is the thing to fix
    if dtype is not None and torch_dtype is not None:
        raise ConfigError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} were both given; they are one setting: give only dtype")
    model_dir = open_model_dir(path)
    if torch_dtype is not None:
        dtype = resolve_dtype(torch_dtype, model_dir, key="torch_dtype")
    else:
        dtype = resolve_dtype(dtype, model_dir, key="dtype")  # a bad name fails before any work
    model = empty_model(model_dir.path, model_class_name, **config_overrides)
    planned = isinstance(device_map, str) and device_map in _STRATEGIES
    no_split = no_split_classes(model, no_split_module_classes) if planned else list(no_split_module_classes or ())
    if isinstance(working_memory, tuple):
        working_memory = _input_working_memory(model, working_memory, dtype)
    return load_and_dispatch(
        model,
        model_dir.path,
        strict=strict,
        device_map=device_map,
        max_memory=max_memory,
        no_split_module_classes=no_split,
        dtype=dtype,
        special_dtypes=dtype_exceptions(model, dtype) or None,
        offload_folder=offload_folder,
        offload_buffers=offload_buffers,
        prefetch=prefetch,
        execution=execution, execution_rates=execution_rates, disk_reads=disk_reads, working_memory=working_memory,
        strict_budget=strict_budget, offload_compression=offload_compression,
    )
