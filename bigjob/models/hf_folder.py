"""A local Hugging Face Transformers model folder: its ``config.json``, Transformers config and model class.

A *model folder* is what ``save_pretrained`` writes: ``config.json``, the weights (one or
sharded safetensors, or ``pytorch_model*.bin``) and usually the tokenizer files. Nothing
here touches the network or a hub: only local folders are read (``local_files_only``),
and no custom model code is ever run (``trust_remote_code`` stays off).

Transformers is an optional extra (``pip install ".[hf]"`` in bigjob's folder); this module imports
without it, and :func:`transformers_module` says so when it is needed.

>>> open_model_dir("/no/such/folder")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
bigjob.errors.CheckpointError: path '/no/such/folder' does not exist; ...
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from bigjob.errors import CheckpointError, ConfigError

__all__ = ["CONFIG_NAME", "ModelDir", "load_config", "model_class", "open_model_dir", "transformers_module"]

CONFIG_NAME = "config.json"


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

