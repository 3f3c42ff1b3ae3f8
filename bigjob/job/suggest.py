"""Did-you-mean for command-line overrides: unknown config keys and unknown choices.

Hydra answers ``placement.max_memroy.cpu=1GB`` with an invitation to *add* the key with
``+``, which the typed schema then rejects anyway. :func:`check_overrides` looks at the
overrides before Hydra composes anything and names the nearest key of the schema
(:class:`~bigjob.job.schema.JobConfig`) or the nearest option of a config group
(``conf/<group>/*.yaml``) in one :class:`~bigjob.errors.ConfigError` line.

>>> did_you_mean("balancd", ["auto", "balanced", "sequential"])
"; did you mean 'balanced'?"
>>> "placement.max_memory.cpu" in schema_keys()
True
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bigjob.errors import ConfigError
from bigjob.job.nearest import did_you_mean, nearest

__all__ = ["check_command_line", "check_overrides", "did_you_mean", "group_options", "nearest", "schema_keys"]



def _fields(node: Any) -> dict[str, Any]:
    """A dataclass's fields with their types resolved (the schema uses ``from __future__ import annotations``)."""
    hints = typing.get_type_hints(node)
    return {f.name: hints[f.name] for f in dataclasses.fields(node)}


def schema_keys(node: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (sections and values), e.g. ``placement``, ``placement.max_memory.cpu``.

    >>> [k for k in schema_keys() if k.startswith("placement.max_memory.g")][:2]
    ['placement.max_memory.gpu0', 'placement.max_memory.gpu1']
    """
    if node is None:
        from bigjob.job.schema import JobConfig

        node = JobConfig
    keys: list[str] = []
    for name, kind in _fields(node).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(kind):
            keys += schema_keys(kind, f"{prefix}{name}.")
    return keys


def _is_open(kind: Any) -> bool:
    """Whether a field's type is a mapping or ``Any`` (also inside ``Optional``)."""
    if kind is Any or typing.get_origin(kind) is dict:
        return True
    return typing.get_origin(kind) is typing.Union and any(_is_open(arg) for arg in typing.get_args(kind))


def _open_keys(node: Any = None, prefix: str = "") -> list[str]:
    """Keys whose values take keys of the user's choosing (``model.kwargs``, ``placement.execution``)."""
    if node is None:
        from bigjob.job.schema import JobConfig

        node = JobConfig
    keys: list[str] = []
    for name, kind in _fields(node).items():
        if dataclasses.is_dataclass(kind):
            keys += _open_keys(kind, f"{prefix}{name}.")
        elif _is_open(kind):
            keys.append(prefix + name)
    return keys


def group_options(conf_dir: Path) -> dict[str, list[str]]:
    """The config groups of ``conf_dir`` (its sub-folders but ``hydra``) and their options (YAML names).

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> for name in ("dtype/float32.yaml", "dtype/bfloat16.yaml", "hydra/launcher/slurm.yaml"):
    ...     (root / name).parent.mkdir(parents=True, exist_ok=True)
    ...     _ = (root / name).write_text("")
    >>> group_options(root)
    {'dtype': ['bfloat16', 'float32']}
    """
    groups: dict[str, list[str]] = {}
    if not conf_dir.is_dir():
        return groups
    for folder in sorted(p for p in conf_dir.iterdir() if p.is_dir() and p.name != "hydra"):
        groups[folder.name] = sorted(p.stem for p in folder.glob("*.yaml"))
    return groups


def _unknown_key(key: str, known: Sequence[str], open_keys: Sequence[str]) -> str | None:
    if key in known or any(key.startswith(k + ".") for k in open_keys):
        return None
    return f"unknown config key {key!r}{did_you_mean(key, known)}"


def check_overrides(overrides: Sequence[str], conf_dir: Path | None) -> None:
    """Raises one ConfigError naming each unknown key or group option among ``overrides``, with the nearest known one.

    Overrides that add (``+key``), delete (``~key``) or touch ``hydra`` are left to Hydra;
    so is anything its parser rejects. ``conf_dir=None`` skips the group options (another
    config folder is in use).

    >>> check_overrides(["placement.max_memroy.cpu=1GB"], None)
    Traceback (most recent call last):
    ...
    bigjob.errors.ConfigError: unknown config key 'placement.max_memroy.cpu'; did you mean 'placement.max_memory.cpu'?
    >>> check_overrides(["data.batch_size=1,2", "model.kwargs.depth=2", "+extra=1"], None)
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType, ValueType
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return  # Hydra's own message says what is wrong with the syntax
    known = schema_keys()
    open_keys = _open_keys()
    groups = group_options(conf_dir) if conf_dir is not None else {}
    problems: list[str] = []
    for override in parsed:
        key = override.key_or_group
        if override.type != OverrideType.CHANGE or key.split(".")[0].split("/")[0] == "hydra" or override.package:
            continue
        if key in groups:
            if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
                continue
            values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
            for value in values:
                if value is not None and str(value) not in groups[key] and str(value) != "null":
                    problems.append(
                        f"unknown option {str(value)!r} of config group {key!r}{did_you_mean(str(value), groups[key])} "
                        f"(options: {', '.join(groups[key])})"
                    )
        elif "/" not in key:
            problem = _unknown_key(key, known, open_keys)
            if problem:
                problems.append(problem)
    if problems:
        raise ConfigError("; ".join(problems))


def check_command_line(argv: Sequence[str], conf_dir: Path) -> None:
    """:func:`check_overrides` on the overrides of a ``bigjob`` command line (flags parsed as Hydra does).

    Nothing is checked for ``--help``, ``--info`` and shell completion; group options are
    not checked when ``--config-dir`` / ``--config-path`` / ``hydra.searchpath`` bring other configs.

    >>> check_command_line(["-m", "--cfg", "job", "data.batch_size=1,2"], Path("conf"))
    """
    from hydra._internal.utils import get_args_parser

    try:
        args = get_args_parser().parse_args(list(argv))
    except SystemExit:
        return  # Hydra reports its own usage errors
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return
    elsewhere = args.config_dir or args.config_path or any(o.lstrip("+").startswith("hydra.searchpath") for o in args.overrides)
    check_overrides(args.overrides, None if elsewhere else conf_dir)
