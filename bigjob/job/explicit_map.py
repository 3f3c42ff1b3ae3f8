"""``placement.strategy=explicit``: the device map the user wrote, read and checked against the model.

``placement.device_map`` is a map ``{module: device}`` in the config, or the path of a JSON
file (a ``device_map.json`` of an earlier run will do). It is checked before the cache is
opened: every parameter and buffer placed exactly once, on devices that exist as names.

>>> from torch import nn
>>> from bigjob.job.schema import JobConfig
>>> cfg = JobConfig()
>>> cfg.placement.strategy, cfg.placement.device_map = "explicit", {"": "cpu"}
>>> dict(read_explicit_map(cfg, nn.Linear(2, 2)).items())
{'': 'cpu'}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from bigjob.errors import ConfigError
from bigjob.job.schema import JobConfig

if TYPE_CHECKING:
    from bigjob.engine.plan.device_map import DeviceMap

__all__ = ["read_explicit_map"]


def read_explicit_map(cfg: JobConfig, model: nn.Module) -> DeviceMap:
    """``placement.device_map`` as a checked :class:`~bigjob.engine.plan.device_map.DeviceMap`; a ConfigError naming the key if not."""
    from bigjob.engine.plan.device_map import DeviceMap, check_device_map

    source = cfg.placement.device_map
    if isinstance(source, str):
        try:
            source = json.loads(Path(source).expanduser().read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"placement.device_map '{cfg.placement.device_map}' cannot be read as a device map JSON ({err})") from None
    if not isinstance(source, Mapping):
        raise ConfigError(f"placement.device_map must be a map {{module: device}} or a JSON path, got {type(source).__name__}")
    try:
        device_map = DeviceMap.from_json(dict(source))
        check_device_map(model, device_map)
    except ConfigError as err:  # DeviceMapError: the class stays, the message names the key
        raise type(err)(f"placement.device_map {cfg.placement.device_map!r}: {err}") from None
    return device_map
