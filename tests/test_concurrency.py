"""Jobs sharing one cache: compute once, build once, and never serve one model's entries to another.

``tests/test_cli.py::test_two_jobs_started_at_once_both_succeed_and_plan_once`` runs two jobs
without an offload folder; here four start at once on a job whose disk tier needs converting
(float16, as ``experiment=half_offload`` does), so the offload folder is contended too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from _faultkit import JOB, leftovers, marker_holds, metrics, offload_folders
from _jobkit import TINY, cli_env, compose_config, read_jsonl, reference_model
from safetensors.torch import save_file

from bigjob.job.runner import run_job
from bigjob.models.demo import demo_checkpoint_spec, demo_tensor


def test_four_jobs_started_at_once_plan_once_and_build_the_offload_folder_once(tmp_path):
    env = cli_env({"BIGJOB_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})  # 4 jobs on few cores
    # experiment=half_offload (float16, disk tier converted) on the tiny model with a budget it needs disk under.
    args = ["experiment=half_offload", *JOB]
    jobs = [
        subprocess.Popen([sys.executable, "-m", "bigjob", *args, f"hydra.run.dir={tmp_path / f'run{i}'}"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    outputs = [job.communicate(timeout=240) for job in jobs]
    assert [job.returncode for job in jobs] == [0] * 4, [err for _, err in outputs]
    records = [metrics(tmp_path / f"run{i}") for i in range(4)]
    assert all(r["status"] == "completed" and r["offload_folder"] for r in records)
    assert sorted(r["plan_cache_hit"] for r in records) == [False, True, True, True]  # computed by one, read by three
    assert sorted(r["offload_cache_hit"] for r in records) == [False, True, True, True]  # built by one, reused by three
    assert len({r["offload_folder"] for r in records}) == 1 and len({r["plan_key"] for r in records}) == 1
    (folder,) = offload_folders(tmp_path / "cache")
    assert marker_holds(folder) and str(folder) == records[0]["offload_folder"]
    predictions = {(tmp_path / f"run{i}" / "predictions.jsonl").read_bytes() for i in range(4)}
    assert len(predictions) == 1
    assert leftovers(tmp_path) == []


def _checkpoint(folder, seed: int, mtime_ns: int):
    """The tiny model's weights from ``seed`` as ``folder/model.safetensors`` with a given mtime."""
    folder.mkdir()
    spec = demo_checkpoint_spec(TINY)
    save_file({name: demo_tensor(name, shape, seed, TINY["n_layers"]) for name, shape in spec}, str(folder / "model.safetensors"))
    os.utime(folder / "model.safetensors", ns=(mtime_ns, mtime_ns))
    return folder


def _top_ids(model, data):
    from bigjob.job.data import load_samples

    ids = load_samples(data, TINY["vocab_size"])
    with torch.no_grad():
        return [model(torch.tensor([seq]))["logits"][0].float().topk(5, dim=-1).indices.tolist() for seq in ids]


def test_two_models_sharing_one_cache_never_see_each_others_entries(tmp_path):
    """Two checkpoints alike in every file name, size and mtime (copies made with cp -p, rsync -a, tar) but
    with other weights, then another architecture: each gets its own plan and offload folder, and its own outputs."""
    mtime = 1_700_000_000 * 10**9
    first, second = _checkpoint(tmp_path / "a", seed=1, mtime_ns=mtime), _checkpoint(tmp_path / "b", seed=2, mtime_ns=mtime)
    assert (first / "model.safetensors").stat().st_size == (second / "model.safetensors").stat().st_size
    common = JOB + [f"cache.dir={tmp_path / 'cache'}", "checkpoint=path"]

    reports = {}
    for name, folder in (("a", first), ("b", second)):
        cfg = compose_config(common + [f"checkpoint.path={folder}"])
        reports[name] = run_job(cfg, tmp_path / f"run-{name}")
        assert reports[name].plan_cache_hit is False and reports[name].offload_cache_hit is False
        # float16 weights of this checkpoint, in RAM, without bigjob's loader
        expected = _top_ids(reference_model(folder, dtype=torch.float16), cfg.data)
        assert [r["top_ids"] for r in read_jsonl(tmp_path / f"run-{name}" / "predictions.jsonl")] == expected
    assert reports["a"].offload_folder != reports["b"].offload_folder
    assert reports["a"].plan_key != reports["b"].plan_key

    other = run_job(compose_config(JOB + [f"cache.dir={tmp_path / 'cache'}", "model.kwargs.d_ff=48"]), tmp_path / "run-c")
    assert other.plan_cache_hit is False and other.offload_cache_hit is False
    assert other.offload_folder not in (reports["a"].offload_folder, reports["b"].offload_folder)

    # Each model's rerun is served its own entries.
    again = run_job(compose_config(common + [f"checkpoint.path={second}"]), tmp_path / "run-b2")
    assert again.plan_cache_hit is True and again.offload_folder == reports["b"].offload_folder
    assert json.loads((tmp_path / "run-b2" / "predictions.jsonl").read_text().splitlines()[0]) == read_jsonl(tmp_path / "run-b" / "predictions.jsonl")[0]


def test_a_sweep_over_growing_budgets_converts_the_disk_tier_once(tmp_path):
    """Each larger budget puts a subset of the smaller one's layers on disk: the folder built first serves
    them all, and every job computes what the float16 model in RAM computes."""
    folder = _checkpoint(tmp_path / "ckpt", seed=3, mtime_ns=1_700_000_000 * 10**9)
    expected = None
    served = {}
    for budget in ("12KiB", "16KiB", "18KiB"):
        cfg = compose_config(JOB + [f"cache.dir={tmp_path / 'cache'}", "checkpoint=path", f"checkpoint.path={folder}",
                                    f"placement.max_memory.cpu={budget}"])
        report = run_job(cfg, tmp_path / f"run-{budget}")
        expected = expected or _top_ids(reference_model(folder, dtype=torch.float16), cfg.data)
        assert [r["top_ids"] for r in read_jsonl(tmp_path / f"run-{budget}" / "predictions.jsonl")] == expected
        served[budget] = (report.offload_cache_hit, report.offload_folder, report.bytes_per_tier["disk"])
    assert served["12KiB"][0] is False and served["16KiB"][0] is True and served["18KiB"][0] is True
    assert len({folder for _, folder, _ in served.values()}) == 1
    assert served["16KiB"][2] < served["12KiB"][2]  # fewer layers on disk, served from the larger folder
    assert offload_folders(tmp_path / "cache") == [Path(served["12KiB"][1])]
    # Shrinking budgets need layers the first folder lacks: each gets a folder of its own.
    for budget in ("16KiB", "12KiB"):
        cfg = compose_config(JOB + [f"cache.dir={tmp_path / 'cache2'}", "checkpoint=path", f"checkpoint.path={folder}",
                                    f"placement.max_memory.cpu={budget}"])
        assert run_job(cfg, tmp_path / f"shrink-{budget}").offload_cache_hit is False
    assert len(offload_folders(tmp_path / "cache2")) == 2


def test_jobs_pruning_each_other_at_once_never_lose_a_folder_they_use(tmp_path):
    """Four jobs at once, two dtypes, each with cache.max_size=1: each prunes every folder no running job
    holds as it ends. None may lose its folder while it builds or reads it: all complete with the
    outputs of the model in RAM in their dtype."""
    folder = _checkpoint(tmp_path / "ckpt", seed=5, mtime_ns=1_700_000_000 * 10**9)
    env = cli_env({"BIGJOB_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    dtypes = ["float16", "bfloat16", "float16", "bfloat16"]
    jobs = [
        subprocess.Popen([sys.executable, "-m", "bigjob", *JOB, f"dtype={dtype}", "checkpoint=path", f"checkpoint.path={folder}",
                          "cache.max_size=1", f"hydra.run.dir={tmp_path / f'run{i}'}"],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i, dtype in enumerate(dtypes)
    ]
    outputs = [job.communicate(timeout=240) for job in jobs]
    assert [job.returncode for job in jobs] == [0] * 4, [err for _, err in outputs]
    data = compose_config(JOB).data
    expected = {dtype: _top_ids(reference_model(folder, dtype=getattr(torch, dtype)), data) for dtype in set(dtypes)}
    for i, dtype in enumerate(dtypes):
        assert metrics(tmp_path / f"run{i}")["status"] == "completed"
        assert [r["top_ids"] for r in read_jsonl(tmp_path / f"run{i}" / "predictions.jsonl")] == expected[dtype], (i, dtype)
    # The last jobs to end pruned the others' folders: at most the two last ones' remain, each complete.
    remaining = offload_folders(tmp_path / "cache")
    assert 1 <= len(remaining) <= 2 and all(marker_holds(f) for f in remaining)
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- threads sharing one dispatched model


class EightLinears(torch.nn.Sequential):
    def __init__(self) -> None:
        super().__init__(*[torch.nn.Linear(64, 64) for _ in range(8)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["checkpoint files", "fp16 offload folder"])
@pytest.mark.parametrize("disk_reads", ["mapped", "direct", "auto"])
def test_threads_calling_one_dispatched_model_at_once_each_get_the_in_ram_output(tmp_path, disk_reads, dtype):
    from bigjob import init_empty_weights, load_checkpoint_and_dispatch
    from bigjob.engine.checkpoints.safetensors_writer import write_file

    torch.manual_seed(0)
    reference = EightLinears().to(dtype)
    write_file(tmp_path / "model.safetensors", {k: v.float().contiguous() for k, v in reference.state_dict().items()})
    with init_empty_weights():
        empty = EightLinears()
    model = load_checkpoint_and_dispatch(
        empty, tmp_path / "model.safetensors", max_memory={"cpu": "60KiB"}, disk_reads=disk_reads, dtype=dtype,
        offload_folder=tmp_path / "offload",
    )
    assert "disk" in model.hf_device_map.values()  # the case that went wrong: part of the model read from disk
    inputs = [torch.randn(3, 64, generator=torch.Generator().manual_seed(i)).to(dtype) for i in range(8)]
    with torch.no_grad():
        expected = [reference(x) for x in inputs]
    wrong, errors = [], []

    def forwards(thread: int) -> None:
        for i in range(50):
            k = (thread + i) % len(inputs)
            try:
                with torch.no_grad():
                    out = model(inputs[k])
                if not torch.equal(out, expected[k]):
                    wrong.append((thread, i))
            except Exception as err:  # noqa: BLE001 - every failure is counted, none may happen
                errors.append(repr(err))

    threads = [threading.Thread(target=forwards, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(wrong), errors[:3]) == (0, [])
    with torch.no_grad():  # and the model is sound afterwards
        assert all(torch.equal(model(x), e) for x, e in zip(inputs, expected))
