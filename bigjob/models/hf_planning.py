"""What bigjob's planner takes from a Transformers model: the modules to keep whole and the dtypes to load in.

>>> no_split_classes(nn.Linear(2, 2), given=("LlamaDecoderLayer",))
['LlamaDecoderLayer']
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from bigjob.errors import ConfigError
from bigjob.models.hf_folder import ModelDir

__all__ = ["dtype_exceptions", "no_split_classes", "resolve_dtype"]

_DTYPES = ("float32", "float16", "bfloat16", "float64")


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

    >>> from pathlib import Path
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
