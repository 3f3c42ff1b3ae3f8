"""The nearest known word to a mistyped one: the did-you-mean of every config error.

Pure string work (difflib), below the schema and the command line that both use it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["CUTOFF", "did_you_mean", "nearest"]

CUTOFF = 0.5  # difflib's similarity ratio below which a name is not worth suggesting


def nearest(word: str, choices: Iterable[str], count: int = 1) -> list[str]:
    """The ``count`` choices closest to ``word`` (difflib's ratio), best first; none when all are far.

    >>> nearest("bf61", ["float32", "float16", "bfloat16", "checkpoint"])
    ['bfloat16']
    >>> nearest("xyz", ["float32", "bfloat16"])
    []
    """
    return difflib.get_close_matches(word, list(choices), n=count, cutoff=CUTOFF)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the nearest choice, or ``""`` when none is near.

    >>> did_you_mean("sequentail", ("auto", "sequential"))
    "; did you mean 'sequential'?"
    >>> did_you_mean("gpu", ("auto", "sequential"))
    ''
    """
    found = nearest(str(word), choices)
    return f"; did you mean {found[0]!r}?" if found else ""
