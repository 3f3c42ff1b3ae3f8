"""``bigjob-cache verify`` finds every damaged offload folder by the full check, and repairs the cache.

The damages are issue 22's: a shard deleted, the marker deleted, the index deleted, bytes
flipped inside a tensor file (size kept), a header's dtype relabelled F16 -> I16 (same size),
shards swapped between a float16 and a bfloat16 folder, a registry entry pointing at an empty
foreign folder. For each: verify names the folder and why, drops its entries and removes it
(a foreign folder is left alone: only its entry goes), a second verify finds nothing, and the
job run again gives the predictions it gave before the damage.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
from _faultkit import JOB, metrics
from _jobkit import compose_config

from bigjob.cache_command import cache_main
from bigjob.job.cache import JobCache
from bigjob.job.runner import run_job

RUNS = {"f16": ["dtype=float16"], "bf16": ["dtype=bfloat16"], "f16_wide": ["dtype=float16", "placement.max_memory.cpu=16KiB"]}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Path:
    """A cache holding three offload folders (float16 and bfloat16 of one plan, float16 of a plan with less on disk)."""
    w = tmp_path_factory.mktemp("verify")
    for name in ("f16_wide", "f16", "bf16"):  # the wider budget first: the other plan's folder does not hold its tensors
        report = run_job(compose_config(JOB + RUNS[name] + [f"cache.dir={w / 'cache'}"]), w / "runs" / name)
        assert report.status == "completed" and report.offload_cache_hit is False
    return w


@pytest.fixture
def w(seeded, tmp_path) -> Path:
    copy = tmp_path / "w"
    shutil.copytree(seeded, copy)
    for name in RUNS:  # the records name the seeded copy's folders: point them here
        record = copy / "runs" / name / "metrics.json"
        record.write_text(record.read_text().replace(str(seeded), str(copy)))
    with JobCache(copy / "cache") as cache:
        for key, value in list(cache.entries()):
            if key.startswith("offload:"):
                cache.set(key, {**value, "path": value["path"].replace(str(seeded), str(copy))})
    return copy


def folder(w: Path, name: str) -> Path:
    return Path(metrics(w / "runs" / name)["offload_folder"])


def shard(path: Path) -> Path:
    return next(path.glob("*.safetensors"))


def flip(path: Path) -> None:
    data = bytearray(shard(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard(path).write_bytes(bytes(data))


def relabel(path: Path) -> None:
    data = bytearray(shard(path).read_bytes())
    end = 8 + struct.unpack("<Q", data[:8])[0]
    header = bytes(data[8:end])
    assert b'"F16"' in header
    data[8:end] = header.replace(b'"F16"', b'"I16"')
    shard(path).write_bytes(bytes(data))


def swap(a: Path, b: Path) -> None:
    first, second = shard(a), shard(b)
    assert first.name == second.name
    first.rename(a / "x")
    second.rename(first)
    (a / "x").rename(second)


def foreign_entry(w: Path, path: Path) -> Path:
    """The registry entry of ``path`` repointed at an empty folder outside the cache."""
    elsewhere = w / "foreign"
    elsewhere.mkdir()
    with JobCache(w / "cache") as cache:
        key, value = next((k, v) for k, v in cache.entries() if k.startswith("offload:") and v["path"] == str(path))
        cache.set(key, {**value, "path": str(elsewhere)})
    return elsewhere


DAMAGES = {
    "shard deleted": lambda w: shard(folder(w, "f16")).unlink(),
    "marker deleted": lambda w: (folder(w, "f16") / "bigjob-offload.json").unlink(),
    "index deleted": lambda w: (folder(w, "f16") / "model.safetensors.index.json").unlink(),
    "bytes flipped": lambda w: flip(folder(w, "f16")),
    "dtype relabelled F16 to I16": lambda w: relabel(folder(w, "f16")),
    "shards swapped between two folders": lambda w: swap(folder(w, "f16"), folder(w, "bf16")),
    "folder emptied": lambda w: [p.unlink() for p in folder(w, "f16").iterdir()],
}
NEEDLES = {
    "shard deleted": "safetensors: it is missing",
    "marker deleted": "bigjob-offload.json is missing",
    "index deleted": "index.json: it is missing",
    "bytes flipped": "bytes differ",
    "dtype relabelled F16 to I16": "header differs",
    "shards swapped between two folders": "header differs",
    "folder emptied": "bigjob-offload.json is missing",
}


def verify(w: Path, capsys) -> tuple[int, list[str]]:  # type: ignore[no-untyped-def]
    capsys.readouterr()
    try:
        cache_main(["--dir", str(w / "cache"), "verify"])
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    return code, capsys.readouterr().out.splitlines()


def rerun(w: Path, name: str, run: str) -> dict:
    report = run_job(compose_config(JOB + RUNS[name] + [f"cache.dir={w / 'cache'}"]), w / "runs" / run)
    assert report.status == "completed"
    assert (w / "runs" / run / "predictions.jsonl").read_bytes() == (w / "runs" / name / "predictions.jsonl").read_bytes()
    return metrics(w / "runs" / run)


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_verify_reports_and_removes_a_damaged_folder(w, capsys, damage):  # type: ignore[no-untyped-def]
    damaged = [folder(w, "f16")] + ([folder(w, "bf16")] if "swapped" in damage else [])
    sound = folder(w, "f16_wide")
    DAMAGES[damage](w)
    code, lines = verify(w, capsys)
    assert code == 0, lines
    for path in damaged:
        reports = [line for line in lines if line.startswith(f"damaged offload folder {path}: ")]
        assert len(reports) == 1 and NEEDLES[damage] in reports[0] and reports[0].endswith("; removed"), lines
        assert sum(line.startswith("dropped offload:") and str(path) in line for line in lines) == 1, lines
        assert not path.exists()
    assert lines[-1].endswith(f"{len(damaged)} entries dropped, {len(damaged)} damaged offload folders removed"), lines
    assert not any(str(sound) in line for line in lines) and sound.is_dir()
    assert verify(w, capsys) == (0, [f"verified {w / 'cache'}: 0 entries dropped, 0 damaged offload folders removed"])
    assert rerun(w, "f16", "again")["offload_cache_hit"] is False  # built again, the same predictions
    assert verify(w, capsys)[1][-1].endswith("0 entries dropped, 0 damaged offload folders removed")


def test_an_entry_pointing_at_an_empty_foreign_folder_is_dropped_and_the_folder_left_alone(w, capsys):  # type: ignore[no-untyped-def]
    elsewhere = foreign_entry(w, folder(w, "f16"))
    code, lines = verify(w, capsys)
    assert code == 0 and len(lines) == 3, lines
    assert lines[0].startswith("dropped offload:") and f"offload folder {elsewhere} is not in the cache" in lines[0]
    assert lines[1].startswith(f"note: offload folder {folder(w, 'f16').parent} has no entry")  # its entry was the one repointed
    assert "bigjob-offload.json is missing" in lines[0] and elsewhere.is_dir()
    assert folder(w, "f16").is_dir()  # its own folder is sound, and stays
    rerun(w, "f16", "again")


def test_every_damaged_folder_is_reported_in_one_verify(w, capsys):  # type: ignore[no-untyped-def]
    swap(folder(w, "f16"), folder(w, "bf16"))
    flip(folder(w, "f16_wide"))
    code, lines = verify(w, capsys)
    assert code == 0
    assert sorted(line.split(": ")[0] for line in lines if line.startswith("damaged")) == sorted(
        f"damaged offload folder {folder(w, name)}" for name in RUNS
    ), lines
    assert lines[-1].endswith("3 entries dropped, 3 damaged offload folders removed"), lines
    for name in RUNS:
        rerun(w, name, f"{name}-again")


def test_a_damaged_folder_a_running_job_uses_is_kept_and_named(w, capsys):  # type: ignore[no-untyped-def]
    from bigjob.job.cache_locks import use_lock

    path = folder(w, "f16")
    flip(path)
    with use_lock(w / "cache", path.parent):  # as a running job holds it
        code, lines = verify(w, capsys)
    assert code == 1 and path.is_dir()
    assert any(line.startswith(f"damaged offload folder {path}: ") and "kept (in use by a running job" in line for line in lines), lines
    assert lines[-1].endswith("1 entries dropped, 0 damaged offload folders removed, 1 kept"), lines
    assert verify(w, capsys)[0] == 0 and not path.exists()  # once the job has ended


def test_verify_reads_every_byte(w, capsys, monkeypatch):  # type: ignore[no-untyped-def]
    """A flip the quick check of every reuse cannot see (it samples pages) is found: verify hashes every byte."""
    from bigjob.engine.tiers import store

    monkeypatch.setattr(store, "quick_problem", lambda path, check: None)  # as if the flipped page were not sampled
    path = folder(w, "f16")
    flip(path)
    assert store.offload_problems(path) == []
    code, lines = verify(w, capsys)
    assert code == 0 and any(line.startswith(f"damaged offload folder {path}: ") and "bytes differ" in line for line in lines), lines
