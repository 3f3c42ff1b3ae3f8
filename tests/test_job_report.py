"""The run record: lossless JSON, atomic writes, percentiles, memory sampling, the summary text."""

from __future__ import annotations

import os

import pytest

from bigjob.job.report import JobReport, MemorySampler, atomic_write_text, percentile, read_report


def test_round_trip_and_atomic_write(tmp_path):
    report = JobReport(
        status="completed", run_dir=str(tmp_path), job_key="k", mode="run", plan_cache_hit=True,
        bytes_per_tier={"cpu": 10, "disk": 20}, devices=[{"device": "cpu", "total_bytes": 1}], outputs={"outputs": "p"},
    )
    path = report.write()
    assert path.name == "metrics.json" and read_report(tmp_path) == report
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left behind


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_text(target, "old")

    with pytest.raises(TypeError):
        atomic_write_text(target, 123)  # type: ignore[arg-type]
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]


def test_unreadable_records_read_as_none(tmp_path):
    assert read_report(tmp_path) is None
    (tmp_path / "metrics.json").write_text("{not json")
    assert read_report(tmp_path) is None


def test_percentile_matches_linear_interpolation():
    values = [0.5, 0.1, 0.4, 0.2, 0.3]
    assert percentile(values, 50) == pytest.approx(0.3)
    assert percentile(values, 90) == pytest.approx(0.46)
    assert percentile([], 50) is None and percentile([2.0], 90) == 2.0


def test_memory_sampler_sees_an_allocation():
    import mmap

    def anon_now() -> int:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    # A fresh anonymous mapping, not malloc: freed heap left by earlier tests could serve a
    # malloc'd block without raising RssAnon.
    with MemorySampler(interval=0.001) as memory:
        before = anon_now()
        block = mmap.mmap(-1, 64 * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for offset in range(0, len(block), mmap.PAGESIZE):  # touch every page
            block[offset] = 1
        memory.sample()
        block.close()
    assert memory.peak_rss > 0
    if memory.peak_anon is not None:
        assert memory.peak_anon - before >= 60 * 2**20


def test_summary_mentions_weights_times_hits_and_outputs():
    report = JobReport(
        status="completed", run_dir="/r", job_key="k", mode="run", task="logits", plan_seconds=0.01, plan_cache_hit=True,
        load_seconds=0.5, bytes_per_tier={"cpu": 2**20, "disk": 2**21}, main_device="cpu", batches=4, samples=16, tokens=1024,
        samples_per_s=10.0, tokens_per_s=640.0, offload_folder="/c/offload/x", offload_cache_hit=False,
        outputs={"outputs": "/r/predictions.jsonl"},
    )
    text = report.summary()
    for part in ("cpu 1.00 MiB", "disk 2.00 MiB", "cache hit", "built /c/offload/x", "0.50 s", "/r/predictions.jsonl", "640 tokens/s"):
        assert part in text, part
