"""From Hydra's composed config to the typed :class:`~bigjob.job.schema.JobConfig` a job runs.

The job layer's own step, used by the command line and by the sweep callbacks alike (so the
callbacks need nothing from the CLI).

>>> from omegaconf import OmegaConf
>>> to_job_config(OmegaConf.structured(schema.JobConfig)).data.batch_size == schema.JobConfig().data.batch_size
True
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bigjob.errors import ConfigError
from bigjob.job import schema

__all__ = ["to_job_config"]


def to_job_config(cfg: DictConfig) -> schema.JobConfig:
    """The typed config; a missing mandatory value (``???``) becomes a ConfigError naming its key."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        keys = ", ".join(missing)
        raise ConfigError(f"{keys} has no value (???); set it on the command line, e.g. {missing[0]}=...")
    try:
        job = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    if not isinstance(job, schema.JobConfig):
        raise ConfigError("the config does not follow bigjob's schema; keep `bigjob_schema` first in the defaults list")
    return job
