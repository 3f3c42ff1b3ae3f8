"""One error hierarchy for everything bigjob raises on purpose.

Every message names the value that was seen and the argument or config key to
change, so a user can fix the input without reading the source.

>>> try:
...     raise BudgetError("budget '-1GiB' for 'cpu' is negative; set max_memory.cpu to a size such as '8GiB'")
... except BigJobError as err:
...     print(type(err).__name__)
BudgetError
"""

from __future__ import annotations


class BigJobError(Exception):
    """Base class of every error bigjob raises for bad input or a broken environment."""


class ConfigError(BigJobError, ValueError):
    """A configuration value or function argument is invalid."""


class BudgetError(ConfigError):
    """A memory budget cannot be parsed, names an unknown device, or cannot hold the model."""


class DeviceMapError(ConfigError):
    """A device map is incomplete, names unknown modules or devices, or splits what must stay whole."""


class DeviceError(BigJobError):
    """A device named by a plan does not exist on this machine."""


class CheckpointError(BigJobError):
    """A checkpoint is missing, corrupt, unsafe to load, or does not match the model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint would need arbitrary code execution to load and was refused."""


class OffloadError(BigJobError):
    """An offload folder cannot be written or read."""


class CacheError(BigJobError):
    """A cache folder or entry is unusable (corrupt database, wrong permissions, foreign content)."""


class DataError(BigJobError):
    """An input data file is missing, empty or malformed."""


class JobError(BigJobError):
    """A job cannot run or its output folder cannot be written."""


__all__ = [
    "BigJobError",
    "BudgetError",
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DeviceError",
    "DeviceMapError",
    "JobError",
    "OffloadError",
    "UnsafeCheckpointError",
]
