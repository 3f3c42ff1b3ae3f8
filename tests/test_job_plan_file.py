"""Plan files: `bigjob-cache export/import`, and every check an imported entry must pass."""

from __future__ import annotations

import copy
import json
import os

import pytest

from _jobkit import TINY_OVERRIDES, compose_config, run_entry
from bigjob.errors import CacheError
from bigjob.job.cache import JobCache
from bigjob.job.fingerprint import plan_key_of
from bigjob.job.plan_file import check_plan_entry, export_plans, import_plans
from bigjob.job.runner import run_job

PLAN_JOB = TINY_OVERRIDES + ["placement.max_memory.cpu=36KiB", "mode=plan", "quiet=true"]


def plan_in(tmp_path, cache_name, *extra):
    cfg = compose_config(PLAN_JOB + [f"cache.dir={tmp_path / cache_name}", *extra])
    return run_job(cfg, tmp_path / f"run-{cache_name}-{len(list(tmp_path.glob('run-*')))}")


@pytest.fixture
def exported(tmp_path):
    """A plan file holding two plans made in cache A."""
    plan_in(tmp_path, "a")
    plan_in(tmp_path, "a", "placement.strategy=sequential")
    with JobCache(tmp_path / "a") as cache:
        result = export_plans(cache, tmp_path / "plans.json")
    assert result.exported == 2 and not result.skipped
    return tmp_path / "plans.json"


def test_an_imported_plan_is_a_cache_hit_on_another_node(tmp_path, exported):
    document = json.loads(exported.read_text())
    assert document["format"] == "bigjob-plans" and len(document["plans"]) == 2
    with JobCache(tmp_path / "b") as cache:
        result = import_plans(cache, exported)
        assert len(result.added) == 2 and not result.rejected
        assert cache.get(result.added[0])["imported_from"] == str(exported)
    report = plan_in(tmp_path, "b")
    assert report.plan_cache_hit is True
    original = json.loads(next(tmp_path.glob("run-a-0/device_map.json")).read_text())
    assert json.loads((tmp_path / "run-b-2" / "device_map.json").read_text()) == original
    with JobCache(tmp_path / "b") as cache:  # importing again keeps what is there
        again = import_plans(cache, exported)
    assert not again.added and len(again.present) == 2


def test_the_commands(tmp_path, exported):
    env = {"BIGJOB_CACHE_DIR": str(tmp_path / "a")}
    out = run_entry("cache_main", ["export", str(tmp_path / "again.json")], tmp_path, env)
    assert out.returncode == 0 and "exported 2 plans" in out.stdout, out.stderr
    out = run_entry("cache_main", ["--dir", str(tmp_path / "fresh"), "import", str(tmp_path / "again.json")], tmp_path)
    assert out.returncode == 0 and "imported 2 plans" in out.stdout and "0 rejected" in out.stdout, out.stderr
    assert oct((tmp_path / "fresh").stat().st_mode & 0o777) == "0o700"  # a new cache folder is private
    listing = run_entry("cache_main", ["--dir", str(tmp_path / "fresh"), "list"], tmp_path)
    assert listing.stdout.count("plan:") == 2


def _tamper(path, change):
    document = json.loads(path.read_text())
    key = min(document["plans"])
    entry = document["plans"][key]
    new_key = change(entry) or key
    del document["plans"][key]
    document["plans"][new_key] = entry
    path.write_text(json.dumps(document))
    return new_key


def _first_disk_module(entry):
    return next(k for k, v in entry["device_map"].items() if v == "disk")


TAMPERING = {
    "another budget under the old key": (lambda e: e["inputs"]["budgets"].update(cpu=10**9), "does not match the inputs"),
    "another model under the old key": (lambda e: e["inputs"]["model_kwargs"].update(d_model=4096), "does not match the inputs"),
    "an old planner (key recomputed)": (
        lambda e: (e["inputs"].update(planner_version="0"), "plan:" + plan_key_of(e["inputs"]))[1],
        "planned by planner version '0'",
    ),
    "a device without a budget": (lambda e: e["device_map"].update({_first_disk_module(e): "cuda:3"}), "cuda:3, which its inputs give no budget"),
    "a summary over its budget": (lambda e: e["summary"]["planned_bytes"].update(cpu=10**12), "more than the budget on cpu"),
    "everything moved to the cpu": (lambda e: e.update(device_map={k: "cpu" for k in e["device_map"]}), "its summary places units on"),
    "a map that is not a map": (lambda e: e.update(device_map=["cpu"]), "no device_map"),
    "a device that does not exist": (lambda e: e["device_map"].update({_first_disk_module(e): "tpu"}), "unreadable device map"),
    "a malformed summary": (lambda e: e["summary"].update(evil=1), "unreadable device map"),
    "not a plan key": (lambda e: "plan:xyz", "not a plan key"),
    "another kind": (lambda e: e.update(kind="offload"), "not a plan entry"),
}


@pytest.mark.parametrize("name", list(TAMPERING))
def test_a_tampered_entry_is_rejected_and_the_rest_imported(tmp_path, exported, name):
    change, reason = TAMPERING[name]
    bad_key = _tamper(exported, change)
    with JobCache(tmp_path / "b") as cache:
        result = import_plans(cache, exported)
        assert [k for k, _ in result.rejected] == [bad_key] and reason in result.rejected[0][1], result.rejected
        assert len(result.added) == 1 and cache.get(bad_key) is None
    out = run_entry("cache_main", ["--dir", str(tmp_path / "c"), "import", str(exported)], tmp_path)
    assert out.returncode == 1 and f"rejected {bad_key}" in out.stderr and "imported 1 plans" in out.stdout


def test_unknown_fields_are_not_stored(tmp_path, exported):
    key = _tamper(exported, lambda e: e.update(evil={"__reduce__": "os.system"}))
    with JobCache(tmp_path / "b") as cache:
        import_plans(cache, exported)
        assert "evil" not in cache.get(key)


@pytest.mark.parametrize(
    "content,message",
    [
        ("not json", "is not JSON"),
        ('{"plans": {}}', "not a bigjob plan file"),
        ('{"format": "bigjob-plans", "version": 99, "plans": {}}', "format version 99"),
        ('{"format": "bigjob-plans", "version": 1, "plans": []}', 'no "plans" object'),
    ],
)
def test_a_file_that_is_not_a_plan_file_is_one_clear_error(tmp_path, content, message):
    (tmp_path / "plans.json").write_text(content)
    with JobCache(tmp_path / "b") as cache, pytest.raises(CacheError, match=message):
        import_plans(cache, tmp_path / "plans.json")
    out = run_entry("cache_main", ["--dir", str(tmp_path / "b"), "import", str(tmp_path / "plans.json")], tmp_path)
    assert out.returncode == 1 and out.stderr.startswith("error: ") and message.split()[0] in out.stderr and "Traceback" not in out.stderr


def test_a_file_others_may_write_is_imported_with_a_warning(tmp_path, exported):
    os.chmod(exported, 0o666)
    with JobCache(tmp_path / "b") as cache:
        result = import_plans(cache, exported)
    assert len(result.added) == 2 and "may be written by others" in result.warnings[0]


def test_export_leaves_out_entries_that_would_not_import(tmp_path):
    plan_in(tmp_path, "a")
    with JobCache(tmp_path / "a") as cache:
        key, value = next(cache.entries())
        forged = copy.deepcopy(value)
        forged["inputs"]["strategy"] = "balanced"  # stored under a key it does not hash to
        cache.set("plan:" + "f" * 64, forged)
        result = export_plans(cache, tmp_path / "plans.json")
    assert result.exported == 1 and [k for k, _ in result.skipped] == ["plan:" + "f" * 64]
    assert list(json.loads((tmp_path / "plans.json").read_text())["plans"]) == [key]


def test_check_plan_entry_accepts_what_the_runner_stores(tmp_path):
    plan_in(tmp_path, "a", "placement.strategy=balanced", "placement.max_memory.gpu0=20KiB", "placement.max_memory.gpu1=20KiB")
    with JobCache(tmp_path / "a") as cache:
        ((key, value),) = list(cache.entries())
    assert check_plan_entry(key, value) is None
    assert {"cuda:0", "cuda:1"} <= set(value["device_map"].values())
