"""Multi-GPU placement through the job layer: plans for declared GPU inventories, made on any machine.

`mode=plan` with `placement.max_memory.gpuN=...` plans for GPUs this machine need not have
(a cluster node's inventory, "two 8 GiB GPUs" scaled down to the shrunk demo model); the
tests read the `device_map.json` the job writes. The demo model here (`TINY`) is 39,488
bytes in float32: the tied embedding/head 4,096, four `DemoBlock`s of 8,320 each (kept
whole), the final norm 64 and the rotary tables 2,048. Jobs that execute on GPUs run where
CUDA is present and are skipped elsewhere.
"""

from __future__ import annotations

import json

import pytest
import torch

from _jobkit import TINY_OVERRIDES, compose_config, read_jsonl, reference_model
from bigjob.job.runner import run_job

TOTAL = 39_488
BLOCK = 8_320  # the largest unit
KIB = 1024


def plan(tmp_path, strategy: str, *extra: str, **gpus: str) -> dict:
    """The device_map.json of a `mode=plan` job for GPUs named gpuN=size; every other GPU gets 0 (any machine plans alike)."""
    budgets = [f"placement.max_memory.gpu{i}={gpus.get(f'gpu{i}', 0)}" for i in range(8)]
    run_dir = tmp_path / f"plan-{len(list(tmp_path.glob('plan-*')))}"
    cfg = compose_config(TINY_OVERRIDES + ["mode=plan", "quiet=true", f"cache.dir={tmp_path / 'cache'}", f"placement={strategy}", *budgets, *extra])
    report = run_job(cfg, run_dir)
    assert report.status == "planned" and report.main_device == "cuda:0"
    written = json.loads((run_dir / "device_map.json").read_text())
    assert written["plan"]["strategy"] == strategy and written["plan"]["total_bytes"] == TOTAL
    for device, planned in written["plan"]["planned_bytes"].items():  # every plan keeps within its budgets
        assert planned + written["plan"]["reserve"].get(device, 0) <= written["plan"]["budgets"][device]
    return written


def blocks_on(device_map: dict, device: str) -> list[int]:
    if device_map.get("blocks") == device:
        return [0, 1, 2, 3]
    return [i for i in range(4) if device_map.get(f"blocks.{i}") == device]


TWO_BIG = {"gpu0": "64KiB", "gpu1": "64KiB"}  # "two 8 GiB GPUs": each could hold the whole model


def test_sequential_puts_everything_on_gpu_0_while_it_fits(tmp_path):
    written = plan(tmp_path, "sequential", "placement.max_memory.cpu=64KiB", **TWO_BIG)
    assert written["device_map"] == {"": "cuda:0"} and written["plan"]["planned_bytes"] == {"cuda:0": TOTAL}


def test_balanced_spreads_the_model_over_two_gpus(tmp_path):
    written = plan(tmp_path, "balanced", "placement.max_memory.cpu=64KiB", **TWO_BIG)
    dm, planned = written["device_map"], written["plan"]["planned_bytes"]
    # Each GPU's balanced budget: half the model plus one largest unit.
    assert written["plan"]["budgets"]["cuda:0"] == written["plan"]["budgets"]["cuda:1"] == -(-TOTAL // 2) + BLOCK
    assert blocks_on(dm, "cuda:0") == [0, 1] and blocks_on(dm, "cuda:1") == [2, 3]
    assert dm["embed"] == dm["lm_head"] == "cuda:0"  # tied weights stay together
    assert planned == {"cuda:0": TOTAL - 2 * BLOCK, "cuda:1": 2 * BLOCK}


def test_balanced_low_0_keeps_gpu_0_light(tmp_path):
    written = plan(tmp_path, "balanced_low_0", "placement.max_memory.cpu=64KiB", **TWO_BIG)
    dm, planned = written["device_map"], written["plan"]["planned_bytes"]
    assert blocks_on(dm, "cuda:1") == [0, 1, 2, 3] and planned["cuda:1"] == 4 * BLOCK
    assert planned["cuda:0"] <= BLOCK  # room for one largest unit, no more


def test_balanced_gives_a_small_gpu_what_it_has(tmp_path):
    written = plan(tmp_path, "balanced", "placement.max_memory.cpu=64KiB", gpu0="8KiB", gpu1="64KiB")
    dm = written["device_map"]
    assert blocks_on(dm, "cuda:1") == [0, 1, 2, 3] and blocks_on(dm, "cuda:0") == []  # a block (8,320 B) exceeds 8 KiB
    assert written["plan"]["planned_bytes"]["cuda:0"] == TOTAL - 4 * BLOCK


def test_balanced_over_four_gpus_uses_equal_budgets(tmp_path):
    gpus = {f"gpu{i}": "64KiB" for i in range(4)}
    written = plan(tmp_path, "balanced", "placement.max_memory.cpu=64KiB", **gpus)
    budgets = written["plan"]["budgets"]
    assert len({budgets[f"cuda:{i}"] for i in range(4)}) == 1 and budgets["cuda:0"] == -(-TOTAL // 4) + BLOCK
    used = [f"cuda:{i}" for i in range(4) if written["plan"]["planned_bytes"].get(f"cuda:{i}")]
    assert len(used) >= 3 and sum(written["plan"]["planned_bytes"].values()) == TOTAL


@pytest.mark.parametrize("strategy", ["sequential", "balanced", "balanced_low_0"])
def test_gpus_too_small_for_the_model_share_it_in_order(tmp_path, strategy):
    """Two 24 KiB GPUs hold the model only together: whatever the strategy, GPU 0 takes the first blocks."""
    written = plan(tmp_path, strategy, "placement.max_memory.cpu=12KiB", gpu0="24KiB", gpu1="24KiB")
    dm = written["device_map"]
    assert blocks_on(dm, "cuda:0") == [0, 1] and blocks_on(dm, "cuda:1") == [2, 3]
    assert set(written["plan"]["planned_bytes"]) == {"cuda:0", "cuda:1"} and not written["plan"]["reserve"]


def test_what_the_gpus_cannot_hold_goes_to_disk_with_room_kept_to_bring_it_back(tmp_path):
    written = plan(tmp_path, "sequential", "placement.prefetch=0", "placement.max_memory.cpu=9KiB", gpu0="16KiB", gpu1="9KiB")
    dm, summary = written["device_map"], written["plan"]
    assert blocks_on(dm, "cuda:1") == [0] and blocks_on(dm, "disk") == [1, 2, 3]
    assert summary["planned_bytes"]["disk"] == 3 * BLOCK
    # One block of room on the execution device (GPU 0) and in CPU RAM, where disk reads are staged.
    assert summary["reserve"] == {"cuda:0": BLOCK, "cpu": BLOCK}


def test_planning_for_gpus_this_machine_lacks_loads_nothing_and_running_it_is_refused(tmp_path):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has two GPUs: the plan could run here")
    plan(tmp_path, "balanced", "placement.max_memory.cpu=64KiB", **TWO_BIG)
    assert not (tmp_path / "cache" / "checkpoints").exists()  # not even the demo checkpoint was made
    from bigjob.errors import DeviceError

    cfg = compose_config(TINY_OVERRIDES + ["quiet=true", f"cache.dir={tmp_path / 'cache'}", "placement=balanced",
                                           "placement.max_memory.gpu0=64KiB", "placement.max_memory.gpu1=64KiB"])
    with pytest.raises(DeviceError, match="placement.max_memory"):
        run_job(cfg, tmp_path / "run")


# --------------------------------------------------------------------------- on real GPUs


def _run_on_gpus(tmp_path, *extra):
    cfg = compose_config(TINY_OVERRIDES + ["quiet=true", f"cache.dir={tmp_path / 'cache'}", "data.num_samples=5", "data.seq_len=12",
                                           "data.batch_size=2", *extra])
    report = run_job(cfg, tmp_path / "run")
    (checkpoint,) = (tmp_path / "cache" / "checkpoints").glob("demo-*")
    model = reference_model(checkpoint)
    from bigjob.job.data import load_samples

    for record, ids in zip(read_jsonl(tmp_path / "run" / "predictions.jsonl"), load_samples(cfg.data, 64), strict=True):
        with torch.no_grad():
            top = model(torch.tensor([ids]))["logits"][0].topk(5, dim=-1)
        assert record["top_ids"] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(record["top_values"]), top.values, rtol=1e-4, atol=1e-4)
    return report


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_a_job_on_one_gpu_with_cpu_and_disk_tiers(tmp_path):
    report = _run_on_gpus(tmp_path, "placement=sequential", "placement.max_memory.gpu0=24KiB", "placement.max_memory.cpu=18KiB",
                          *(f"placement.max_memory.gpu{i}=0" for i in range(1, 8)))
    assert report.main_device == "cuda:0" and report.bytes_per_tier.get("cuda:0", 0) > 0
    assert report.bytes_per_tier.get("disk", 0) + report.bytes_per_tier.get("cpu", 0) > 0
    assert report.peak_cuda_allocated_bytes.get("cuda:0", 0) > 0


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_model_parallel_job_over_two_gpus(tmp_path):
    report = _run_on_gpus(tmp_path, "placement=balanced", "placement.max_memory.gpu0=64KiB", "placement.max_memory.gpu1=64KiB",
                          *(f"placement.max_memory.gpu{i}=0" for i in range(2, 8)))
    assert report.bytes_per_tier["cuda:0"] == TOTAL - 2 * BLOCK and report.bytes_per_tier["cuda:1"] == 2 * BLOCK
    assert report.peak_cuda_allocated_bytes["cuda:1"] > 0
