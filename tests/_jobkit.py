"""Shared helpers of the job-system tests: a tiny demo model, its checkpoint, a reference run.

The reference is independent of the job system: the checkpoint's tensors are read with
safetensors' own loader into a plain ``DemoTransformer`` held fully in RAM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from bigjob.models.demo import DemoTransformer

REPO = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=64, d_model=16, n_layers=4, n_heads=2, d_ff=32, max_seq_len=64)
TINY_OVERRIDES = [f"model.kwargs.{k}={v}" for k, v in TINY.items()]


def reference_model(checkpoint_dir: Path, kwargs: dict[str, Any] | None = None, dtype: torch.dtype | None = None) -> DemoTransformer:
    """The demo model with every weight of ``checkpoint_dir`` loaded in RAM, untouched by bigjob's engine."""
    model = DemoTransformer(**(TINY if kwargs is None else kwargs))
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        state.update(load_file(str(shard)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # the tied head is stored once
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def compose_config(overrides: list[str] | None = None):
    """The job config exactly as the CLI would build it (compose API, typed)."""
    from hydra import compose, initialize_config_dir

    from bigjob.cli import config_dir
    from bigjob.job.config import to_job_config

    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return to_job_config(compose("config", overrides=list(overrides or [])))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, module: str = "bigjob", timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m <module> args`` in ``cwd`` with the repository on PYTHONPATH."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=cli_env(env), capture_output=True, text=True, timeout=timeout)


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI subprocess: the repository first on PYTHONPATH, no HYDRA_FULL_ERROR unless asked."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    full = {**os.environ, "PYTHONPATH": path}
    full.pop("HYDRA_FULL_ERROR", None)
    full.update(env or {})
    return full


def run_entry(entry: str, args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """A console-script function of ``bigjob.cli`` (e.g. ``cache_main``) run as a subprocess."""
    code = f"import sys; from bigjob.cli import {entry}; sys.argv[0] = {entry!r}; {entry}()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=cli_env(env), capture_output=True, text=True, timeout=timeout)


def wait_for_batches(progress: Path, count: int, process: subprocess.Popen | None = None, timeout: float = 90) -> bool:
    """Wait until the job writing ``progress`` (its progress.json) has ``count`` batches done; whether it did.

    Gives up early when ``process`` (the job's command) ends first.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (process is None or process.poll() is None):
        try:
            if json.loads(progress.read_text())["batches_done"] >= count:
                return True
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    return False
