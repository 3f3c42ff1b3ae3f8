"""``cache.max_size`` during a job: other jobs' least recently used folders pruned until the cache fits.

A job prunes before it builds an offload folder (making room for it: a full disk fails the
build) and once more at its end. The folders running jobs use, this one's included, are
locked and stay (see :mod:`bigjob.job.prune`). Pruning never fails a job: what goes wrong
is a warning.

>>> import tempfile
>>> from bigjob.job.cache import JobCache
>>> with JobCache(Path(tempfile.mkdtemp()) / "cache") as cache:
...     prune_to(cache, "1GB")  # an empty cache fits: nothing to remove
"""

from __future__ import annotations

import logging
from pathlib import Path

from bigjob.errors import BigJobError
from bigjob.job.cache import JobCache
from bigjob.job.prune import prune

__all__ = ["PRUNE_WAIT_S", "prune_to"]

logger = logging.getLogger(__name__)

# How long a job's pruning (cache.max_size) waits for other jobs choosing their folders.
PRUNE_WAIT_S = 60.0


def prune_to(cache: JobCache, max_size: str | int, room: int = 0) -> None:
    """``cache.max_size``: removes the least recently used folders of other jobs until the cache fits,
    with ``room`` bytes to spare (an offload folder about to be built).
    """
    from bigjob.engine.plan.devices import format_size, parse_size

    limit = max(0, parse_size(max_size, key="cache.max_size") - room)
    what = f"cache.max_size={max_size}" + (f", {format_size(room)} kept free for the offload folder to build" if room else "")
    try:
        result = prune(cache, max_size=limit, wait=PRUNE_WAIT_S)
    except BigJobError as err:
        logger.warning("%s: the cache was not pruned (%s)", what, err)
        return
    if result.removed:
        logger.info(
            "%s: removed %d least recently used folders (%s); the cache holds %s",
            what, len(result.removed), format_size(result.freed), format_size(result.size_after),
        )
    for artifact, error in result.failed:
        logger.warning("%s: could not remove %s (%s)", what, artifact.path, error)
    if result.size_after > limit:
        logger.warning(
            "the cache holds %s, more than %s allows (%s): %s",
            format_size(result.size_after), what, format_size(limit),
            f"{len(result.in_use)} folders in use by running jobs (this one's included) were kept" if result.in_use
            else "what is left is plans, registry entries and locks; `bigjob-cache clear` removes them",
        )
