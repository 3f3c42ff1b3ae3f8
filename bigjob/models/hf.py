"""Hugging Face Transformers model folders, served by bigjob's own planner, loader and dispatcher.

A *model folder* is what ``save_pretrained`` writes: ``config.json``, the weights (one or
sharded safetensors, or ``pytorch_model*.bin``) and usually the tokenizer files. Nothing
here touches the network or a hub: only local folders are read (``local_files_only``),
and no custom model code is ever run (``trust_remote_code`` stays off).

:func:`from_pretrained` is the one-call path::

    model = from_pretrained("/models/llama", max_memory={"cpu": "8GiB"}, dtype="auto")

It builds the model class named by ``config.architectures`` under bigjob's
:func:`~bigjob.engine.plan.empty.init_empty_weights` (no memory), keeps tied embeddings
tied, takes the no-split classes from the class's ``_no_split_modules``, then loads and
dispatches with :func:`~bigjob.engine.run.entry_points.load_checkpoint_and_dispatch` (not
Transformers' ``device_map`` path) and returns the model in ``eval()`` mode. The steps are
separate functions so the job runner can cache the plan between them.

Transformers is an optional extra (``pip install ".[hf]"`` in bigjob's folder); this module imports
without it and says so when it is needed.

>>> open_model_dir("/no/such/folder")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
bigjob.errors.CheckpointError: path '/no/such/folder' does not exist; ...
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigjob.errors import CheckpointError, ConfigError, DataError

__all__ = [
    "CONFIG_NAME",
    "HF_TARGET",
    "ModelDir",
    "TOKENIZER_FILES",
    "context_length",
    "dtype_exceptions",
    "empty_model",
    "from_pretrained",
    "generation_ids",
    "ignorable_keys",
    "load_and_dispatch",
    "load_config",
    "load_tokenizer",
    "model_class",
    "no_split_classes",
    "open_model_dir",
    "resolve_dtype",
    "transformers_module",
]

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
HF_TARGET = "bigjob.models.hf.empty_model"  # model._target_ of the `model=hf` option
_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_DTYPES = ("float32", "float16", "bfloat16", "float64")
# Files a saved tokenizer consists of (any one of them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.txt", "vocab.json")


def transformers_module() -> Any:
    """The ``transformers`` package, imported offline; a ConfigError saying how to install it when absent."""
    # bigjob never downloads: make the hub client refuse, whatever code paths Transformers takes.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as err:
        raise ConfigError(
            f"Hugging Face model folders need the optional Transformers extra ({err}); "
            'install it with: pip install transformers tokenizers (or pip install ".[hf]" in bigjob\'s folder)'
        ) from None
    return transformers


# --------------------------------------------------------------------------- the folder


@dataclass(frozen=True)
class ModelDir:
    """A local model folder and its ``config.json`` (read as JSON: the identity of the model's structure)."""

    path: Path
    config_json: Mapping[str, Any]
    config_sha256: str

    def identity(self) -> dict[str, Any]:
        """What names this model for cache keys: folder, config hash, type and classes (weights are keyed separately)."""
        return {
            "path": str(self.path),
            "config_sha256": self.config_sha256,
            "model_type": self.config_json.get("model_type"),
            "architectures": list(self.config_json.get("architectures") or []),
        }

    def declared_dtype(self) -> str | None:
        """The dtype ``config.json`` declares (``dtype``, formerly ``torch_dtype``), or None."""
        value = self.config_json.get("dtype") or self.config_json.get("torch_dtype")
        return str(value).removeprefix("torch.") if value else None


def open_model_dir(path: str | os.PathLike[str], key: str = "path") -> ModelDir:
    """Check that ``path`` is a model folder with a readable ``config.json``; ``key`` names the argument in errors."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CheckpointError(f"{key} '{folder}' does not exist; set {key} to a local Transformers model folder (holding config.json)")
    if not folder.is_dir():
        raise CheckpointError(f"{key} '{folder}' is a file; set {key} to the folder holding config.json and the weights")
    config_file = folder / CONFIG_NAME
    try:
        raw = config_file.read_bytes()
    except FileNotFoundError:
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
        raise CheckpointError(
            f"{key} '{folder}' holds no {CONFIG_NAME} (found {found}); set {key} to a folder written by "
            "save_pretrained (config.json plus weights)"
        ) from None
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise CheckpointError(f"{key} '{folder}': {CONFIG_NAME} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{key} '{folder}': {CONFIG_NAME} must hold a JSON object")
    return ModelDir(folder.absolute(), data, hashlib.sha256(raw).hexdigest())


def load_config(model_dir: ModelDir, key: str = "path", **overrides: Any) -> Any:
    """The Transformers config of ``model_dir`` (``overrides`` replace its attributes), read from local files only."""
    transformers = transformers_module()
    model_type = model_dir.config_json.get("model_type")
    for name in ("dtype", "torch_dtype"):
        if name in overrides:
            # The config would take it and the weights would not change: the dtype is the loader's to set.
            raise ConfigError(
                f"{name}={overrides[name]!r} was given as a config attribute to override; the weights' dtype is set by "
                "from_pretrained(dtype=...) or the job's dtype option (dtype=bf16), not by model.kwargs"
            )
    try:
        config, unused = transformers.AutoConfig.from_pretrained(
            str(model_dir.path), local_files_only=True, return_unused_kwargs=True, **overrides
        )
    except (ValueError, KeyError) as err:
        if model_type is not None and str(model_type) not in transformers.CONFIG_MAPPING:
            raise ConfigError(
                f"{key} '{model_dir.path}': model type '{model_type}' is not known to the installed Transformers "
                f"{transformers.__version__}; upgrade it (pip install -U transformers) or set {key} to a model of a known type"
            ) from None
        if model_type is None:
            raise ConfigError(f"{key} '{model_dir.path}': {CONFIG_NAME} has no 'model_type'; set {key} to a folder written by save_pretrained") from None
        raise ConfigError(f"{key} '{model_dir.path}': Transformers cannot read {CONFIG_NAME} ({str(err).splitlines()[0]})") from None
    if unused:
        raise ConfigError(_unknown_overrides(config, sorted(unused)))
    return config


def _unknown_overrides(config: Any, names: list[str]) -> str:
    """The message for config overrides the config does not have (Transformers would drop them without a word)."""
    known = [k for k in config.to_dict() if not k.startswith("_")] + ["attn_implementation"]
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, known, n=1)
        parts.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return (
        f"{', '.join(parts)}: not {'an attribute' if len(names) == 1 else 'attributes'} of {type(config).__name__}, "
        "so Transformers would ignore the override without a word; extra keywords of from_pretrained and the job's "
        "model.kwargs override config.json attributes only"
    )


def model_class(config: Any, name: str | None = None, key: str = "model_class") -> type[nn.Module]:
    """The class to build: ``name``, else the first of ``config.architectures`` Transformers has, else a causal LM or base model."""
    transformers = transformers_module()
    candidates = [name] if name else list(getattr(config, "architectures", None) or [])
    for candidate in candidates:
        cls = getattr(transformers, candidate, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
        if name:
            raise ConfigError(f"{key}={name!r} is not a model class of the installed Transformers {transformers.__version__}")
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            return auto._model_mapping[type(config)]
        except KeyError:
            continue
    raise ConfigError(
        f"no Transformers class builds a model of type '{config.model_type}' (architectures {candidates}); name one with {key}"
    )


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


# --------------------------------------------------------------------------- what to plan with


def no_split_classes(model: nn.Module, given: Iterable[str] | None = None, key: str = "no_split_module_classes") -> list[str]:
    """``given``, else the class names the model declares in ``_no_split_modules``; a ConfigError naming ``key`` when neither exists."""
    if given is not None:
        return list(given)
    getter = getattr(model, "_get_no_split_modules", None)  # Transformers 4: gathers them from sub-models
    names: Iterable[str] | None
    if callable(getter):
        try:
            names = getter("auto")
        except ValueError:
            names = None
    else:
        names = getattr(model, "_no_split_modules", None)
    if names:
        return sorted(names)
    repeated = sorted({type(child).__name__ for module in model.modules() if isinstance(module, nn.ModuleList) for child in module})
    example = f"[{', '.join(repeated)}]" if repeated else "[<the class of its repeated blocks>]"
    raise ConfigError(
        f"{type(model).__name__} declares no _no_split_modules, so bigjob cannot tell which modules must stay whole "
        f"on one device; set {key}, e.g. {key}={example}"
    )


def resolve_dtype(torch_dtype: torch.dtype | str | None, model_dir: ModelDir, key: str = "torch_dtype") -> torch.dtype | None:
    """The target dtype: None keeps each tensor's stored dtype; ``"auto"`` takes the one config.json declares.

    >>> md = ModelDir(Path("/m"), {"torch_dtype": "bfloat16"}, "0")
    >>> resolve_dtype("auto", md), resolve_dtype(None, md), resolve_dtype("float16", md)
    (torch.bfloat16, None, torch.float16)
    """
    if torch_dtype is None or isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    name = str(torch_dtype).removeprefix("torch.")
    if name == "auto":
        declared = model_dir.declared_dtype()
        if declared is None:
            return None  # nothing declared: the checkpoint's own dtype
        name = declared
    if name not in _DTYPES:
        raise ConfigError(f"{key}={torch_dtype!r} is not a floating dtype; use one of auto, {', '.join(_DTYPES)} or None")
    return getattr(torch, name)


def dtype_exceptions(model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """``special_dtypes`` that keep what Transformers keeps when it loads in ``dtype`` (None: the checkpoint's).

    * Non-persistent floating buffers keep the dtype the model computed them in (rotary
      ``inv_freq`` stays float32: in bfloat16 its values, and so every position, would change).
    * In half precision, the modules of ``_keep_in_fp32_modules`` stay float32.
    """
    state = model.state_dict()
    out = {name: buffer.dtype for name, buffer in model.named_buffers() if name not in state and buffer.is_floating_point()}
    names = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        # A module whose name, or any parent's last component, is listed (Transformers matches name components).
        out.update({pattern: torch.float32 for name in sorted(names) for pattern in (name, f"*.{name}")})
    return out


def context_length(config: Any) -> int | None:
    """The most positions the model takes (``max_position_embeddings``, ``n_positions`` ...), or None."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def generation_ids(model: nn.Module, tokenizer: Any = None) -> tuple[list[int], int | None]:
    """``(end-of-sequence ids, padding id)`` from the generation config, the model config, then the tokenizer."""
    eos: list[int] = []
    pad: int | None = None
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        if source is None:
            continue
        value = getattr(source, "eos_token_id", None)
        if not eos and value is not None:
            eos = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        value = getattr(source, "pad_token_id", None)
        if pad is None and value is not None:
            pad = int(value[0] if isinstance(value, (list, tuple)) else value)
    return eos, pad


# --------------------------------------------------------------------------- loading


@contextmanager
def _quiet_about(names: set[str]) -> Iterator[None]:
    """Drop the engine's "unexpected keys" warning while every key it lists is one Transformers ignores too."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            return not ("unexpected" in message and all(name in message for name in names))

    engine_log = logging.getLogger("bigjob.engine.run.key_checks")
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


def load_tokenizer(path: str | os.PathLike[str], key: str = "path") -> Any:
    """The tokenizer saved in the model folder; a DataError naming ``key`` when the folder has none."""
    transformers = transformers_module()

    def missing(reason: str) -> DataError:
        return DataError(
            f"{key} '{path}' has no usable tokenizer ({reason}); save the tokenizer into that folder "
            "(tokenizer.save_pretrained), or give token ids instead of text (lines such as [1, 2, 3])"
        )

    found = [name for name in TOKENIZER_FILES if (Path(path) / name).is_file()]
    if not found:
        # Some Transformers releases build an empty tokenizer from config.json alone: never use one.
        raise missing(f"none of {', '.join(TOKENIZER_FILES)}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - Transformers raises OSError, ValueError, TypeError ... for a broken tokenizer
        raise missing((str(err).splitlines()[0] if str(err) else type(err).__name__)[:200]) from None
    if len(tokenizer) < 2:
        raise missing(f"the tokenizer built from {', '.join(found)} has an empty vocabulary")
    return tokenizer


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
        strict_budget=strict_budget,
    )
