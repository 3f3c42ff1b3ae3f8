"""The job's checkpoint: where its weights are, what identifies them, and the demo checkpoint made on demand.

``checkpoint.source=path`` names a file, index or folder; its identity (files, sizes,
mtimes, or with ``checkpoint.content_hash`` a hash of the bytes) is read from headers only,
after checking that its tensors fit the model. ``checkpoint.source=demo`` is the demo
model's seeded checkpoint: its bytes are a pure function of its marker, which is its
identity, so the job can plan before the checkpoint exists, and it is made in the cache
only when weights are loaded.

>>> from bigjob.job.schema import JobConfig
>>> source = locate_checkpoint(JobConfig(), JobDtypes(None, {}), keys_of=None)
>>> source.path is None, source.identity["format"]
(True, 'bigjob-demo')
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from bigjob.errors import CheckpointError, ConfigError
from bigjob.job.cache_folder import make_private_dirs
from bigjob.job.config_terms import in_config_terms
from bigjob.job.dtypes import JobDtypes
from bigjob.job.prune import touch
from bigjob.job.schema import JobConfig

__all__ = ["DEMO_TARGET", "CheckpointSource", "locate_checkpoint", "make_demo_checkpoint_for"]

DEMO_TARGET = "bigjob.models.demo.DemoTransformer"


@dataclass(frozen=True)
class CheckpointSource:
    """The checkpoint's path (None: the demo checkpoint, not made yet) and its identity (a plan input)."""

    path: Path | None
    identity: dict[str, Any]


def _checkpoint_location(cfg: JobConfig) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint path (None: the demo one, not made yet) and, for the demo, its identity."""
    if cfg.checkpoint.source == "path":
        path = Path(str(cfg.checkpoint.path)).expanduser()
        if not path.exists():
            raise CheckpointError(f"checkpoint.path '{path}' does not exist; set checkpoint.path to a checkpoint file, index or folder")
        return path.absolute(), None
    if cfg.model._target_ != DEMO_TARGET:
        raise ConfigError(
            f"checkpoint.source=demo makes the demo model's checkpoint, but model._target_ is "
            f"{cfg.model._target_!r}; use checkpoint=path checkpoint.path=<this model's weights>"
        )
    from bigjob.models.demo import _marker

    # The demo checkpoint's bytes are a pure function of its marker: that is its identity.
    return None, {"format": "bigjob-demo", "marker": _marker(dict(cfg.model.kwargs), cfg.checkpoint.demo_seed, 4)}


def _checkpoint_identity(path: Path, cfg: JobConfig, model: nn.Module | None, dtypes: JobDtypes) -> dict[str, Any]:
    """The checkpoint's identity; with ``model``, first checks that its tensors fit the model (headers only)."""
    from bigjob.engine.checkpoints.opening import open_checkpoint
    from bigjob.engine.run.key_checks import check_checkpoint

    try:
        with open_checkpoint(path) as checkpoint:
            if model is not None:
                check_checkpoint(model, checkpoint, dtypes.dtype, dtypes.special or None, strict=cfg.checkpoint.strict)
            return checkpoint.identity(content_hash=cfg.checkpoint.content_hash)
    except CheckpointError as err:  # UnsafeCheckpointError stays itself
        raise type(err)(f"checkpoint.path '{path}': {in_config_terms(str(err))}") from None


def locate_checkpoint(cfg: JobConfig, dtypes: JobDtypes, keys_of: nn.Module | None) -> CheckpointSource:
    """The job's checkpoint and its identity; a checkpoint file's tensors are first checked against ``keys_of`` (when given).

    ``dtypes`` are the ones the key check loads in. Transformers folders pass no model
    (``keys_of=None``): their loader knows which keys they may ignore.
    """
    path, identity = _checkpoint_location(cfg)
    if identity is None:
        assert path is not None  # source=path: the path exists
        identity = _checkpoint_identity(path, cfg, keys_of, dtypes)
    return CheckpointSource(path, identity)


def make_demo_checkpoint_for(cfg: JobConfig, folder: Path) -> Path:
    """The demo checkpoint in ``folder`` (made once, atomically; its parents 0700), marked as used now for pruning."""
    from bigjob.models.demo import make_demo_checkpoint

    path = make_demo_checkpoint(make_private_dirs(folder.parent), dict(cfg.model.kwargs), cfg.checkpoint.demo_seed)
    touch(path)
    return path
