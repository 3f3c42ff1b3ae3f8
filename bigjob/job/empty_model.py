"""The job's model: ``model._target_`` imported and built on the meta device (step 1 of a job).

Nothing here allocates weights: :func:`build_empty_model` calls the target under
:func:`~bigjob.engine.plan.empty.init_empty_weights`, so a model far larger than RAM costs
nothing to build. A ``model=hf`` job names a Transformers folder (``model.path``), whose
``config.json`` is read first (:func:`hf_model_dir`) and whose automatic values are made
explicit once the model exists (:func:`build_job_model`).

>>> from bigjob.job.schema import JobConfig
>>> job_model = build_job_model(JobConfig(), model_dir=None)
>>> job_model.model_class, job_model.tokenizer
('bigjob.models.demo.DemoTransformer', None)
>>> next(job_model.model.parameters()).device.type
'meta'
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

from torch import nn

from bigjob.errors import BigJobError, ConfigError
from bigjob.job.schema import JobConfig
from bigjob.job.text import TokenizerRef

__all__ = ["JobModel", "build_empty_model", "build_job_model", "hf_model_dir", "import_target", "vocab_size"]


@dataclass(frozen=True)
class JobModel:
    """What step 1 hands on: the empty model and the config its automatic values were resolved with."""

    cfg: JobConfig  # model=hf: no-split classes taken from the model class
    model: nn.Module  # parameters on the meta device
    tokenizer: TokenizerRef | None  # a Transformers folder's tokenizer (loaded on first use), else None

    @property
    def model_class(self) -> str:
        """The model's class as ``module.QualName`` (``JobReport.model_class``, a plan input)."""
        return f"{type(self.model).__module__}.{type(self.model).__qualname__}"


def import_target(target: str, key: str = "model._target_") -> Any:
    """The object ``package.module.Name`` names, or a ConfigError naming ``key``.

    >>> import_target("collections.OrderedDict").__name__
    'OrderedDict'
    >>> import_target("OrderedDict")
    Traceback (most recent call last):
    ...
    bigjob.errors.ConfigError: model._target_='OrderedDict' is not a dotted import path such as 'package.module.Class'
    """
    module_name, _, attr = target.rpartition(".")
    if not module_name:
        raise ConfigError(f"{key}={target!r} is not a dotted import path such as 'package.module.Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{key}={target!r} cannot be imported ({err}); set {key} to an importable class or factory") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{key}={target!r}: module '{module_name}' has no attribute '{attr}'") from None


def build_empty_model(cfg: JobConfig) -> nn.Module:
    """``model._target_(**model.kwargs)`` (and ``path=model.path`` when set) with parameters on the meta device.

    >>> from bigjob.job.schema import JobConfig
    >>> type(build_empty_model(JobConfig())).__name__
    'DemoTransformer'
    """
    from bigjob.engine.plan.empty import init_empty_weights

    factory = import_target(cfg.model._target_)
    if not callable(factory):
        raise ConfigError(f"model._target_={cfg.model._target_!r} is not callable; name an nn.Module class or factory")
    kwargs = dict(cfg.model.kwargs)
    if cfg.model.path is not None:
        kwargs["path"] = cfg.model.path  # a model folder (model=hf)
    try:
        with init_empty_weights():
            model = factory(**kwargs)
    except BigJobError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model._target_={cfg.model._target_!r} rejected model.kwargs {kwargs}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model._target_={cfg.model._target_!r} returned a {type(model).__name__}, not an nn.Module")
    return model.eval()


def vocab_size(model: nn.Module) -> int | None:
    """The size of the model's first embedding table: the id range inputs must respect (None: it has none).

    >>> vocab_size(nn.Sequential(nn.Embedding(32, 4), nn.Linear(4, 4))), vocab_size(nn.Linear(4, 4))
    (32, None)
    """
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module.num_embeddings
    return None


def hf_model_dir(cfg: JobConfig) -> Any:
    """The Transformers model folder of a ``model=hf`` job (its config.json read by Transformers), else None.

    >>> from bigjob.job.schema import JobConfig
    >>> hf_model_dir(JobConfig()) is None  # the demo model
    True
    """
    from bigjob.models.hf import HF_TARGET
    from bigjob.models.hf_folder import load_config, open_model_dir

    if cfg.model._target_ != HF_TARGET:
        return None
    if not cfg.model.path:
        raise ConfigError("model=hf needs model.path: the local folder holding the model's config.json and weights")
    model_dir = open_model_dir(cfg.model.path, key="model.path")
    load_config(model_dir, key="model.path")  # an unknown model type fails here, naming model.path
    return model_dir


def _resolve_hf(cfg: JobConfig, model: nn.Module) -> JobConfig:
    """A ``model=hf`` job with its automatic values made explicit: no-split classes from the model class."""
    from bigjob.models.hf_planning import no_split_classes

    if cfg.model.no_split_module_classes or cfg.placement.strategy == "explicit":
        return cfg
    names = no_split_classes(model, key="model.no_split_module_classes")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, no_split_module_classes=names))


def build_job_model(cfg: JobConfig, model_dir: Any) -> JobModel:
    """Step 1: the empty model; with a Transformers folder (``model_dir``), its no-split classes and tokenizer too."""
    model = build_empty_model(cfg)
    if model_dir is None:
        return JobModel(cfg, model, tokenizer=None)
    return JobModel(_resolve_hf(cfg, model), model, TokenizerRef(model_dir.path, key="model.path"))
