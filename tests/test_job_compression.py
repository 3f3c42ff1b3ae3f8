"""placement.offload_compression in a job: the outputs, the record, the plan and offload keys.

The reference is the job's checkpoint read by safetensors into a demo model in RAM, with the
disk-tier Linear weights replaced by the naive reference's dequantized values (tests/_quantkit.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _jobkit import compose_config, read_jsonl, reference_model
from _quantkit import fake_quantized

from bigjob.job.runner import run_job

# The tiny demo model, wide enough for its Linears to hold whole groups of 64 inputs (about 0.5 MB in float32).
WIDE = dict(vocab_size=64, d_model=64, n_layers=4, n_heads=2, d_ff=128, max_seq_len=64)


def config(tmp_path: Path, *extra: str):
    base = [f"model.kwargs.{k}={v}" for k, v in WIDE.items()] + [
        f"cache.dir={tmp_path / 'cache'}",
        "placement.max_memory.cpu=450KiB",  # room to stream two blocks back, and part of the model on disk
        "data.num_samples=5",
        "data.seq_len=10",
        "data.min_seq_len=4",
        "data.batch_size=2",
        "quiet=true",
    ]
    return compose_config(base + list(extra))


def disk_linears(run_dir: Path) -> list[str]:
    from bigjob.engine.plan.device_map import DeviceMap

    device_map = DeviceMap.from_json((run_dir / "device_map.json").read_text())
    names = [f"blocks.{b}.{name}.weight" for b in range(WIDE["n_layers"]) for name in ("qkv", "proj", "fc_in", "fc_out")]
    found = [name for name in names if device_map.device_of(name) == "disk"]
    assert found, dict(device_map)
    return found


@pytest.mark.slow
def test_an_int8_job_records_its_setting_and_gives_the_outputs_of_its_dequantized_weights(tmp_path: Path):
    cfg = config(tmp_path, "placement.offload_compression=int8")
    report = run_job(cfg, tmp_path / "int8")
    metrics = json.loads((tmp_path / "int8" / "metrics.json").read_text())
    assert report.status == "completed" and metrics["offload_compression"] == "int8"
    assert metrics["offload_folder"] and metrics["offload_cache_hit"] is False  # compressed once into the cache's registry
    (checkpoint,) = (tmp_path / "cache" / "checkpoints").glob("demo-*")
    model = fake_quantized(reference_model(checkpoint, WIDE), disk_linears(tmp_path / "int8"), "int8")
    from bigjob.job.data import load_samples

    for record, sample in zip(read_jsonl(tmp_path / "int8" / "predictions.jsonl"), load_samples(cfg.data, WIDE["vocab_size"])):
        with torch.no_grad():
            top = model(torch.tensor([sample]))["logits"][0].topk(5, dim=-1)
        assert record["top_ids"] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(record["top_values"]), top.values, rtol=1e-4, atol=1e-4)

    again = run_job(cfg, tmp_path / "again")
    assert again.offload_cache_hit is True and again.offload_folder == report.offload_folder and again.plan_cache_hit is True
    plain = run_job(config(tmp_path), tmp_path / "none")
    assert plain.offload_compression == "none" and plain.plan_key != report.plan_key and plain.plan_cache_hit is False
    assert plain.offload_folder != report.offload_folder  # the float32 checkpoint serves its own disk tier: no folder, or another
    assert "compress  int8" in report.summary() and "compress" not in plain.summary()
