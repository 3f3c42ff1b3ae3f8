"""Tests of bigjob.engine.run.execution (the cost model and execution plans), the hooks of
bigjob.engine.run.local_units driven by RootHook's token count, dispatch with ``execution=`` on
the CPU, and ``placement.execution`` in the job layer.

Expected thresholds are worked out by hand in each test from the declared rates (the
crossover formula of the module docstring, solved on paper for the regime at hand), never by
calling the code under test. GPU behaviour (weights staying off the GPU, outputs on it) is in
tests/test_cuda.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _enginekit import (
    BLOCK_NUMEL,
    WIDTH,
    empty_model,
    inputs,
    on_meta,
    untied_state,
    write_sharded_safetensors,
)
from _jobkit import TINY_OVERRIDES, compose_config, read_jsonl
from tiny_transformer import make_reference
from torch import nn

from bigjob import (
    cpu_offload,
    disk_offload,
    dispatch_model,
    execution_tokens,
    get_dispatch_info,
    load_checkpoint_and_dispatch,
)
from bigjob.engine.run import dispatch as dispatch_module
from bigjob.engine.run import local_units, prefetcher
from bigjob.engine.plan.devices import UNLIMITED
from bigjob.engine.run.execution import (
    ANY,
    ExecutionPlan,
    ExecutionRates,
    UnitCost,
    UnitDecision,
    measure_rates,
    plan_execution,
    resolve_policy,
    unit_cost,
)
from bigjob.engine.run.hooks import HookHandle, RootHook, TensorSlot, count_tokens
from bigjob.engine.run.prefetcher import Prefetcher, Schedule
from bigjob.engine.run.streamed_units import StreamedUnit
from bigjob.engine.run.local_units import AutoUnit, LocalUnit
from bigjob.engine.tiers.pages import Range
from bigjob.engine.plan.planner import plan
from bigjob.engine.plan.inventory import build_inventory
from bigjob.errors import ConfigError
from bigjob.job import schema
from bigjob.job.identity import job_identity
from bigjob.job.runner import run_job

# A Linear(1024, 1024) in float32, by hand.
LIN_BYTES = (1024 * 1024 + 1024) * 4  # 4,198,400
LIN_FLOPS = 2 * 1024 * 1024  # per token: one multiply-add per weight
LIN_HIDDEN = 1024 * 4  # in_features fp32 values per token
RATES = ExecutionRates(h2d_bytes_per_s=10e9, cpu_flops=1e11, device_flops=1e13)

# A Block of the tiny model (width 32), by hand: qkv 3W^2, proj W^2, up 4W^2, down 4W^2 are matmuls.
BLOCK_BYTES = BLOCK_NUMEL * 4
BLOCK_FLOPS = 2 * 12 * WIDTH * WIDTH
BLOCK_HIDDEN = WIDTH * 4


# --------------------------------------------------------------------------- the cost model


def test_linear_unit_cost_and_crossover_by_hand() -> None:
    inv = build_inventory(nn.Sequential(nn.Linear(1024, 1024)))
    cost = unit_cost(inv, ["0.weight", "0.bias"])
    assert cost == UnitCost(LIN_BYTES, LIN_FLOPS, LIN_HIDDEN)
    # Copy-bound streaming (t * 2.1e6 / 1e13 stays far below 4.2e-4 s here), so local wins while
    # t * (flops / cpu + 2 * hidden / h2d) <= bytes / h2d:
    copy = LIN_BYTES / 10e9  # 4.1984e-4 s
    per_token_local = LIN_FLOPS / 1e11 + 2 * LIN_HIDDEN / 10e9  # 2.179072e-5 s
    assert math.floor(copy / per_token_local) == 19
    assert cost.stream_seconds(1, RATES) == pytest.approx(copy)
    assert cost.local_seconds(1, RATES) == pytest.approx(per_token_local)
    assert cost.crossover(RATES) == 19


def test_device_bound_streaming_moves_the_crossover() -> None:
    # A slow device: streaming is compute-bound from t = copy * device / flops = 4.1984e-4 * 1e9 / 2097152 = 0.2.
    slow_device = ExecutionRates(10e9, 1e11, 1e9)
    # Then local (2.179072e-5 s/token) vs stream (2.097152e-3 s/token): local always cheaper.
    assert UnitCost(LIN_BYTES, LIN_FLOPS, LIN_HIDDEN).crossover(slow_device) == ANY
    # CPU 10x the device's speed but a device only 2x slower per token than local: still never crosses.
    assert UnitCost(LIN_BYTES, LIN_FLOPS, LIN_HIDDEN).crossover(ExecutionRates(10e9, 1e13, 1e11)) == ANY


def test_disk_reads_are_paid_by_both_modes() -> None:
    rates = ExecutionRates(10e9, 1e11, 1e13, disk_bytes_per_s=2e9)
    read = LIN_BYTES / 2e9  # 2.0992e-3 s
    stream = LIN_BYTES / 10e9 + read  # 2.51904e-3 s (copy-bound)
    # local = max(read, t * 2.097152e-5) + t * 8.192e-7: compute-bound past t = 100, then
    # t * 2.179072e-5 <= 2.51904e-3  <=>  t <= 115.6
    assert math.floor(stream / (LIN_FLOPS / 1e11 + 2 * LIN_HIDDEN / 10e9)) == 115
    cost = UnitCost(LIN_BYTES, LIN_FLOPS, LIN_HIDDEN)
    assert cost.crossover(rates, disk=True) == 115
    assert cost.crossover(rates, disk=False) == 19  # a CPU-tier unit does not read from disk


def test_lookups_cost_no_flops_and_cross_over_on_activation_bytes() -> None:
    inv = build_inventory(nn.Sequential(nn.Embedding(1000, 64), nn.LayerNorm(64)))
    embed = unit_cost(inv, ["0.weight"])
    assert embed == UnitCost(1000 * 64 * 4, 0, 64 * 4)
    # Only the round trip costs: 2 * t * 256 / h2d <= 256,000 / h2d  <=>  t <= 500 (a tie runs locally).
    assert embed.crossover(RATES) == 500
    norm = unit_cost(inv, ["1.weight", "1.bias"])  # 1-D tensors: no matmul, width from the last dimension
    assert norm == UnitCost(2 * 64 * 4, 0, 64 * 4)
    assert norm.crossover(RATES) == 1  # 512 B / (2 * 256 B per token)


def test_half_precision_halves_bytes_and_hidden() -> None:
    inv = build_inventory(nn.Sequential(nn.Linear(1024, 1024)), dtype="bf16")
    assert unit_cost(inv, ["0.weight", "0.bias"]) == UnitCost(LIN_BYTES // 2, LIN_FLOPS, LIN_HIDDEN // 2)


# --------------------------------------------------------------------------- rates


def test_rates_from_human_values() -> None:
    rates = ExecutionRates.from_mapping({"h2d": "12GB/s", "cpu_flops": "250G", "device_flops": "1.5 TFLOPS", "disk": "2GiB"})
    assert rates == ExecutionRates(12e9, 250e9, 1.5e12, 2 * 2**30)
    assert ExecutionRates.from_mapping({"h2d_bytes_per_s": 1e10, "cpu_flops": 2.5e11, "device_flops": "2.5e11"}).device_flops == 2.5e11
    assert ExecutionRates.from_mapping({"h2d": "25GB", "cpu_flops": 1, "device_flops": 1}).h2d_bytes_per_s == 25e9
    assert ExecutionRates(**rates.to_dict()) == rates


@pytest.mark.parametrize(
    "values,shown",
    [
        ({"h2d": "fast", "cpu_flops": 1, "device_flops": 1}, r"'fast'.*execution_rates\.h2d"),
        ({"h2d": "-1GB/s", "cpu_flops": 1, "device_flops": 1}, r"'-1GB/s'.*execution_rates\.h2d"),
        ({"h2d": "90%", "cpu_flops": 1, "device_flops": 1}, r"'90%'.*execution_rates\.h2d"),
        ({"h2d": 0, "cpu_flops": 1, "device_flops": 1}, r"execution_rates\.h2d=0\.0"),
        ({"h2d": "1GB", "cpu_flops": "lots", "device_flops": 1}, r"'lots'.*execution_rates\.cpu_flops"),
        ({"h2d": "1GB", "cpu_flops": True, "device_flops": 1}, r"True.*execution_rates\.cpu_flops"),
        ({"h2d": "1GB", "cpu_flops": 1, "device_flops": float("inf")}, r"execution_rates\.device_flops=inf"),
        ({"h2d": "1GB", "cpu_flops": 1}, r"execution_rates lacks device_flops"),
        ({"h2d": "1GB", "cpu_flops": 1, "device_flops": 1, "pcie": 3}, r"unknown keys \['pcie'\]"),
    ],
)
def test_bad_rates_name_the_argument_and_the_value(values: dict, shown: str) -> None:
    with pytest.raises(ConfigError, match=shown):
        ExecutionRates.from_mapping(values)


def test_rates_refuse_non_positive_numbers() -> None:
    with pytest.raises(ConfigError, match=r"cpu_flops=-1\.0"):
        ExecutionRates(1e9, -1, 1e9)


def test_measure_rates_on_the_cpu_is_positive_and_cached() -> None:
    rates = measure_rates("cpu")
    assert rates.h2d_bytes_per_s > 0 and rates.cpu_flops > 0 and rates.device_flops == rates.cpu_flops
    assert measure_rates(torch.device("cpu")) is rates


# --------------------------------------------------------------------------- policies and plans


def test_policy_names_and_tier_mappings() -> None:
    assert resolve_policy("local") == {"cpu": "local", "disk": "local"}
    assert resolve_policy({"cpu": "auto"}) == {"cpu": "auto", "disk": "stream"}


@pytest.mark.parametrize(
    "execution,shown",
    [
        ("fast", r"'fast' for execution;"),
        ("", r"'' for execution;"),
        ({"cpu": "quick"}, r"'quick' for execution\.cpu"),
        ({"gpu": "local"}, r"execution names tiers \['gpu'\]"),
        (3, r"execution=3 is neither"),
    ],
)
def test_unknown_policies_name_the_argument_and_the_value(execution: object, shown: str) -> None:
    with pytest.raises(ConfigError, match=shown):
        resolve_policy(execution)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def gpu_plan():
    """The tiny model planned for a declared cuda:0 (this machine needs none): inventory and map."""
    inv = build_inventory(empty_model(), no_split_module_classes=["Block"])
    # cuda:0 holds the root's tensors, the tied embedding/head, the norm and a block, plus room to stream
    # 2 blocks back; the CPU two blocks (and room to stage 2 from disk); the last block goes to disk.
    budgets = {"cuda:0": 30_000 + 3 * BLOCK_BYTES, "cpu": 4 * BLOCK_BYTES, "disk": UNLIMITED}
    device_map = plan(inv, budgets, "sequential", prefetch=1)
    assert {k: v for k, v in device_map.items() if k.startswith("blocks.")} == {
        "blocks.0": "cuda:0", "blocks.1": "cpu", "blocks.2": "cpu", "blocks.3": "disk"
    }
    return inv, device_map


def offloaded_units(inv, device_map) -> dict[str, str]:
    """Module units on cpu/disk under a GPU main device, with their tier, read off the map."""
    return {u.name: device_map.device_of(u.name) for u in inv.units if u.is_module and device_map.device_of(u.name) in ("cpu", "disk")}


def test_the_declared_plan_has_every_tier(gpu_plan) -> None:
    inv, device_map = gpu_plan
    assert device_map.summary.main_device == "cuda:0"
    tiers = offloaded_units(inv, device_map)
    assert set(tiers.values()) == {"cpu", "disk"}, dict(device_map)
    assert device_map.device_of("embed") == device_map.device_of("head") == "cuda:0"


def test_stream_and_local_apply_to_every_offloaded_unit(gpu_plan) -> None:
    inv, device_map = gpu_plan
    tiers = offloaded_units(inv, device_map)
    for policy in ("stream", "local"):
        execution = plan_execution(inv, device_map, "cuda:0", policy)
        assert {name: d.tier for name, d in execution.decisions.items()} == tiers
        assert {d.policy for d in execution.decisions.values()} == {policy}
        assert all(execution.choose(name, t) == policy for name in tiers for t in (1, 4, 16))
        assert all(d.nbytes == inv.module_sizes[name] for name, d in execution.decisions.items())


def test_a_policy_per_tier_is_honoured(gpu_plan) -> None:
    inv, device_map = gpu_plan
    execution = plan_execution(inv, device_map, "cuda:0", {"cpu": "local", "disk": "auto"}, RATES)
    for name, decision in execution.decisions.items():
        assert decision.policy == ("local" if decision.tier == "cpu" else "auto"), name
        assert (decision.threshold is None) == (decision.policy != "auto")
    assert execution.count("local") + execution.count("auto") == len(execution.decisions)
    assert execution.count("local") > 0 and execution.count("auto") > 0


def test_choose_at_1_4_16_tokens_by_hand(gpu_plan) -> None:
    inv, device_map = gpu_plan
    rates = ExecutionRates(h2d_bytes_per_s=1e10, cpu_flops=5e10, device_flops=1e12)
    # A block: copy 50,816 B / 1e10 = 5.08e-6 s; local 24,576 / 5e10 + 2 * 128 / 1e10 = 5.1712e-7 s per token.
    threshold = math.floor((BLOCK_BYTES / 1e10) / (BLOCK_FLOPS / 5e10 + 2 * BLOCK_HIDDEN / 1e10))
    assert threshold == 9
    execution = plan_execution(inv, device_map, "cuda:0", {"cpu": "auto"}, rates)
    cpu_blocks = [name for name, d in execution.decisions.items() if d.tier == "cpu" and name.startswith("blocks.")]
    assert cpu_blocks
    for name in cpu_blocks:
        assert execution.decisions[name].threshold == threshold
        assert [execution.choose(name, t) for t in (1, 4, 16)] == ["local", "local", "stream"]
        assert execution.choose(name, None) == "stream"  # no token count known: the default path
    disk = [name for name, d in execution.decisions.items() if d.tier == "disk"]
    assert disk and all(execution.choose(name, 1) == "stream" for name in disk)  # disk defaults to stream


def test_auto_thresholds_are_monotone_in_the_rates(gpu_plan) -> None:
    inv, device_map = gpu_plan

    def thresholds(h2d: float, cpu: float) -> dict[str, int]:
        execution = plan_execution(inv, device_map, "cuda:0", "auto", ExecutionRates(h2d, cpu, 1e13))
        return {name: d.threshold for name, d in execution.decisions.items()}

    base = thresholds(1e10, 5e10)
    faster_h2d = thresholds(4e10, 5e10)
    faster_cpu = thresholds(1e10, 2e11)
    assert all(faster_h2d[n] < base[n] for n in base), (base, faster_h2d)
    assert all(faster_cpu[n] > base[n] for n in base), (base, faster_cpu)


def test_tied_units_always_stream() -> None:
    inv = build_inventory(empty_model(), no_split_module_classes=["Block"])
    execution = plan_execution(inv, {"": "cpu", "blocks.0": "cuda:0"}, "cuda:0", "local")
    assert execution.decisions["head"].policy == "stream" and execution.decisions["head"].note
    assert execution.decisions["embed"].policy == "stream"
    assert execution.decisions["blocks.1"].policy == "local" and "blocks.0" not in execution.decisions
    assert execution.decisions["head"].nbytes == 0  # its only tensor is the tie, kept on the device


def test_on_the_cpu_every_offloaded_unit_is_local_whatever_the_policy() -> None:
    inv = build_inventory(empty_model(), no_split_module_classes=["Block"])
    device_map = {"": "cpu", "blocks.2": "disk", "norm": "disk"}
    for policy in ("stream", "local", "auto", {"disk": "stream"}):
        execution = plan_execution(inv, device_map, "cpu", policy)  # no rates needed on the CPU
        assert {n: d.policy for n, d in execution.decisions.items()} == {"blocks.2": "local", "norm": "local"}


def test_plan_errors() -> None:
    inv = build_inventory(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ConfigError, match=r"'sideways' for execution"):
        plan_execution(inv, {"": "cpu"}, "cuda:0", "sideways")
    with pytest.raises(ConfigError, match="execution_rates"):
        plan_execution(inv, {"": "cpu"}, "cuda:0", "auto")  # auto on an accelerator needs rates
    with pytest.raises(KeyError, match="not an offloaded unit"):
        plan_execution(inv, {"": "cpu"}, "cuda:0", "stream").choose("nonesuch", 1)


def test_plan_round_trips_through_json_and_describes_itself(gpu_plan) -> None:
    inv, device_map = gpu_plan
    execution = plan_execution(inv, device_map, "cuda:0", {"cpu": "auto", "disk": "local"}, RATES)
    again = ExecutionPlan.from_dict(json.loads(json.dumps(execution.to_dict())))
    assert again == execution
    lines = execution.describe().splitlines()
    assert lines[0].split()[:5] == ["unit", "tier", "bytes", "policy", "threshold"]
    assert len(lines) == 1 + len(execution.decisions)
    for line, decision in zip(lines[1:], execution.decisions.values()):
        assert line.split()[0] == decision.unit and decision.policy in line.split()
    plain = ExecutionPlan("cuda:0", {"x": UnitDecision("x", "cpu", 10, "auto", ANY)})
    assert plain.describe().splitlines()[1].split()[-1] == "any" and plain.choose("x", 10**9) == "local"


# --------------------------------------------------------------------------- token counting and the hooks


def test_count_tokens_for_ids_and_embeddings() -> None:
    ids = torch.zeros(3, 5, dtype=torch.long)
    embeds = torch.zeros(2, 7, 16)
    mask = torch.ones(3, 5, dtype=torch.bool)
    assert count_tokens((ids,), {}) == 15
    assert count_tokens((), {"input_ids": ids, "attention_mask": torch.ones(3, 9, dtype=torch.long)}) == 15
    assert count_tokens((embeds, ids), {}) == 15  # an integer tensor wins over a float one
    assert count_tokens((embeds,), {"mask": mask}) == 14  # (B, T, C): B * T; bool masks are not tokens
    assert count_tokens(([embeds],), {}) == 14  # inside a list
    assert count_tokens((torch.zeros(3, 1, dtype=torch.int32),), {}) == 3  # one decoding step of 3 rows
    assert count_tokens((1, "x"), {}) is None


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _slots(module: nn.Module) -> list[TensorSlot]:
    return [TensorSlot(module, name, True, param.data) for name, param in module._parameters.items()]


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_auto_units_run_locally_or_streamed_by_the_root_token_count(depth: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # StreamedUnits "to" the CPU copy the weights (a new buffer per forward); local runs use the homes.
    torch.manual_seed(0)
    model = Two().eval()
    schedule = Schedule(Prefetcher(depth))
    units = []
    for child in (model.a, model.b):
        name = "a" if child is model.a else "b"
        stream = StreamedUnit(name, _slots(child), torch.device("cpu"), schedule, None)
        unit = AutoUnit(stream, LocalUnit(name, [], torch.device("cpu"), schedule), 4, schedule)
        unit.position = schedule.add(unit)
        units.append(unit)
    homes = {name: p.data_ptr() for name, p in model.named_parameters()}  # packed into one buffer per unit
    handles = [HookHandle(child, unit) for child, unit in zip((model.a, model.b), units)]
    handles.insert(0, HookHandle(model, RootHook(torch.device("cpu"), schedule, [])))
    copies: list[str] = []
    for unit in units:
        real = unit.stream.prepare
        monkeypatch.setattr(unit.stream, "prepare", lambda real=real, name=unit.name: (copies.append(name), real())[1])
    seen: dict[str, int] = {}
    probes = [child.register_forward_pre_hook(lambda m, args, n=n: seen.__setitem__(n, m.weight.data_ptr())) for n, child in (("a", model.a), ("b", model.b))]
    try:
        for shape, mode in (((1, 1, 8), "local"), ((2, 2, 8), "local"), ((1, 5, 8), "stream"), ((4, 4, 8), "stream"), ((1, 3, 8), "local")):
            x = torch.randn(*shape)
            with torch.no_grad():
                plain = torch.relu(x @ model.a.weight.T + model.a.bias) @ model.b.weight.T + model.b.bias
                out = model(x)
            schedule.prefetcher.drain()
            assert torch.equal(out, plain)
            assert schedule.tokens == shape[0] * shape[1]
            assert all(unit.mode() == mode for unit in units)
            ran_at_home = [seen[n] == homes[f"{n}.weight"] for n in ("a", "b")]
            assert ran_at_home == [mode == "local"] * 2, (shape, mode)
            assert copies == ([] if mode == "local" else ["a", "b"]), (shape, copies)  # no wasted copy
            copies.clear()
        assert {n: p.data_ptr() for n, p in model.named_parameters()} == homes  # homes restored
    finally:
        for probe in probes:
            probe.remove()
        for handle in handles:
            handle.remove()
        schedule.prefetcher.close()


def test_a_pinned_token_count_decides_every_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    schedule = Schedule(Prefetcher(1))
    module = nn.Linear(8, 8)
    stream = StreamedUnit("l", _slots(module), torch.device("cpu"), schedule, None)
    unit = AutoUnit(stream, LocalUnit("l", [], torch.device("cpu"), schedule), 4, schedule)
    unit.position = schedule.add(unit)
    root = nn.Sequential(module)
    handles = [HookHandle(root, RootHook(torch.device("cpu"), schedule, [])), HookHandle(module, unit)]
    home = stream.slots[0].home.data_ptr()
    seen: list[bool] = []
    probe = module.register_forward_pre_hook(lambda m, args: seen.append(m.weight.data_ptr() == home))
    try:
        for pinned, rows, at_home in ((1, 16, True), (100, 1, False), (None, 16, False), (None, 2, True)):
            schedule.pinned = pinned
            x = torch.randn(rows, 8)
            with torch.no_grad():
                assert torch.equal(root(x), x @ stream.slots[0].home.T + stream.slots[1].home)
            schedule.prefetcher.drain()
            assert schedule.tokens == (pinned if pinned is not None else rows)
            assert seen.pop() is at_home, (pinned, rows)
    finally:
        probe.remove()
        for handle in handles:
            handle.remove()
        schedule.prefetcher.close()


def test_execution_tokens_nests_and_restores(sharded: Path) -> None:
    model = load_checkpoint_and_dispatch(empty_model(), sharded, device_map="disk", execution="auto")
    schedule = get_dispatch_info(model).schedule
    with execution_tokens(model, 5):
        with execution_tokens(model, 2):
            assert schedule.pinned == 2
        assert schedule.pinned == 5
        with pytest.raises(RuntimeError):
            with execution_tokens(model, 9):
                raise RuntimeError("a failing forward")
        assert schedule.pinned == 5
    assert schedule.pinned is None
    with execution_tokens(nn.Linear(2, 2), 3):  # not dispatched: nothing to pin, no error
        pass


def test_a_stale_prefetch_in_the_other_mode_is_dropped() -> None:
    schedule = Schedule(Prefetcher(1))
    module = nn.Linear(4, 4)
    stream = StreamedUnit("l", _slots(module), torch.device("cpu"), schedule, None)
    unit = AutoUnit(stream, LocalUnit("l", [], torch.device("cpu"), schedule), 2, schedule)
    unit.position = schedule.add(unit)
    handle = HookHandle(module, unit)
    try:
        schedule.tokens = 100
        schedule.ahead(-1)  # prefetched for streaming ...
        schedule.prefetcher.drain()
        schedule.tokens = 1  # ... but this forward is small: must run at home
        seen = []
        probe = module.register_forward_pre_hook(lambda m, args: seen.append(m.weight.data_ptr()))
        x = torch.randn(1, 4)
        with torch.no_grad():
            assert torch.equal(module(x), x @ stream.slots[0].home.T + stream.slots[1].home)
        probe.remove()
        assert seen == [stream.slots[0].home.data_ptr()]
    finally:
        handle.remove()
        schedule.prefetcher.close()


@pytest.mark.parametrize("depth", [0, 1])
def test_local_units_page_their_files_in_ahead_and_out_after(depth: int, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    monkeypatch.setattr(local_units, "populate", lambda ranges, readahead=True: events.append(("populate", ranges[0].start)))
    monkeypatch.setattr(prefetcher, "release", lambda ranges: events.append(("release", ranges[0].start)))  # deferred by the schedule
    model = Two().eval()
    schedule = Schedule(Prefetcher(depth))
    units = [LocalUnit(n, [Range(i * 4096, 4096)], torch.device("cpu"), schedule) for i, n in enumerate("ab")]
    handles = [HookHandle(model, RootHook(torch.device("cpu"), schedule, []))]
    for child, unit in zip((model.a, model.b), units):
        unit.position = schedule.add(unit)
        handles.append(HookHandle(child, unit))
    try:
        with torch.no_grad():
            model(torch.randn(2, 8))
        schedule.prefetcher.drain()
        assert sorted(events) == sorted([("populate", 0), ("release", 0), ("populate", 4096), ("release", 4096)])
        for start in (0, 4096):  # each unit's pages are mapped in before they are released
            assert events.index(("populate", start)) < events.index(("release", start))
    finally:
        for handle in handles:
            handle.remove()
        schedule.prefetcher.close()


# --------------------------------------------------------------------------- dispatch on the CPU

MIXED = {"": "cpu", "blocks.1": "disk", "blocks.2": "disk", "norm": "disk"}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sharded_safetensors(tmp_path_factory.mktemp("sharded"), untied_state(make_reference()))


@pytest.mark.parametrize("execution", ["stream", "local", "auto", {"cpu": "auto", "disk": "local"}])
def test_dispatch_on_the_cpu_equals_the_model_in_ram(sharded: Path, execution: object, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_measuring(*args: object) -> None:
        raise AssertionError("rates are measured only for an accelerator")

    monkeypatch.setattr(dispatch_module, "measure_rates", no_measuring)
    model = load_checkpoint_and_dispatch(empty_model(), sharded, device_map=MIXED, no_split_module_classes=["Block"], execution=execution)
    reference = make_reference()
    # (A single (1, 1) input is left out: PyTorch's matrix-vector kernel differs in the last bits
    # between weights in file views and on the heap, for every device_map, with or without this policy.)
    for ids in (inputs(batch=2, length=1), inputs(batch=3, length=12)):
        with torch.no_grad():
            assert torch.equal(model(ids), reference(ids))
    info = get_dispatch_info(model)
    assert info.execution is not None and info.execution.main_device == "cpu"
    assert {n: d.policy for n, d in info.execution.decisions.items()} == {"blocks.1": "local", "blocks.2": "local", "norm": "local"}
    assert info.paged_units == 3 and info.streamed_units == info.local_units == info.auto_units == 0


def test_bad_execution_is_refused_before_loading(sharded: Path) -> None:
    model = empty_model()
    with pytest.raises(ConfigError, match=r"'turbo' for execution"):
        load_checkpoint_and_dispatch(model, sharded, device_map="cpu", execution="turbo")
    assert on_meta(model)  # nothing was read
    with pytest.raises(ConfigError, match=r"'12 lanes'.*execution_rates\.h2d"):
        load_checkpoint_and_dispatch(model, sharded, device_map="cpu", execution="auto", execution_rates={"h2d": "12 lanes", "cpu_flops": 1, "device_flops": 1})
    assert on_meta(model)
    with pytest.raises(ConfigError, match="execution"):
        cpu_offload(make_reference(), "cpu", execution="nope")


def test_offload_helpers_take_the_policy(tmp_path: Path) -> None:
    reference = make_reference()
    ids = inputs()
    with torch.no_grad():
        expected = reference(ids)
    rates = {"h2d": "12GB/s", "cpu_flops": "100G", "device_flops": "10T"}
    model = disk_offload(make_reference(), tmp_path / "offload", "cpu", execution="auto", execution_rates=rates)
    with torch.no_grad():
        assert torch.equal(model(ids), expected)
    info = get_dispatch_info(model)
    leaves = 1 + 4 * 6 + 1 + 1  # embed, 6 leaves per block, norm, head: each a unit (no no-split class)
    assert info.execution.count("local") == info.paged_units == leaves
    model = dispatch_model(make_reference(), {"": "cpu"}, execution="local")
    assert get_dispatch_info(model).execution.decisions == {}  # nothing offloaded on a CPU run
    with torch.no_grad():
        assert torch.equal(model(ids), expected)


# --------------------------------------------------------------------------- the job layer


@pytest.mark.parametrize(
    "override,shown",
    [
        ("placement.execution=turbo", r"'turbo' for placement\.execution;"),
        ("placement.execution={cpu:local,disk:sideways}", r"'sideways' for placement\.execution\.disk"),
        ("placement.execution={gpu:local}", r"placement\.execution names tiers"),
        ("placement.rates.h2d=12GB/s", r"placement\.rates lacks cpu_flops, device_flops"),
    ],
)
def test_job_schema_validates_placement_execution(override: str, shown: str) -> None:
    with pytest.raises(ConfigError, match=shown):
        schema.validate(compose_config([override]))


def test_job_schema_bad_rate_names_its_key() -> None:
    cfg = compose_config(["placement.rates.h2d=fast", "placement.rates.cpu_flops=2.5e11", "placement.rates.device_flops=50T"])
    with pytest.raises(ConfigError, match=r"'fast' as a bandwidth for placement\.rates\.h2d"):
        schema.validate(cfg)


def test_job_schema_accepts_policies_and_rates() -> None:
    assert compose_config().placement.execution == "stream"
    for overrides in (
        ["placement.execution=auto"],
        ["placement.execution={cpu:auto,disk:local}", "placement.rates.h2d=12GB/s", "placement.rates.cpu_flops=2.5e11", "placement.rates.device_flops=50T"],
    ):
        cfg = compose_config(overrides)
        schema.validate(cfg)
    assert cfg.placement.execution == {"cpu": "auto", "disk": "local"}
    # (Hydra reads 2.5e11 as a float; the str field then holds '250000000000.0': the same rate.)
    assert ExecutionRates.from_mapping(schema.rate_overrides(cfg.placement.rates)) == ExecutionRates(12e9, 2.5e11, 50e12)


def _job(tmp_path: Path, *extra: str):
    return compose_config(
        TINY_OVERRIDES
        + [f"cache.dir={tmp_path / 'cache'}", "placement.max_memory.cpu=36KiB", "data.num_samples=4", "data.seq_len=8", "data.batch_size=2", "quiet=true", *extra]
    )


def test_execution_changes_neither_the_plan_key_nor_the_offload_folder(tmp_path: Path) -> None:
    gpu = ["placement.max_memory.gpu0=20KiB"]  # a declared GPU: the policy would matter there
    first = run_job(_job(tmp_path, "mode=plan", *gpu), tmp_path / "p1")
    second = run_job(_job(tmp_path, "mode=plan", "placement.execution=auto", *gpu), tmp_path / "p2")
    third = run_job(_job(tmp_path, "mode=plan", "placement.execution={cpu:local,disk:auto}", *gpu), tmp_path / "p3")
    assert first.plan_key == second.plan_key == third.plan_key
    assert first.plan_cache_hit is False and second.plan_cache_hit is True and third.plan_cache_hit is True
    # The job's own key does change: a sweep over policies runs each one.
    assert job_identity(_job(tmp_path, "placement.execution=auto")) != job_identity(_job(tmp_path))
    # Runs on this CPU: same map, same offload folder, same outputs.
    stream = run_job(_job(tmp_path), tmp_path / "r1")
    local = run_job(_job(tmp_path, "placement.execution=local"), tmp_path / "r2")
    assert stream.status == local.status == "completed"
    assert stream.plan_key == local.plan_key and local.plan_cache_hit is True
    assert stream.offload_folder == local.offload_folder
    assert read_jsonl(tmp_path / "r1" / "predictions.jsonl") == read_jsonl(tmp_path / "r2" / "predictions.jsonl")
    metrics = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert metrics["bytes_per_tier"].get("disk", 0) > 0
