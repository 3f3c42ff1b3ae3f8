"""Nothing a file slipped into the cache or a checkpoint can run code; private folders stay private.

Engine-level checks live with their modules (``test_job_cache.py`` plants pickles in a bare
``JobCache``; ``test_checkpoint.py`` refuses hostile ``.bin`` files and escaping shard names);
here whole jobs meet them, and every payload is first shown to be live: unpickled the
ordinary way, in a child process, it does create its marker file.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import sqlite3
import stat
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from _faultkit import JOB, cli_inprocess
from _jobkit import REPO, TINY, compose_config
from safetensors.torch import save_file

from bigjob.errors import CheckpointError, DataError, UnsafeCheckpointError
from bigjob.job.runner import run_job
from bigjob.models.demo import demo_checkpoint_spec, demo_tensor

PACKAGE = REPO / "bigjob"


class Payload:
    """Unpickled, this creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def assert_live(load_code: str, marker: Path) -> None:
    """The payload does run when loaded without bigjob's guards (so its absence below means something)."""
    subprocess.run([sys.executable, "-c", load_code], check=True, cwd=REPO, capture_output=True)
    assert marker.exists()
    marker.unlink()


def test_a_pickle_planted_in_the_cache_is_refused_not_run(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(Payload(marker))
    (tmp_path / "payload.pkl").write_bytes(payload)
    assert_live(f"import pickle; pickle.loads(open({str(tmp_path / 'payload.pkl')!r}, 'rb').read())", marker)

    cache = tmp_path / "cache"
    monkeypatch.setenv("BIGJOB_CACHE_DIR", str(cache))
    monkeypatch.chdir(tmp_path)
    first = run_job(compose_config(JOB), tmp_path / "run1")
    database = cache / "db" / "cache.db"
    with sqlite3.connect(database) as con:
        keys = {json.loads(zlib.decompress(k)): k for (k,) in con.execute("SELECT key FROM Cache")}
        plan_key = next(k for k in keys if k.startswith("plan:"))
        # The plan's own row now claims to hold a pickle (diskcache's MODE_PICKLE = 4) ...
        con.execute("UPDATE Cache SET mode = 4, value = ? WHERE key = ?", (payload, keys[plan_key]))
        # ... a pickled key, and a row pointing at a pickle file next to the database.
        (cache / "db" / "planted.val").write_bytes(payload)
        insert = ("INSERT INTO Cache (key, raw, store_time, expire_time, access_time, access_count, tag, size, mode, filename, value)"
                  " VALUES (?, ?, 0, NULL, 0, 0, NULL, 0, ?, ?, ?)")
        con.execute(insert, (payload, 0, 1, None, zlib.compress(b'{"kind": "plan"}')))
        con.execute(insert, (zlib.compress(json.dumps("run:" + "0" * 64).encode()), 1, 4, "planted.val", None))

    again = run_job(compose_config(JOB), tmp_path / "run2")  # the planted plan is dropped and computed again
    assert again.status == "completed" and again.plan_cache_hit is False and again.plan_key == first.plan_key
    assert (tmp_path / "run2" / "predictions.jsonl").read_bytes() == (tmp_path / "run1" / "predictions.jsonl").read_bytes()
    code, _, stderr = cli_inprocess(JOB + ["data.batch_size=4", f"hydra.run.dir={tmp_path / 'run3'}"])
    assert code == 0, stderr
    from bigjob.cli import cache_main

    capsys.readouterr()
    for command in ("list", "info", "verify"):
        cache_main([command])
    listing = capsys.readouterr().out
    assert "plan:" in listing and "dropped" in listing and "pickled" in listing  # reported, then removed
    assert not marker.exists()


def _evil_bin(path: Path, marker: Path) -> None:
    state = {name: demo_tensor(name, shape, 0, TINY["n_layers"]) for name, shape in demo_checkpoint_spec(TINY)}
    torch.save({**state, "extra": Payload(marker)}, path)


def test_torch_pickles_load_weights_only_and_no_switch_turns_that_off(tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    _evil_bin(tmp_path / "pytorch_model.bin", marker)
    torch.save(Payload(marker), tmp_path / "inputs.pt")
    assert_live(f"import torch; torch.load({str(tmp_path / 'pytorch_model.bin')!r}, weights_only=False)", marker)
    assert_live(f"import torch; torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=False)", marker)

    # torch's own escape hatch for callers that pass no weights_only must not reach bigjob's loads.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setenv("BIGJOB_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        run_job(compose_config(JOB + ["checkpoint=path", f"checkpoint.path={tmp_path / 'pytorch_model.bin'}"]), tmp_path / "run1")
    with pytest.raises(DataError, match="inputs.pt"):
        run_job(compose_config(JOB + ["data=tensor", f"data.path={tmp_path / 'inputs.pt'}"]), tmp_path / "run2")
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            yield node, owner, name


def test_the_source_has_no_unsafe_load():
    """In addition to the behaviour above: every torch.load in the package says weights_only=True,
    literally; nothing calls pickle's loaders or widens torch's allowlist."""
    torch_loads = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node, owner, name in _calls(tree):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if owner == "torch" and name == "load":
                torch_loads += 1
                flags = [k.value for k in node.keywords if k.arg == "weights_only"]
                assert len(flags) == 1 and isinstance(flags[0], ast.Constant) and flags[0].value is True, where
            assert not (owner in ("pickle", "dill", "cloudpickle", "marshal") and name in ("load", "loads")), where
            assert name not in ("add_safe_globals", "safe_globals", "Unpickler"), where
            assert not any(k.arg == "weights_only" and not (isinstance(k.value, ast.Constant) and k.value.value is True) for k in node.keywords), where
    assert torch_loads >= 2  # checkpoint files and data files: the check above did look at them


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_cache_and_offload_folders_are_created_0700(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = os.umask(0)  # the most permissive umask: every folder below must ask for 0700 itself
    try:
        cached = run_job(compose_config(JOB + [f"cache.dir={tmp_path / 'cache'}"]), tmp_path / "run1")
        explicit = run_job(compose_config(JOB + [f"cache.dir={tmp_path / 'cache'}", f"placement.offload_folder={tmp_path / 'mine' / 'offload'}"]),
                           tmp_path / "run2")
        uncached = run_job(compose_config(JOB + [f"cache.dir={tmp_path / 'cache2'}", "cache=disabled"]), tmp_path / "run3")
    finally:
        os.umask(old)
    cache = tmp_path / "cache"
    folders = [cache, cache / "db", cache / "locks", cache / "offload", cache / "checkpoints", *cache.glob("checkpoints/demo-*")]
    for report in (cached, explicit, uncached):
        assert report.offload_folder, report
        folder = Path(report.offload_folder)
        folders += [folder, folder.parent]
    folders += [tmp_path / "mine", tmp_path / "cache2", tmp_path / "cache2" / "checkpoints"]
    assert len(folders) >= 14 and all(f.is_dir() for f in folders)
    assert {str(f.relative_to(tmp_path)): oct(_mode(f)) for f in folders} == {str(f.relative_to(tmp_path)): "0o700" for f in folders}


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors", "/tmp/outside.safetensors"])
def test_a_shard_name_escaping_the_checkpoint_folder_is_refused(tmp_path, monkeypatch, shard):
    state = {name: demo_tensor(name, shape, 0, TINY["n_layers"]) for name, shape in demo_checkpoint_spec(TINY)}
    save_file(state, str(tmp_path / "outside.safetensors"))  # a real file, where the escaping name leads
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(state, shard)}))
    monkeypatch.setenv("BIGJOB_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError) as info:
        run_job(compose_config(JOB + ["checkpoint=path", f"checkpoint.path={folder}"]), tmp_path / "run")
    assert "outside the checkpoint folder" in str(info.value) and repr(shard) in str(info.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "metrics.json").exists()
