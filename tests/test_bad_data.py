"""Bad data, each a one-line DataError before any batch runs, through the catalogue of tests/test_bad_inputs.py.

Every case is run as :func:`test_bad_inputs.check_case` runs the catalogue: the Python API
raises exactly :class:`DataError` with one line naming the value and the key (or file line)
to change; the command exits 1 with that line and no traceback; earlier run folders and
cache rows are unchanged; no run folder claims to be complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _faultkit import JOB, cli_inprocess, file_digests
from _jobkit import TINY, compose_config
from test_bad_inputs import Case, check_case, seeded, text_file, workspace  # noqa: F401 - the fixtures are used by name

from bigjob.errors import DataError, JobError
from bigjob.job.runner import run_job

JSONL = ("data=jsonl", "data.path={w}/in.jsonl")
VOCAB = TINY["vocab_size"]
CONTEXT = TINY["max_seq_len"]


def raw_file(name: str, data: bytes):  # type: ignore[no-untyped-def]
    def setup(w):  # type: ignore[no-untyped-def]
        (w / name).write_bytes(data)

    return setup


DATA_CASES: dict[str, Case] = {
    "pad id beyond the vocabulary": Case(("data.pad_id=9999",), DataError, ("data.pad_id=9999", f"[0, {VOCAB})")),
    "pad id negative": Case(("data.pad_id=-1",), DataError, ("data.pad_id=-1", f"[0, {VOCAB})")),
    "synthetic seq_len above the model's context": Case(
        (f"data.seq_len={CONTEXT + 1}",), DataError, (f"{CONTEXT + 1} tokens", f"context of {CONTEXT}", f"data.seq_len to at most {CONTEXT}")
    ),
    "a line not UTF-8": Case(JSONL, DataError, ("in.jsonl' line 2", "not UTF-8", "0xff", "data.path"), raw_file("in.jsonl", b"[1, 2]\n[3, \xff4]\n")),
    "a line of 2M tokens": Case(
        JSONL, DataError, ("sample 1 has 2000000 tokens", f"context of {CONTEXT}", "data.path"),
        text_file("in.jsonl", "[1, 2]\n[" + ", ".join(["3"] * 2_000_000) + "]\n"),
    ),
    "JSON nested too deeply": Case(JSONL, DataError, ("in.jsonl' line 1", "nested too deeply"), text_file("in.jsonl", "[" * 100_000 + "]" * 100_000 + "\n")),
    "a huge integer id": Case(JSONL, DataError, ("in.jsonl' line 1", "(40 digits)", f"[0, {VOCAB})"), text_file("in.jsonl", f"[1, {10**39}]\n")),
    "an integer too long to read": Case(JSONL, DataError, ("in.jsonl' line 1", "not valid JSON", "digits"), text_file("in.jsonl", "[1, " + "9" * 5000 + "]\n")),
}


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_bad_data(workspace, name):  # noqa: F811 - the fixture
    check_case(workspace, DATA_CASES[name])


# --------------------------------------------------------------------------- a damaged run folder


def _progress(field: str, value: object):  # type: ignore[no-untyped-def]
    def damage(run: Path) -> None:
        marker = json.loads((run / "progress.json").read_text())
        marker[field] = value
        (run / "progress.json").write_text(json.dumps(marker))

    return damage


def _predictions_a_folder(run: Path) -> None:
    (run / "predictions.jsonl").unlink()
    (run / "predictions.jsonl").mkdir()


@pytest.mark.parametrize(
    "damage,needles",
    [
        (_progress("predictions_bytes", None), ("predictions_bytes=None", "delete it", "hydra.run.dir")),
        (_progress("batch_seconds", "abc"), ("batch_seconds='abc'", "delete it", "hydra.run.dir")),
        (_predictions_a_folder, ("predictions.jsonl is not a file", "remove it", "hydra.run.dir")),
    ],
    ids=["bytes null", "seconds abc", "predictions a folder"],
)
def test_a_damaged_run_folder_is_one_line_and_left_as_it_was(workspace, damage, needles):  # noqa: F811 - the fixture
    w = workspace
    run = w / "runs" / "broken"
    job = [*JOB, f"cache.dir={w / 'own-cache'}"]
    assert run_job(compose_config(job), run).status == "completed"
    record = json.loads((run / "metrics.json").read_text())
    record["status"] = "running"  # an interrupted run: the rerun resumes from its progress marker
    (run / "metrics.json").write_text(json.dumps(record))
    damage(run)
    before = {k: v for k, v in file_digests(run, skip=()).items() if not k.startswith((".hydra", "bigjob.log", "metrics.json"))}
    with pytest.raises(JobError) as info:
        run_job(compose_config(job), run)
    assert "\n" not in str(info.value) and all(n in str(info.value) for n in needles), str(info.value)
    code, _, stderr = cli_inprocess([*job, f"hydra.run.dir={run}"])
    assert code == 1 and len(stderr.splitlines()) == 1 and all(n in stderr for n in needles), stderr
    after = {k: v for k, v in file_digests(run, skip=()).items() if not k.startswith((".hydra", "bigjob.log", "metrics.json"))}
    assert after == before and (run / "predictions.jsonl").exists()


# --------------------------------------------------------------------------- a registry that names another place


def test_a_moved_cache_or_a_registry_entry_naming_a_foreign_folder_is_rebuilt_not_followed(workspace):  # noqa: F811
    w = workspace  # a copy of the seeded workspace: its registry names the seed's cache folder
    from bigjob.engine.tiers.store import offload_problems
    from bigjob.job.cache import JobCache

    with JobCache(w / "cache") as cache:
        (key, entry), = [(k, v) for k, v in cache.entries() if k.startswith("offload:")]
    assert not Path(entry["path"]).is_relative_to(w)  # the moved cache's entry names the old place
    expected = (w / "runs" / "earlier" / "predictions.jsonl").read_bytes()
    first = run_job(compose_config(JOB), w / "runs" / "moved")
    assert first.status == "completed" and Path(first.offload_folder).is_relative_to(w / "cache")
    assert (w / "runs" / "moved" / "predictions.jsonl").read_bytes() == expected

    foreign = w / "cache" / "offload" / "elsewhere" / "offload-foreign"
    foreign.mkdir(parents=True)  # empty, and of no job
    with JobCache(w / "cache") as cache:
        cache.set(key, {**cache.get(key), "path": str(foreign)})
    second = run_job(compose_config(JOB), w / "runs" / "foreign")
    assert second.status == "completed" and Path(second.offload_folder) != foreign  # built sound, never the foreign one
    assert offload_problems(second.offload_folder, full=True) == []
    assert (w / "runs" / "foreign" / "predictions.jsonl").read_bytes() == expected
