"""Cache keys: every input that changes a plan changes its key, nothing else does, in any process."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from _jobkit import REPO, TINY
from bigjob.engine.plan.empty import init_empty_weights
from bigjob.job.fingerprint import (
    OffloadInputs,
    PlanInputs,
    job_key,
    offload_fingerprint,
    plan_fingerprint,
    tensor_signature,
)
from bigjob.models.demo import DemoTransformer

BASE = PlanInputs(
    model_class="bigjob.models.demo.DemoTransformer",
    model_kwargs={"_target_": "bigjob.models.demo.DemoTransformer", **TINY},
    tensors=[("embed.weight", (64, 16), "float32", "embed.weight"), ("lm_head.weight", (64, 16), "float32", "embed.weight")],
    dtype=None,
    special_dtypes={},
    budgets={"cpu": 100_000, "disk": 2**62},
    strategy="auto",
    no_split=["DemoBlock"],
    prefetch=1,
    devices=[{"device": "cpu", "total_bytes": 2**34, "free_bytes": 2**33}],
    checkpoint={"format": "safetensors", "files": [{"name": "model.safetensors", "size": 10, "mtime_ns": 1}], "index": None},
    planner_version="1",
)

# One change per input the plan depends on.
CHANGES = {
    "model_class": "other.Model",
    "model_kwargs": {"_target_": "bigjob.models.demo.DemoTransformer", **TINY, "d_model": 32},
    "tensors": [("embed.weight", (64, 16), "float16", "embed.weight"), ("lm_head.weight", (64, 16), "float16", "embed.weight")],
    "dtype": "float16",
    "special_dtypes": {"embed.weight": "float32"},
    "budgets": {"cpu": 200_000, "disk": 2**62},
    "strategy": "sequential",
    "no_split": ["DemoBlock", "RMSNorm"],
    "prefetch": 2,
    "devices": [{"device": "cpu", "total_bytes": 2**35, "free_bytes": 2**33}],
    "checkpoint": {"format": "safetensors", "files": [{"name": "model.safetensors", "size": 10, "mtime_ns": 2}], "index": None},
    "planner_version": "2",
    "working_memory": 4096,
    "strict_budget": True,
    "offload_compression": "int8",
}


def test_every_plan_input_changes_the_key():
    assert set(CHANGES) == {f.name for f in dataclasses.fields(PlanInputs)}
    base = plan_fingerprint(BASE)
    keys = {name: plan_fingerprint(dataclasses.replace(BASE, **{name: value})) for name, value in CHANGES.items()}
    assert base not in keys.values()
    assert len(set(keys.values())) == len(keys)


def test_what_does_not_change_the_plan_does_not_change_the_key():
    same = [
        dataclasses.replace(BASE, devices=[{"device": "cpu", "total_bytes": 2**34, "free_bytes": 12345}]),  # free memory moves
        dataclasses.replace(BASE, no_split=["DemoBlock", "DemoBlock"]),  # a set
        dataclasses.replace(BASE, budgets={"disk": 2**62, "cpu": 100_000}),  # dict order
        dataclasses.replace(BASE, model_kwargs=dict(reversed(list(BASE.model_kwargs.items())))),
        dataclasses.replace(BASE, tensors=[tuple(list(t)) for t in BASE.tensors]),
    ]
    assert {plan_fingerprint(s) for s in same} == {plan_fingerprint(BASE)}


@settings(max_examples=60, deadline=None)
@given(cpu=st.integers(0, 2**40), other=st.integers(0, 2**40), strategy=st.sampled_from(["auto", "balanced", "balanced_low_0", "sequential"]))
def test_budgets_and_strategy_key_exactly(cpu, other, strategy):
    a = dataclasses.replace(BASE, budgets={"cpu": cpu, "disk": 2**62}, strategy=strategy)
    b = dataclasses.replace(BASE, budgets={"cpu": other, "disk": 2**62}, strategy=strategy)
    assert (plan_fingerprint(a) == plan_fingerprint(b)) == (cpu == other)


def test_key_is_the_same_in_another_process():
    code = (
        "import sys; sys.path.insert(0, 'tests');"
        "from test_job_fingerprint import BASE; from bigjob.job.fingerprint import plan_fingerprint;"
        "print(plan_fingerprint(BASE))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PYTHONHASHSEED": "123"}, check=True)
    assert out.stdout.strip() == plan_fingerprint(BASE)


def test_tensor_signature_sees_shapes_dtypes_and_ties():
    with init_empty_weights():
        model = DemoTransformer(**TINY)
        wider = DemoTransformer(**{**TINY, "d_ff": 48})
        untied = DemoTransformer(**TINY)
        untied.lm_head.weight = nn.Parameter(torch.empty(64, 16, device="meta"))
    sig = tensor_signature(model)
    names = [s[0] for s in sig]
    assert "lm_head.weight" in names and "rotary.cos" in names  # tied parameters and buffers are listed
    assert dict((s[0], s[3]) for s in sig)["lm_head.weight"] == "embed.weight"
    assert sig != tensor_signature(wider)
    assert sig != tensor_signature(untied)
    assert sig != tensor_signature(model.half())
    with init_empty_weights():
        assert tensor_signature(DemoTransformer(**TINY)) == sig  # rebuilding gives the same signature


def test_offload_key_depends_on_dtype_disk_modules_and_checkpoint():
    base = OffloadInputs({"files": [1]}, list(BASE.tensors), "float16", {}, ["blocks.2", "blocks.3"])
    key = offload_fingerprint(base)
    assert offload_fingerprint(dataclasses.replace(base, disk_modules=["blocks.3", "blocks.2"])) == key
    for change in ({"dtype": "bfloat16"}, {"disk_modules": ["blocks.3"]}, {"checkpoint": {"files": [2]}}, {"special_dtypes": {"x": "float32"}}, {"offload_buffers": True}):
        assert offload_fingerprint(dataclasses.replace(base, **change)) != key, change
    assert offload_fingerprint(base) != plan_fingerprint(BASE)


def test_offload_compression_changes_the_plan_and_offload_keys_and_none_keeps_the_keys_of_before():
    offload = OffloadInputs({"files": [1]}, list(BASE.tensors), "float16", {}, ["blocks.2"])
    keys = {c: offload_fingerprint(dataclasses.replace(offload, compression=c)) for c in ("none", "int8", "int4")}
    plans = {c: plan_fingerprint(dataclasses.replace(BASE, offload_compression=c)) for c in ("none", "int8", "int4")}
    assert len(set(keys.values())) == 3 and len(set(plans.values())) == 3  # an int8 folder or plan never serves another setting
    # "none" hashes exactly what was hashed before the setting existed: folders and plans made then are still found.
    assert "compression" not in offload.to_json() and "offload_compression" not in BASE.to_json()
    assert keys["none"] == offload_fingerprint(offload) and plans["none"] == plan_fingerprint(BASE)
    cfg = {"placement": {"strategy": "auto"}}
    assert job_key({"placement": {"strategy": "auto", "offload_compression": "none"}}) == job_key(cfg)
    assert job_key({"placement": {"strategy": "auto", "offload_compression": "int4"}}) != job_key(cfg)


def test_job_key_ignores_presentation_only():
    cfg = {"mode": "run", "quiet": False, "skip_completed": True, "data": {"batch_size": 4}}
    assert job_key(cfg) == job_key({**cfg, "quiet": True, "skip_completed": False})
    assert job_key(cfg) != job_key({**cfg, "data": {"batch_size": 8}})
    assert json.loads(json.dumps(cfg)) == cfg  # keys are built from JSON data only
