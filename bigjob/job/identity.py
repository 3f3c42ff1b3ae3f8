"""A job's identity: the key of its resolved config (resume, sweep skipping, run-folder checks).

The key is :func:`~bigjob.job.fingerprint.job_key` of the config as the user resolved it,
plus, for a ``model=hf`` job, the identity of the Transformers folder (its ``config.json``
hash): the same command on another model folder is another job.

>>> from bigjob.job.schema import JobConfig
>>> job_identity(JobConfig()) == job_key_for(JobConfig(), model_dir=None)
True
>>> len(job_identity(JobConfig()))
64
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bigjob.job.empty_model import hf_model_dir
from bigjob.job.fingerprint import job_key
from bigjob.job.schema import JobConfig

__all__ = ["job_identity", "job_key_for"]


def job_key_for(cfg: JobConfig, model_dir: Any) -> str:
    """The job's key given its Transformers folder (``model_dir``, None for other models), already opened."""
    return job_key({**dataclasses.asdict(cfg), **({"model_dir": model_dir.identity()} if model_dir else {})})


def job_identity(cfg: JobConfig) -> str:
    """The job's key (``JobReport.job_key``): its resolved config, and a Transformers folder's identity."""
    return job_key_for(cfg, hf_model_dir(cfg))
