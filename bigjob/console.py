"""What every ``bigjob`` command-line entry point shares: quiet ends on closed pipes, the version.

Nothing here imports torch: ``--help`` and ``--version`` must answer at once.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["app_help", "bigjob_version", "pipe_safe"]


def bigjob_version() -> str:
    """The installed distribution's version (package metadata), else the source tree's ``bigjob.__version__``.

    >>> import bigjob
    >>> bigjob_version() == bigjob.__version__
    True
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bigjob")
    except PackageNotFoundError:  # run from a source tree (PYTHONPATH) that was never installed
        import bigjob

        return bigjob.__version__


def pipe_safe(command: Callable[..., None]) -> Callable[..., None]:
    """A command whose reader may stop early (``bigjob-cache list | head``): ends quietly, exit code 0.

    Without this, Python prints a ``BrokenPipeError`` traceback, or an "Exception ignored"
    line when the pipe breaks at the final flush.
    """

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
            sys.stdout.flush()
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush must not fail again
            sys.exit(0)

    return run


def app_help(conf_dir: Path) -> str:
    """``bigjob --help`` as Hydra prints it (header, config groups, the composed config, footer), composed once.

    Hydra builds the same text by composing the config once per option of every group, its own
    included: seconds. The output is the same (``tests/test_cli.py`` compares them).
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from bigjob.job import schema  # noqa: F401  (registers the config schema)
    from bigjob.job.suggest import group_options

    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir)):
        cfg = compose("config", return_hydra_config=True)
    help_cfg = cfg.hydra.help
    groups = "\n".join(f"{group}: {', '.join(options)}" for group, options in group_options(conf_dir).items())
    with open_dict(cfg):
        del cfg["hydra"]
    body = (f"{help_cfg.header}\n== Configuration groups ==\nCompose your configuration from those groups (group=option)\n\n"
            f"{groups}\n\n\n== Config ==\nOverride anything in the config (foo.bar=value)\n\n{OmegaConf.to_yaml(cfg)}\n\n{help_cfg.footer}\n")
    return body
