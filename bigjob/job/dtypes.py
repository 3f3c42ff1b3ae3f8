"""The job's dtypes: ``dtype.name`` and ``model.special_dtypes`` as torch dtypes.

``checkpoint`` (and ``auto`` outside ``model=hf``) keeps each tensor's stored dtype: None.
For a Transformers folder, ``auto`` is the dtype its ``config.json`` declares, and the
tensors Transformers keeps in another dtype (rotary ``inv_freq``, ``_keep_in_fp32_modules``)
become special dtypes, with the user's own on top.

>>> from bigjob.job.schema import JobConfig
>>> from torch import nn
>>> cfg = JobConfig()
>>> cfg.dtype.name, cfg.model.special_dtypes = "bfloat16", {"head": "float32"}
>>> dtypes = resolve_dtypes(cfg, nn.Linear(2, 2), model_dir=None)
>>> dtypes.dtype, dtypes.special
(torch.bfloat16, {'head': torch.float32})
>>> dtypes.dtype_name, dtypes.special_names
('bfloat16', {'head': 'float32'})
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bigjob.job.schema import JobConfig

__all__ = ["JobDtypes", "dtype_name", "resolve_dtypes", "torch_dtype"]


def torch_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype a config names; None for ``checkpoint``, ``auto`` or null (each tensor's stored dtype).

    >>> torch_dtype("float16"), torch_dtype("checkpoint")
    (torch.float16, None)
    """
    return None if name in (None, "checkpoint", "auto") else getattr(torch, name)


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """The config's name of a torch dtype (None stays None).

    >>> dtype_name(torch.bfloat16), dtype_name(None)
    ('bfloat16', None)
    """
    return None if dtype is None else str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class JobDtypes:
    """The target dtype (None: each tensor's stored one) and the tensors computed in another."""

    dtype: torch.dtype | None
    special: dict[str, Any]  # module or tensor name -> torch dtype (None: its stored dtype)

    @property
    def dtype_name(self) -> str | None:
        return dtype_name(self.dtype)

    @property
    def special_names(self) -> dict[str, str]:
        """The special dtypes by name, as plan inputs hold them."""
        return {name: str(dtype_name(value)) for name, value in self.special.items()}


def resolve_dtypes(cfg: JobConfig, model: nn.Module, model_dir: Any) -> JobDtypes:
    """The dtypes a job computes in; with a Transformers folder (``model_dir``), its ``auto`` and exceptions resolved on ``model``."""
    dtype = torch_dtype(cfg.dtype.name)
    special = {name: torch_dtype(value) for name, value in cfg.model.special_dtypes.items()}
    if model_dir is not None:
        from bigjob.models.hf_planning import dtype_exceptions, resolve_dtype

        dtype = resolve_dtype(cfg.dtype.name if cfg.dtype.name == "auto" else dtype, model_dir, key="dtype.name")
        special = {**dtype_exceptions(model, dtype), **special}
    return JobDtypes(dtype, special)
