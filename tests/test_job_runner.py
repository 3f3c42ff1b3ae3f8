"""run_job in-process on a shrunk demo model, checked against the model loaded fully in RAM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from _jobkit import TINY, TINY_OVERRIDES, compose_config, read_jsonl, reference_model
from bigjob.errors import BigJobError, CheckpointError, ConfigError, DataError, JobError
from bigjob.job import progress
from bigjob.job.runner import run_job
from bigjob.models.demo import demo_checkpoint_spec, demo_tensor


def config(tmp_path, *extra):
    base = TINY_OVERRIDES + [
        f"cache.dir={tmp_path / 'cache'}",
        "placement.max_memory.cpu=36KiB",  # the tiny model is ~39 KB: about 60% of it on disk
        "data.num_samples=7",
        "data.seq_len=12",
        "data.min_seq_len=3",
        "data.batch_size=3",
        "quiet=true",
    ]
    return compose_config(base + list(extra))


def checkpoint_dir(tmp_path) -> Path:
    (folder,) = (tmp_path / "cache" / "checkpoints").glob("demo-*")
    return folder


def reference_outputs(model, samples_cfg, top_k=5):
    from bigjob.job.data import load_samples

    out = []
    for ids in load_samples(samples_cfg, TINY["vocab_size"]):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))["logits"][0].float()
        out.append(logits.topk(top_k, dim=-1))
    return out


def assert_matches_reference(records, reference, atol=1e-5):
    assert [r["id"] for r in records] == list(range(len(reference)))
    for record, top in zip(records, reference):
        assert record["top_ids"] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(record["top_values"]), top.values, rtol=atol, atol=atol)


def test_job_outputs_equal_the_model_run_fully_in_ram(tmp_path):
    cfg = config(tmp_path)
    report = run_job(cfg, tmp_path / "run")
    assert report.status == "completed" and report.batches == 3 and report.samples == 7
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["bytes_per_tier"].get("disk", 0) > 0 and metrics["bytes_per_tier"].get("cpu", 0) > 0
    for field in ("plan_seconds", "load_seconds", "batch_latency_p50_s", "batch_latency_p90_s", "samples_per_s", "tokens_per_s", "peak_rss_bytes"):
        assert metrics[field] is not None and metrics[field] >= 0, field
    assert metrics["versions"]["torch"] == torch.__version__ and metrics["devices"] and metrics["checkpoint"]
    device_map = json.loads((tmp_path / "run" / "device_map.json").read_text())["device_map"]
    assert "disk" in device_map.values()
    reference = reference_outputs(reference_model(checkpoint_dir(tmp_path)), cfg.data)
    assert_matches_reference(read_jsonl(tmp_path / "run" / "predictions.jsonl"), reference)


def test_second_run_is_a_plan_cache_hit(tmp_path):
    first = run_job(config(tmp_path), tmp_path / "a")
    second = run_job(config(tmp_path), tmp_path / "b")
    assert first.plan_cache_hit is False and second.plan_cache_hit is True
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["plan_cache_hit"] is True
    assert (tmp_path / "a" / "device_map.json").read_text() == (tmp_path / "b" / "device_map.json").read_text()
    assert (tmp_path / "a" / "predictions.jsonl").read_bytes() == (tmp_path / "b" / "predictions.jsonl").read_bytes()


def test_disk_reads_change_neither_the_plan_nor_the_outputs(tmp_path, monkeypatch):
    from bigjob.engine.tiers.direct import DirectReads

    reads = []
    real = DirectReads.read
    monkeypatch.setattr(DirectReads, "read", lambda self: reads.append(self) or real(self))
    mapped = run_job(config(tmp_path, "placement.disk_reads=mapped"), tmp_path / "a")
    assert reads == []
    direct = run_job(config(tmp_path, "placement.disk_reads=direct"), tmp_path / "b")
    assert len(reads) >= 3  # the disk-tier units of each of the 3 batches
    assert mapped.plan_cache_hit is False and direct.plan_cache_hit is True
    assert mapped.disk_unit_reads["mapped"] >= 3 and mapped.disk_unit_reads["direct"] == 0
    assert direct.disk_unit_reads == {"mapped": 0, "direct": len(reads)}
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["disk_unit_reads"] == direct.disk_unit_reads
    assert (tmp_path / "a" / "predictions.jsonl").read_bytes() == (tmp_path / "b" / "predictions.jsonl").read_bytes()


@pytest.mark.parametrize(
    "change",
    [
        ["placement.max_memory.cpu=20KiB"],
        ["dtype=float16"],
        ["model.kwargs.d_ff=48"],
        ["placement.strategy=sequential"],
        ["model.no_split_module_classes=[]"],
        ["checkpoint.demo_seed=1"],
        ["placement.working_memory=4KiB"],
    ],
)
def test_changing_a_plan_input_is_a_miss(tmp_path, change):
    assert run_job(config(tmp_path, "mode=plan"), tmp_path / "a").plan_cache_hit is False
    assert run_job(config(tmp_path, "mode=plan"), tmp_path / "b").plan_cache_hit is True
    assert run_job(config(tmp_path, "mode=plan", *change), tmp_path / "c").plan_cache_hit is False


def _write_checkpoint(path: Path, seed: int) -> None:
    spec = demo_checkpoint_spec(TINY)
    save_file({name: demo_tensor(name, shape, seed, TINY["n_layers"]) for name, shape in spec}, str(path))


@pytest.mark.parametrize("content_hash", [False, True])
def test_changing_the_checkpoint_content_is_a_miss(tmp_path, content_hash):
    path = tmp_path / "model.safetensors"
    _write_checkpoint(path, seed=1)
    extra = ["mode=plan", "checkpoint=path", f"checkpoint.path={path}", f"checkpoint.content_hash={content_hash}"]
    assert run_job(config(tmp_path, *extra), tmp_path / "a").plan_cache_hit is False
    assert run_job(config(tmp_path, *extra), tmp_path / "b").plan_cache_hit is True
    stat = path.stat()
    _write_checkpoint(path, seed=2)  # same size, other bytes
    assert path.stat().st_size == stat.st_size
    assert run_job(config(tmp_path, *extra), tmp_path / "c").plan_cache_hit is False


def test_plan_mode_loads_no_weights_even_for_a_model_far_larger_than_ram(tmp_path):
    huge = ["model.kwargs.vocab_size=32000", "model.kwargs.d_model=8192", "model.kwargs.n_layers=400", "model.kwargs.n_heads=64",
            "model.kwargs.d_ff=28672", "placement.max_memory.cpu=8GiB", "mode=plan"]
    report = run_job(compose_config([f"cache.dir={tmp_path / 'cache'}", *huge]), tmp_path / "plan")
    dm = json.loads((tmp_path / "plan" / "device_map.json").read_text())
    assert report.status == "planned" and sum(dm["plan"]["planned_bytes"].values()) > 1e12  # > 1 TB of weights
    assert report.peak_rss_bytes < 4 * 2**30
    assert not (tmp_path / "cache" / "checkpoints").exists()  # not even the demo checkpoint is made
    assert not (tmp_path / "plan" / "predictions.jsonl").exists()


def test_an_interrupted_run_resumes_to_the_same_outputs(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    run_job(cfg, tmp_path / "whole")
    original = progress.ResultWriter.append
    calls = []

    def crash_after_two(self, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies here
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(progress.ResultWriter, "append", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_job(cfg, tmp_path / "part")
    monkeypatch.setattr(progress.ResultWriter, "append", original)
    assert len(read_jsonl(tmp_path / "part" / "predictions.jsonl")) == 6
    report = run_job(cfg, tmp_path / "part")
    assert report.resumed_from_batch == 2 and report.status == "completed"
    assert (tmp_path / "part" / "predictions.jsonl").read_bytes() == (tmp_path / "whole" / "predictions.jsonl").read_bytes()
    # Running a completed folder again changes nothing.
    assert run_job(cfg, tmp_path / "part").status == "completed"
    assert (tmp_path / "part" / "predictions.jsonl").read_bytes() == (tmp_path / "whole" / "predictions.jsonl").read_bytes()


def test_a_completed_sweep_job_is_skipped_in_a_new_sweep_folder(tmp_path):
    first = run_job(config(tmp_path), tmp_path / "sweep1" / "0", multirun=True)
    again = run_job(config(tmp_path), tmp_path / "sweep2" / "0", multirun=True)
    assert again.reused_from == str(tmp_path / "sweep1" / "0") and again.status == "completed"
    assert json.loads((tmp_path / "sweep2" / "0" / "metrics.json").read_text())["reused_from"] == first.run_dir
    assert (tmp_path / "sweep2" / "0" / "device_map.json").exists()
    other = run_job(config(tmp_path, "data.batch_size=2"), tmp_path / "sweep2" / "1", multirun=True)
    assert other.reused_from is None and other.batches == 4


@pytest.mark.parametrize("task,check", [("score", "log_likelihood"), ("embed", "embedding")])
def test_other_tasks_run_through_the_engine(tmp_path, task, check):
    report = run_job(config(tmp_path, f"task={task}"), tmp_path / "run")
    records = read_jsonl(tmp_path / "run" / "predictions.jsonl")
    assert report.status == "completed" and len(records) == 7 and all(check in r for r in records)


def test_half_precision_matches_a_half_reference(tmp_path):
    cfg = config(tmp_path, "dtype=bfloat16", "placement.max_memory.cpu=18KiB")
    report = run_job(cfg, tmp_path / "run")
    reference = reference_outputs(reference_model(checkpoint_dir(tmp_path), dtype=torch.bfloat16), cfg.data)
    records = read_jsonl(tmp_path / "run" / "predictions.jsonl")
    for record, top in zip(records, reference):
        torch.testing.assert_close(torch.tensor(record["top_values"]), top.values, rtol=2e-2, atol=2e-2)
    assert report.bytes_per_tier.get("disk", 0) > 0


def test_full_logits_are_written_per_batch(tmp_path):
    from safetensors.torch import load_file

    cfg = config(tmp_path, "task.full_logits=true")
    run_job(cfg, tmp_path / "run")
    files = sorted((tmp_path / "run" / "tensors").glob("batch_*.safetensors"))
    assert len(files) == 3
    model = reference_model(checkpoint_dir(tmp_path))
    first = load_file(str(files[0]))
    from bigjob.job.data import load_samples

    ids = load_samples(cfg.data, TINY["vocab_size"])[0]
    with torch.no_grad():
        expected = model(torch.tensor([ids]))["logits"][0]
    torch.testing.assert_close(first["logits"][0, : len(ids)], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "extra,error,key",
    [
        (["data.batch_size=0"], ConfigError, "data.batch_size"),
        (["placement.max_memory.cpu=12 parsecs"], ConfigError, "placement.max_memory.cpu"),
        (["checkpoint=path", "checkpoint.path=/no/such/model.safetensors"], CheckpointError, "checkpoint.path"),
        (["model._target_=no.such.Model"], ConfigError, "model._target_"),
        (["data=jsonl", "data.path=BAD"], DataError, "line 2"),
        (["hydra_run_dir_is_a_file"], JobError, "hydra.run.dir"),
        (["placement.max_memory.gpu3=1GiB"] if not torch.cuda.is_available() else ["data.batch_size=-1"], BigJobError, "placement.max_memory"
         if not torch.cuda.is_available() else "data.batch_size"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing_to_the_cache(tmp_path, extra, error, key):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[1, 2]\n[3, oops]\n")
    run_dir = tmp_path / "run"
    if extra == ["hydra_run_dir_is_a_file"]:
        (tmp_path / "file").write_text("")
        run_dir, extra = tmp_path / "file" / "run", []
    extra = [e.replace("BAD", str(bad)) for e in extra]
    with pytest.raises(error) as info:
        run_job(config(tmp_path, *extra), run_dir)
    assert isinstance(info.value, BigJobError) and key in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "cache").exists()


def test_a_budget_too_small_for_the_model_stores_nothing(tmp_path):
    with pytest.raises(BigJobError, match="cpu"):
        run_job(config(tmp_path, "placement.max_memory.cpu=1KiB", "placement.max_memory.disk=0"), tmp_path / "run")
    from bigjob.job.cache import JobCache

    with JobCache(tmp_path / "cache") as cache:
        assert cache.keys() == []  # the planner's refusal is not cached


def test_working_memory_auto_keeps_the_largest_batch_forward_free_of_weights(tmp_path):
    from bigjob import estimate_working_memory
    from bigjob.job.data import load_samples, make_batches
    from bigjob.job.empty_model import build_empty_model

    budget = "placement.max_memory.cpu=64KiB"  # the whole model (39 KB) fits: only the working memory moves some to disk
    cfg = config(tmp_path, budget, "placement.working_memory=auto")
    report = run_job(cfg, tmp_path / "run")
    assert report.status == "completed"
    # The largest batch of the 7 samples (3 to a batch, padded to their longest), as the logits task calls the model.
    batches = make_batches(load_samples(cfg.data, TINY["vocab_size"]), cfg.data.batch_size, cfg.data.pad_id)
    rows, tokens = max((tuple(b.input_ids.shape) for b in batches), key=lambda shape: shape[0] * shape[1])
    ids = torch.zeros(rows, tokens, dtype=torch.long)
    expected = estimate_working_memory(build_empty_model(cfg), ids, attention_mask=torch.ones_like(ids))
    assert expected > 0 and report.working_memory_bytes == expected
    plan = json.loads((tmp_path / "run" / "device_map.json").read_text())["plan"]
    assert plan["working_memory"] == expected and plan["budgets"]["cpu"] == 64 * 1024
    assert plan["planned_bytes"]["cpu"] + plan["reserve"].get("cpu", 0) + expected <= 64 * 1024
    without = run_job(config(tmp_path, budget), tmp_path / "plain")
    assert without.working_memory_bytes == 0 and without.plan_key != report.plan_key
    assert without.planned_bytes == {"cpu": 39_488} and report.planned_bytes["disk"] > 0
    # Fewer weights in RAM, the same outputs.
    reference = reference_outputs(reference_model(checkpoint_dir(tmp_path)), cfg.data)
    assert_matches_reference(read_jsonl(tmp_path / "run" / "predictions.jsonl"), reference)
    # mode=plan sizes the same plan from the same batches.
    planned = run_job(config(tmp_path, budget, "placement.working_memory=auto", "mode=plan"), tmp_path / "plan")
    assert planned.plan_key == report.plan_key and planned.plan_cache_hit is True


@pytest.mark.parametrize(
    "value, message",
    [
        ("lots", r"cannot read 'lots' as a size for placement\.working_memory.*placement\.working_memory=auto"),
        ("36KiB", r"working memory \(36\.00 KiB, placement\.working_memory\) leaves no room .* raise placement\.max_memory\.cpu or lower data\.batch_size"),
    ],
)
def test_bad_working_memory_names_the_key_and_leaves_no_cache_entry(tmp_path, value, message):
    with pytest.raises(BigJobError, match=message):
        run_job(config(tmp_path, f"placement.working_memory={value}"), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"placement\.working_memory only shapes a plan bigjob makes.*strategy=explicit"):
        run_job(config(tmp_path, "placement.working_memory=auto", "placement=explicit", "placement.device_map={embed:cpu,rotary:cpu,blocks:disk,norm:cpu,lm_head:cpu}"), tmp_path / "x")
    assert not (tmp_path / "run" / "predictions.jsonl").exists()
    assert run_job(config(tmp_path, "mode=plan"), tmp_path / "ok").plan_cache_hit is False


def test_working_memory_auto_is_estimated_once_per_forward_and_cached(tmp_path, monkeypatch):
    import bigjob.engine.plan.working_memory as wm
    from bigjob.job.cache import JobCache

    traced = []
    real = wm.estimate_working_memory
    monkeypatch.setattr(wm, "estimate_working_memory", lambda *a, **k: traced.append(a[1:]) or real(*a, **k))
    auto = ["placement.max_memory.cpu=64KiB", "placement.working_memory=auto", "mode=plan"]
    first = run_job(config(tmp_path, *auto), tmp_path / "a")
    second = run_job(config(tmp_path, *auto), tmp_path / "b")
    assert len(traced) == 1 and first.working_memory_bytes == second.working_memory_bytes > 0
    assert second.plan_cache_hit is True
    # Another largest batch is another forward: traced again, another figure, another plan.
    third = run_job(config(tmp_path, *auto, "data.batch_size=4"), tmp_path / "c")
    assert len(traced) == 2 and third.working_memory_bytes > first.working_memory_bytes and third.plan_key != first.plan_key
    cache = JobCache(tmp_path / "cache")
    entries = [key for key in cache.keys() if key.startswith("working:")]
    assert len(entries) == 2 and all(cache.get(key)["bytes"] in (first.working_memory_bytes, third.working_memory_bytes) for key in entries)
    # A malformed figure is never stored.
    from bigjob.errors import CacheError

    with pytest.raises(CacheError, match="no bytes"):
        cache.set(entries[0], {"kind": "working", "bytes": "many"})


def test_dispatch_streams_the_units_the_plan_was_made_of(tmp_path, monkeypatch):
    from bigjob.engine.run import paged_units

    streamed = []
    real = paged_units.PagedUnit.pre_forward
    monkeypatch.setattr(paged_units.PagedUnit, "pre_forward", lambda self, *a: streamed.append(self.name) or real(self, *a))
    report = run_job(config(tmp_path), tmp_path / "run")
    device_map = json.loads((tmp_path / "run" / "device_map.json").read_text())["device_map"]
    on_disk = {name for name, device in device_map.items() if device == "disk"}
    # Whole DemoBlocks (the no-split class) on disk, each read once a batch as one unit, not leaf by leaf.
    assert on_disk and all(name.startswith("blocks.") and name.count(".") == 1 for name in on_disk)
    assert sorted(set(streamed)) == sorted(on_disk)
    assert len(streamed) == len(on_disk) * report.batches == sum(report.disk_unit_reads.values())


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="the files weights are mapped from are found through /proc (Linux)")
def test_a_shard_changed_in_place_during_a_forward_records_nothing_of_that_batch(tmp_path, monkeypatch):
    import os
    import time

    from bigjob import get_dispatch_info
    from bigjob.job import tasks

    cfg = config(tmp_path)
    run_job(cfg, tmp_path / "whole")  # the outputs to compare with, and the demo checkpoint the jobs map
    a_day_ago = time.time_ns() - 86_400 * 10**9
    for shard in checkpoint_dir(tmp_path).glob("*.safetensors"):
        os.utime(shard, ns=(a_day_ago, a_day_ago))  # a write now changes the mtime, however coarse the clock
    original = tasks.LogitsTask.run
    saved = {}

    def run_rewriting_a_shard_in_the_last_batch(self, model, batch, device):
        if batch.index != 2:
            return original(self, model, batch, device)
        victim = Path(get_dispatch_info(model).sources.paths[-1])
        saved[victim] = victim.read_bytes()

        def rewrite(module, args, output):  # half-way through the forward: the later layers read new bytes
            data = bytearray(saved[victim])
            data[-256:] = bytes(b ^ 0xFF for b in data[-256:])  # other weights, same size
            with open(victim, "r+b") as handle:
                handle.write(data)

        handle = model.blocks[1].register_forward_hook(rewrite)
        try:
            return original(self, model, batch, device)
        finally:
            handle.remove()

    monkeypatch.setattr(tasks.LogitsTask, "run", run_rewriting_a_shard_in_the_last_batch)
    with pytest.raises(CheckpointError) as info:
        run_job(cfg, tmp_path / "part")
    (victim,) = saved
    message = str(info.value)
    assert f"'{victim}' was changed in place" in message and "Batch 2 was not recorded" in message and "run the job again" in message
    assert "\n" not in message
    # Batch 2 never happened: its lines are not written, and the marker still says two batches.
    assert len(read_jsonl(tmp_path / "part" / "predictions.jsonl")) == 6
    assert json.loads((tmp_path / "part" / "progress.json").read_text())["batches_done"] == 2
    assert not (tmp_path / "part" / "metrics.json").exists()

    monkeypatch.setattr(tasks.LogitsTask, "run", original)
    victim.write_bytes(saved[victim])  # the checkpoint restored: the rerun continues with batch 2
    report = run_job(cfg, tmp_path / "part")
    assert report.status == "completed" and report.resumed_from_batch == 2
    assert (tmp_path / "part" / "predictions.jsonl").read_bytes() == (tmp_path / "whole" / "predictions.jsonl").read_bytes()
    assert_matches_reference(read_jsonl(tmp_path / "part" / "predictions.jsonl"), reference_outputs(reference_model(checkpoint_dir(tmp_path)), cfg.data))
