"""Engine messages in the job's terms: the engine's argument names replaced by the config keys that set them.

The engine is a library and names its own arguments (``max_memory['cpu']``, ``strict=False``);
a job's user sets config keys. Every engine error the job layer passes on goes through
:func:`in_config_terms`, so the message names the key to change.
"""

from __future__ import annotations

import re

__all__ = ["in_config_terms"]


def in_config_terms(message: str) -> str:
    """An engine message with the engine's argument names replaced by the config keys that set them.

    >>> in_config_terms("raise max_memory['cuda:0'] or allow disk offload (max_memory['disk'] > 0)")
    'raise placement.max_memory.gpu0 or allow disk offload (placement.max_memory.disk > 0)'
    >>> in_config_terms("unexpected keys; pass strict=False or run smaller batches")
    'unexpected keys; pass checkpoint.strict=false or lower data.batch_size'
    """
    message = re.sub(r"max_memory\[['\"]?cuda:(\d+)['\"]?\]", r"placement.max_memory.gpu\1", message)
    message = re.sub(r"max_memory\[['\"]?(\w+)['\"]?\]", r"placement.max_memory.\1", message)
    message = re.sub(r"(?<![\w.])(max_memory|prefetch|working_memory)\b", r"placement.\1", message)
    message = message.replace("run smaller batches", "lower data.batch_size")
    return message.replace("`checkpoint`", "checkpoint.path").replace("strict=False", "checkpoint.strict=false")
