"""The tasks a job can name in ``task.name``, and the one function that builds them.

The registry sits above the task modules, so :mod:`bigjob.job.tasks` (the forward tasks)
and :mod:`bigjob.job.generate` (the decode loop) never import each other.

>>> from bigjob.job.schema import TaskConfig
>>> type(build_task(TaskConfig(name="embed"))).__name__
'EmbedTask'
>>> sorted(TASKS)
['embed', 'generate', 'logits', 'score']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bigjob.errors import ConfigError
from bigjob.job.generate import GenerateTask
from bigjob.job.schema import TaskConfig
from bigjob.job.tasks import EmbedTask, LogitsTask, ScoreTask, Task

__all__ = ["TASKS", "build_task"]

TASKS: dict[str, Callable[..., Task]] = {"logits": LogitsTask, "score": ScoreTask, "embed": EmbedTask, "generate": GenerateTask}


def build_task(cfg: TaskConfig, tokenizer: Any = None) -> Task:
    """The task named by ``task.name``; ``tokenizer`` (a TokenizerRef) turns generated ids into text."""
    if cfg.name not in TASKS:
        raise ConfigError(f"task.name={cfg.name!r} is not available; choose one of {', '.join(TASKS)}")
    return TASKS[cfg.name](cfg, tokenizer)
