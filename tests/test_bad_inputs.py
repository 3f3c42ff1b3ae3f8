"""A catalogue of bad inputs: each fails with its own error class and one line naming the value
and the key to change, and loses or poisons nothing.

Every case runs twice in a copy of a workspace that already holds a completed job (cache
entries, an offload folder, the demo checkpoint, an earlier run folder):

* through the Python API (``run_job`` on the composed config): the exact error class;
* through the ``bigjob`` command in this process (Hydra, the callback, the runner, the CLI's
  error handling): exit code 1 and one line ``error: ...`` on stderr, no traceback;
* cases marked ``subprocess`` also as a real ``python -m bigjob`` process.

After each: the cache database rows, the cache's files and the earlier run folder are
unchanged (``late`` cases, which fail after planning, may add a correct plan entry and
nothing else), no temporary file is left, and the failed run folder presents nothing as
complete. Cases already run as subprocesses in ``tests/test_cli.py::BAD`` (unknown key,
unknown option, invalid or negative budget, missing checkpoint, unimportable target,
malformed data line, batch size 0, unwritable output folder) run in-process here with the
stronger checks; ``tests/test_job_runner.py`` and the engine tests (``test_checkpoint.py``,
``test_loading.py``, ``test_safetensors_io.py``, ``test_store.py``) cover the same inputs at
the level of their own modules.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _faultkit import (
    JOB,
    cache_rows,
    cli_inprocess,
    file_digests,
    leftovers,
    marker_holds,
    metrics,
    offload_folders,
)
from _jobkit import TINY, compose_config, read_jsonl, run_cli
from safetensors.torch import save_file

from bigjob.errors import (
    BigJobError,
    BudgetError,
    CacheError,
    CheckpointError,
    ConfigError,
    DataError,
    DeviceError,
    DeviceMapError,
    JobError,
    OffloadError,
    UnsafeCheckpointError,
)
from bigjob.job.runner import run_job
from bigjob.models.demo import demo_checkpoint_spec, demo_tensor

# --------------------------------------------------------------------------- inputs the cases write


def good_state() -> dict[str, torch.Tensor]:
    """The tiny demo model's weights (the tied head stored once), made independently of bigjob's loader."""
    return {name: demo_tensor(name, shape, 0, TINY["n_layers"]) for name, shape in demo_checkpoint_spec(TINY)}


def write_single(w: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    folder = w / "ckpt"
    folder.mkdir(exist_ok=True)
    save_file(state if state is not None else good_state(), str(folder / "model.safetensors"))
    return folder / "model.safetensors"


def write_sharded(w: Path) -> Path:
    folder = w / "ckpt"
    folder.mkdir(exist_ok=True)
    state = good_state()
    names = list(state)
    weight_map = {}
    for number, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        shard = f"model-{number:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(folder / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def truncated(w: Path) -> None:
    path = write_single(w)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])


def lying_header(w: Path) -> None:
    """Two tensors whose ``data_offsets`` claim the same bytes (header length and file size unchanged)."""
    path = write_single(w)
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    first, second = header[names[0]]["data_offsets"], header[names[1]]["data_offsets"]
    header[names[1]]["data_offsets"] = [first[0], first[0] + second[1] - second[0]]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    path.write_bytes(raw[:8] + text + b" " * (length - len(text)) + raw[8 + length :])


def shard_absent(w: Path) -> None:
    (write_sharded(w) / "model-00002-of-00002.safetensors").unlink()


def index_not_json(w: Path) -> None:
    (write_sharded(w) / "model.safetensors.index.json").write_text('{"weight_map": {"embed.weight": ')


def without(name: str) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        write_single(w, {k: v for k, v in good_state().items() if k != name})

    return setup


def with_extra(w: Path) -> None:
    write_single(w, {**good_state(), "extra.weight": torch.zeros(3)})


def replaced(name: str, value: torch.Tensor) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        write_single(w, {**good_state(), name: value})

    return setup


class Payload:
    """Unpickling this runs code that creates ``marker``: what a hostile ``.bin`` would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def unsafe_bin(w: Path) -> None:
    (w / "ckpt").mkdir()
    torch.save({**good_state(), "extra": Payload(w / "PWNED")}, w / "ckpt" / "pytorch_model.bin")


def text_file(name: str, text: str) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        (w / name).write_text(text)

    return setup


def regular_file(w: Path) -> None:
    (w / "afile").write_text("a file where a folder should be\n")


def open_cache_folder(w: Path) -> None:
    (w / "shared").mkdir()
    os.chmod(w / "shared", 0o777)


def corrupt_database(w: Path) -> None:
    (w / "cache" / "db" / "cache.db").write_bytes(b"this is not a SQLite database\n" * 200)


def bad_device_map(w: Path) -> None:
    (w / "map.json").write_text(json.dumps({"": "cpu", "blocks.9": "cpu"}))


# --------------------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]  # command-line overrides added to JOB ({w}: the workspace)
    error: type[BigJobError]  # the exact class run_job raises
    needles: tuple[str, ...]  # the offending value and the key or argument to change
    setup: Callable[[Path], None] | None = None
    late: bool = False  # fails after planning: a correct plan entry may be added, nothing else
    subprocess: bool = False  # also run as a real `python -m bigjob` process


CKPT = ("checkpoint=path", "checkpoint.path={w}/ckpt")
ZERO_GPUS = tuple(f"placement.max_memory.gpu{i}=0" for i in range(torch.cuda.device_count()))

CASES: dict[str, Case] = {
    # budgets
    "budget unparseable": Case(("placement.max_memory.cpu=lots",), BudgetError, ("'lots'", "placement.max_memory.cpu")),
    "budget negative": Case(("placement.max_memory.disk=-1GB",), BudgetError, ("'-1GB'", "placement.max_memory.disk")),
    "budget zero for every device": Case(
        ("placement.max_memory.cpu=0", "placement.max_memory.disk=0", *ZERO_GPUS), BudgetError, ("'cpu': '0'", "is 0", "placement.max_memory")
    ),
    "budget for an unknown device": Case(
        ("+placement.max_memory.tpu=1GiB",), BudgetError, ("placement.max_memory.tpu", "gpu0"), subprocess=True
    ),
    "budget for an absent GPU": Case(("placement.max_memory.gpu7=1GiB",), DeviceError, ("placement.max_memory.gpu7=1GiB", "cuda:7")),
    "budget below the largest unit, disk off": Case(
        ("placement.max_memory.cpu=1KiB", "placement.max_memory.disk=0"),
        BudgetError,
        ("1.00 KiB", "placement.max_memory.cpu", "placement.max_memory.disk"),
    ),
    "prefetch reserve beyond the budget": Case(("placement.prefetch=100", "placement.strict_budget=true"), BudgetError, ("placement.prefetch=100", "placement.max_memory.cpu")),
    # checkpoints
    "checkpoint path missing": Case(("checkpoint=path", "checkpoint.path={w}/nowhere"), CheckpointError, ("nowhere", "checkpoint.path")),
    "checkpoint folder empty": Case(CKPT, CheckpointError, ("ckpt", "holds no checkpoint files", "checkpoint.path"), lambda w: (w / "ckpt").mkdir()),
    "safetensors truncated": Case(CKPT, CheckpointError, ("model.safetensors", "truncated", "checkpoint.path"), truncated),
    "header lies about offsets": Case(CKPT, CheckpointError, ("model.safetensors", "overlap", "checkpoint.path"), lying_header),
    "shard in the index absent": Case(CKPT, CheckpointError, ("model-00002-of-00002.safetensors", "does not exist", "checkpoint.path"), shard_absent),
    "index not JSON": Case(CKPT, CheckpointError, ("model.safetensors.index.json", "not valid JSON", "checkpoint.path"), index_not_json),
    "missing keys": Case(CKPT, CheckpointError, ("blocks.1.fc_in.weight", "missing", "checkpoint.path"), without("blocks.1.fc_in.weight")),
    "unexpected keys (strict)": Case(CKPT, CheckpointError, ("extra.weight", "unexpected", "checkpoint.strict=false"), with_extra),
    "shape mismatch": Case(
        CKPT, CheckpointError, ("blocks.0.qkv.weight", "[48, 16] vs [40, 16]", "checkpoint.path"), replaced("blocks.0.qkv.weight", torch.zeros(40, 16))
    ),
    "dtype the model cannot take": Case(
        CKPT, CheckpointError, ("blocks.2.mlp_norm.weight", "int32", "checkpoint.path"), replaced("blocks.2.mlp_norm.weight", torch.ones(16, dtype=torch.int32))
    ),
    "bin pickle needing code": Case(
        ("checkpoint=path", "checkpoint.path={w}/ckpt/pytorch_model.bin"),
        UnsafeCheckpointError,
        ("pytorch_model.bin", "refused", "weights_only=True", "checkpoint.path"),
        unsafe_bin,
        subprocess=True,
    ),
    # config
    "target not importable": Case(("model._target_=nowhere.Model",), ConfigError, ("'nowhere.Model'", "model._target_")),
    "kwargs the class rejects": Case(("+model.kwargs.bogus=1",), ConfigError, ("bogus", "model.kwargs", "model._target_")),
    "unknown key added with +": Case(("+data.batchsize=3",), ConfigError, ("data.batchsize", "batch_size")),
    "batch size 0": Case(("data.batch_size=0",), ConfigError, ("got 0", "data.batch_size")),
    "batch size negative": Case(("data.batch_size=-3",), ConfigError, ("got -3", "data.batch_size")),
    "data line malformed": Case(
        ("data=jsonl", "data.path={w}/in.jsonl"), DataError, ("in.jsonl' line 3", "data.path"), text_file("in.jsonl", "[1, 2]\n[3, 4]\n[5, oops]\n")
    ),
    "data file empty": Case(("data=jsonl", "data.path={w}/in.jsonl"), DataError, ("in.jsonl", "no samples", "data.path"), text_file("in.jsonl", "\n\n")),
    "token outside the vocabulary": Case(
        ("data=jsonl", "data.path={w}/in.jsonl"), DataError, ("token id 9999", "line 2", "data.path"), text_file("in.jsonl", "[1, 2]\n[3, 9999]\n")
    ),
    "explicit map names an absent module": Case(
        ("placement=explicit", "placement.device_map={w}/map.json"), DeviceMapError, ("blocks.9", "placement.device_map"), bad_device_map
    ),
    # environment
    "output folder not writable": Case(("hydra.run.dir={w}/afile/run",), JobError, ("afile/run", "hydra.run.dir"), regular_file),
    "output folder holds another job": Case(
        ("hydra.run.dir={w}/runs/earlier", "data.batch_size=4"), JobError, ("runs/earlier", "another config", "hydra.run.dir"), subprocess=True
    ),
    "offload folder not writable": Case(
        ("placement.offload_folder={w}/afile/offload",), OffloadError, ("afile/offload", "placement.offload_folder"), regular_file
    ),
    "cache folder open to others": Case(("cache.dir={w}/shared",), CacheError, ("shared", "0o777", "cache.dir"), open_cache_folder),
    "cache database corrupt": Case((), CacheError, ("not a database", "bigjob-cache clear", "cache.dir"), corrupt_database, subprocess=True),
}
# Disk full while the offload folder is written: see test_disk_full_while_the_offload_folder_is_written.


# --------------------------------------------------------------------------- the workspace


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Path:
    """A workspace after one completed job: cache (plan, offload folder, demo checkpoint, run) and runs/earlier."""
    w = tmp_path_factory.mktemp("seed")
    report = run_job(compose_config(JOB + [f"cache.dir={w / 'cache'}"]), w / "runs" / "earlier")
    assert report.status == "completed" and report.offload_folder
    return w


@pytest.fixture
def workspace(seeded, tmp_path, monkeypatch) -> Path:
    w = tmp_path / "w"
    shutil.copytree(seeded, w, symlinks=True)
    monkeypatch.chdir(w)
    monkeypatch.setenv("BIGJOB_CACHE_DIR", str(w / "cache"))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    return w


def state(w: Path) -> dict:
    """What must survive a failed job: database rows (or bytes, when it is not a database), files, earlier outputs."""
    try:
        rows = cache_rows(w / "cache")
    except sqlite3.DatabaseError:
        rows = {"<unreadable database bytes>": (w / "cache" / "db" / "cache.db").read_bytes()}
    return {"rows": rows, "cache files": file_digests(w / "cache"), "earlier run": file_digests(w / "runs" / "earlier", skip=())}


def assert_nothing_lost(before: dict, after: dict, late: bool) -> None:
    assert after["cache files"] == before["cache files"]
    assert after["earlier run"] == before["earlier run"]
    if not late:
        assert after["rows"] == before["rows"]
        return
    added = set(after["rows"]) - set(before["rows"])
    assert {k: after["rows"][k] for k in before["rows"]} == before["rows"]  # nothing changed or removed
    assert all(key.startswith("plan:") for key in added), added  # a plan is a pure function of the inputs


def assert_nothing_presented_as_complete(w: Path, run_dir: Path, message: str) -> None:
    assert leftovers(w) == []
    assert all(marker_holds(folder) for folder in offload_folders(w / "cache"))
    if run_dir.is_dir() and run_dir != w / "runs" / "earlier":
        assert not (run_dir / "predictions.jsonl").exists()
        if (run_dir / "metrics.json").exists():
            record = metrics(run_dir)
            assert record["status"] == "failed" and record["error"] == message


def split_run_dir(w: Path, args: list[str], default: Path) -> tuple[list[str], Path]:
    """(overrides without hydra.run.dir, the run folder): the API takes the folder as an argument."""
    run_dir = default
    rest = []
    for arg in args:
        if arg.startswith("hydra.run.dir="):
            run_dir = Path(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return rest, run_dir


def test_the_catalogue_is_big_enough():
    assert len(CASES) + 2 >= 25  # + unknown group option and disk full, below


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(workspace, name):
    if name == "budget for an absent GPU" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a GPU 7")
    check_case(workspace, CASES[name])


def check_case(w: Path, case: Case) -> None:
    """The API raises the case's class with a one-line message; the command exits 1 with that line; nothing lost."""
    if case.setup is not None:
        case.setup(w)
    args = [a.format(w=w) for a in case.args]
    before = state(w)

    # The Python API: the exact class, a one-line message naming the value and the key.
    overrides, api_dir = split_run_dir(w, args, w / "runs" / "api")
    with pytest.raises(BigJobError) as info:
        run_job(compose_config(JOB + overrides), api_dir)
    message = str(info.value)
    assert type(info.value) is case.error, message
    assert "\n" not in message and all(needle in message for needle in case.needles), message
    assert_nothing_lost(before, state(w), case.late)
    assert_nothing_presented_as_complete(w, api_dir, message)

    # The command: exit code 1, one line naming the same value and key, no traceback.
    cli_args, cli_dir = split_run_dir(w, JOB + args, w / "runs" / "cli")
    cli_args.append(f"hydra.run.dir={cli_dir}")
    code, _, stderr = cli_inprocess(cli_args)
    line = stderr.strip()
    assert code == 1 and len(stderr.splitlines()) == 1 and line.startswith("error: "), stderr
    assert all(needle in line for needle in case.needles), line
    assert_nothing_lost(before, state(w), case.late)
    assert_nothing_presented_as_complete(w, cli_dir, line.removeprefix("error: "))
    assert not (w / "PWNED").exists()

    if case.subprocess:
        out = run_cli(cli_args, w, {"BIGJOB_CACHE_DIR": str(w / "cache")})
        assert out.returncode == 1 and out.stderr.splitlines() == stderr.splitlines(), out.stderr
        assert_nothing_lost(before, state(w), case.late)
        assert not (w / "PWNED").exists()


def test_unknown_group_option_is_one_line_naming_it_and_the_choices(workspace):
    """Refused before Hydra composes anything: exit code 1, no traceback, the option and the valid ones named."""
    w = workspace
    before = state(w)
    out = run_cli(JOB + ["task=nonesuch", f"hydra.run.dir={w / 'runs' / 'cli'}"], w, {"BIGJOB_CACHE_DIR": str(w / "cache")})
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.splitlines() == ["error: unknown option 'nonesuch' of config group 'task' (options: embed, generate, logits, score)"]
    assert_nothing_lost(before, state(w), late=False)
    assert not (w / "runs" / "cli").exists()


def test_disk_full_while_the_offload_folder_is_written(workspace, monkeypatch):
    """ENOSPC half-way through the build: an OffloadError naming the folder key; no folder, no entry; a rerun builds it."""
    from bigjob.engine.checkpoints import safetensors_writer

    w = workspace
    args = JOB + ["dtype=bfloat16"]  # another offload folder than the workspace's float16 one
    before = state(w)
    original = safetensors_writer._write_all
    calls = []

    def write_all(fd, data):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:  # the header and one tensor are on disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(fd, data)

    monkeypatch.setattr(safetensors_writer, "_write_all", write_all)
    with pytest.raises(OffloadError) as info:
        run_job(compose_config(args), w / "runs" / "api")
    message = str(info.value)
    assert "No space left on device" in message and "placement.offload_folder" in message and "\n" not in message
    calls.clear()
    code, _, stderr = cli_inprocess(args + [f"hydra.run.dir={w / 'runs' / 'cli'}"])
    assert code == 1 and stderr.startswith("error: ") and "No space left on device" in stderr and len(stderr.splitlines()) == 1
    after = state(w)
    assert_nothing_lost(before, after, late=True)
    assert not any(key.startswith("offload:") for key in set(after["rows"]) - set(before["rows"]))
    assert_nothing_presented_as_complete(w, w / "runs" / "cli", stderr.strip().removeprefix("error: "))
    assert len(offload_folders(w / "cache")) == 1  # only the workspace's own

    # Space again: the same job completes, builds its folder (nothing half-written was kept) and
    # gives what the same job gives in a fresh cache.
    monkeypatch.setattr(safetensors_writer, "_write_all", original)
    report = run_job(compose_config(args), w / "runs" / "again")
    assert report.status == "completed" and report.plan_cache_hit is True and report.offload_cache_hit is False
    fresh = run_job(compose_config(args + [f"cache.dir={w / 'fresh'}"]), w / "runs" / "fresh")
    assert fresh.status == "completed"
    assert read_jsonl(w / "runs" / "again" / "predictions.jsonl") == read_jsonl(w / "runs" / "fresh" / "predictions.jsonl")


def test_a_corrupt_cache_database_is_mended_by_the_command_its_message_names(workspace):
    w = workspace
    corrupt_database(w)
    code, _, stderr = cli_inprocess(JOB + [f"hydra.run.dir={w / 'runs' / 'a'}"])
    assert code == 1 and f"bigjob-cache clear --dir {w / 'cache'}" in stderr
    from bigjob.cli import cache_main

    cache_main(["--dir", str(w / "cache"), "clear"])
    assert not (w / "cache" / "db" / "cache.db").exists() and (w / "runs" / "earlier" / "predictions.jsonl").exists()
    report = run_job(compose_config(JOB), w / "runs" / "b")
    assert report.status == "completed" and report.plan_cache_hit is False
    assert (w / "runs" / "b" / "predictions.jsonl").read_bytes() == (w / "runs" / "earlier" / "predictions.jsonl").read_bytes()


def test_a_database_damaged_past_its_first_pages_is_one_line_too(workspace, monkeypatch):
    """Damage SQLite meets only when it reads a damaged page (the open succeeded): still a CacheError line."""
    import diskcache

    def damaged(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise sqlite3.DatabaseError("database disk image is malformed")

    w = workspace
    before = state(w)
    monkeypatch.setattr(diskcache.Cache, "get", damaged)
    with pytest.raises(CacheError, match="malformed"):
        run_job(compose_config(JOB), w / "runs" / "api")
    code, _, stderr = cli_inprocess(JOB + [f"hydra.run.dir={w / 'runs' / 'cli'}"])
    assert code == 1 and len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("error: cannot use the cache database") and f"bigjob-cache clear --dir {w / 'cache'}" in stderr
    assert_nothing_lost(before, state(w), late=False)


def test_hydra_full_error_gives_the_traceback_of_a_catalogue_case(workspace, monkeypatch):
    """The one-line form is a presentation: HYDRA_FULL_ERROR=1 shows where the error came from."""
    unsafe_bin(workspace)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(UnsafeCheckpointError):
        cli_inprocess(JOB + ["checkpoint=path", f"checkpoint.path={workspace / 'ckpt' / 'pytorch_model.bin'}", f"hydra.run.dir={workspace / 'r'}"])
    assert not (workspace / "PWNED").exists()
