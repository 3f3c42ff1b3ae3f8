"""The planner: property tests over random trees and budgets, hand-worked maps, bad input, linear time."""

from __future__ import annotations

import gc
import logging
import time
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from bigjob.engine.plan.device_map import DeviceMap, assign_tensors
from bigjob.engine.plan.devices import format_size, get_max_memory
from bigjob.engine.plan.empty import init_empty_weights
from bigjob.engine.plan.balance import get_balanced_memory
from bigjob.engine.plan.inventory import Unit, build_inventory
from bigjob.engine.plan.planner import STRATEGIES, _collapse, plan
from bigjob.engine.plan.resolution import infer_auto_device_map, resolve_device_map
from bigjob.errors import BudgetError, ConfigError, DeviceMapError
from models_for_planning import (
    CLASS_NAMES,
    Block,
    Mixed,
    TinyLM,
    all_tensors,
    random_model,
    reference_units,
    tensors_under,
    tied_groups,
    tree_specs,
    unique_bytes,
)


def linear_bytes(fan_in: int, fan_out: int, itemsize: int = 4) -> int:
    return (fan_in * fan_out + fan_out) * itemsize


def is_accelerator(device: str) -> bool:
    return device.startswith("cuda:") or device == "mps"


# ----------------------------------------------------------------------------- (1) properties


def clusters_of(model: nn.Module, units: dict[str, int], dtype: torch.dtype | None) -> list[int]:
    """Bytes of each group of units that must share a device (units holding one tied tensor), counted once."""

    def unit_of(name: str) -> str:
        prefix = name
        while prefix not in units:
            prefix = prefix.rpartition(".")[0]
        return prefix

    parent = {unit: unit for unit in units}

    def find(unit: str) -> str:
        while parent[unit] != unit:
            unit = parent[unit]
        return unit

    for group in tied_groups(model):
        holders = sorted({unit_of(name) for name in group})
        for other in holders[1:]:
            parent[find(other)] = find(holders[0])
    members: dict[str, list[str]] = {}
    for unit in units:
        members.setdefault(find(unit), []).append(unit)
    sizes = []
    for group in members.values():
        sizes.append(unique_bytes([t for unit in group for t in tensors_under(model, unit).values()], dtype))
    return sizes


fractions = st.one_of(
    st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 3.0]),
    st.floats(0.0, 2.0, allow_nan=False),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=tree_specs(), data=st.data())
def test_random_plans_place_everything_within_budget(drawn: tuple, data: st.DataObject) -> None:
    model = random_model(drawn)
    dtype = data.draw(st.sampled_from([None, torch.float16, torch.bfloat16, torch.float32]), label="dtype")
    no_split = data.draw(st.lists(st.sampled_from(CLASS_NAMES), unique=True, max_size=3), label="no_split")
    strategy = data.draw(st.sampled_from(STRATEGIES), label="strategy")
    prefetch = data.draw(st.integers(0, 2), label="prefetch")
    units = reference_units(model, no_split, dtype)
    tensors = all_tensors(model)
    total = unique_bytes(tensors.values(), dtype)
    unit = max(units.values())
    # Budgets as shares of the model or as multiples of its largest unit (where reserves start to bind).
    sizes = st.one_of(
        fractions.map(lambda f: int(total * f)),
        st.integers(0, 16).map(lambda k: k * unit // 2),
        st.integers(1, 16).map(lambda k: max(0, k * unit // 2 - 1)),
        st.integers(0, 4).map(lambda k: max(0, total - k * unit // 2)),
    )
    max_memory: dict[str, int] = {}
    for gpu in range(data.draw(st.integers(0, 3), label="gpus")):
        max_memory[f"cuda:{gpu}"] = data.draw(sizes, label=f"cuda:{gpu}")
    max_memory["cpu"] = data.draw(sizes, label="cpu")
    if data.draw(st.booleans(), label="room to stream"):  # mostly mixed plans: offloading with a reserve that fits
        first = "cuda:0" if "cuda:0" in max_memory else "cpu"
        max_memory[first] += (1 + prefetch) * unit
        max_memory["cpu"] += (1 + prefetch) * unit * (first != "cpu")
    disk = data.draw(st.one_of(st.none(), st.just(0), sizes), label="disk")
    if disk is not None:
        max_memory["disk"] = disk
    if all(size == 0 for size in max_memory.values()) and disk is not None:
        with pytest.raises(BudgetError, match="every budget"):
            get_max_memory(max_memory)
        return

    budgets = get_max_memory(max_memory)
    balanced = budgets
    if strategy != "sequential":
        balanced = get_balanced_memory(model, max_memory, no_split, dtype, low_zero=strategy == "balanced_low_0")
    assert all(balanced[d] <= budgets[d] for d in budgets)
    main = next((d for d, size in budgets.items() if d.startswith("cuda:") and size > 0), "cpu")
    largest = (1 + prefetch) * unit
    clusters = clusters_of(model, units, dtype)
    # Plans that certainly exist: all on the execution device, or all on disk streamed through it.
    must_work = budgets.get(main, 0) >= total or (
        budgets["disk"] >= total and budgets.get(main, 0) >= largest and (main == "cpu" or budgets["cpu"] >= largest)
    )
    impossible = max(clusters) > max(budgets.values()) or total > sum(budgets.values())

    try:
        dm = infer_auto_device_map(model, max_memory, no_split, dtype, strategy=strategy, prefetch=prefetch, strict_budget=True)
    except BudgetError as err:
        assert not must_work, f"refused a plan that trivially exists: {err}"
        assert "max_memory[" in str(err)
        check_fallback(model, max_memory, no_split, dtype, strategy, prefetch, err, units, impossible)
        return
    assert not impossible
    # Where strict budgets hold, the fallback never changes the plan.
    assert infer_auto_device_map(model, max_memory, no_split, dtype, strategy=strategy, prefetch=prefetch).to_dict() == dm.to_dict()

    # Every tensor, under every name, buffers included, resolves to exactly one device.
    placed = {name: dm.device_of(name) for name in tensors}
    assert assign_tensors(build_inventory(model), dm) == placed
    for key in dm:  # no dead keys
        assert any(name == key or name.startswith(key + ".") or not key for name in tensors), key
    # Tied tensors together; no-split modules and every unit whole.
    for group in tied_groups(model):
        assert len({placed[name] for name in group}) == 1, group
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module).__name__ in no_split:
            assert len({placed[t] for t in tensors_under(model, name)}) == 1, name
    unit_device = {}
    for unit in units:
        devices = {placed[t] for t in tensors_under(model, unit)}
        assert len(devices) == 1, unit
        unit_device[unit] = devices.pop()
    # Bytes per device, counted from shapes, agree with the summary and fit budget minus reserve.
    planned: dict[str, int] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            planned[placed[name]] = planned.get(placed[name], 0) + unique_bytes([tensor], dtype)
    summary = dm.summary
    assert summary is not None
    assert {d: b for d, b in summary.planned_bytes.items() if b} == {d: b for d, b in planned.items() if b}
    # Balanced budgets are kept only while nothing is offloaded; otherwise the plan uses the full budgets.
    effective = summary.budgets
    assert effective == balanced and not summary.reserve or effective == budgets
    assert summary.main_device == main
    assert sum(summary.units.values()) == len(units)
    assert set(planned) | set(summary.reserve) <= set(effective)
    for device in effective:  # a reserve counts even on a device that holds no weights
        assert planned.get(device, 0) + summary.reserve.get(device, 0) <= effective[device] <= budgets[device], device
    # The execution device keeps room for the largest offloaded unit, times 1 + prefetch.
    streamed = [units[u] for u, d in unit_device.items() if d != main and not is_accelerator(d)]
    if streamed:
        assert summary.reserve.get(main, 0) >= (1 + prefetch) * max(streamed)
    assert DeviceMap.from_json(dm.to_json()) == dm


def check_fallback(model, max_memory, no_split, dtype, strategy, prefetch, refused, units, impossible) -> None:
    """Without strict budgets, a refused plan either fails with the same error or records how it streams instead."""
    try:
        dm = infer_auto_device_map(model, max_memory, no_split, dtype, strategy=strategy, prefetch=prefetch)
    except BudgetError as err:
        assert str(err) == str(refused)
        return
    assert not impossible
    summary = dm.summary
    assert summary.solo_units or summary.over_budget
    for device, budget in summary.budgets.items():
        assert summary.planned_bytes.get(device, 0) + summary.reserve.get(device, 0) <= budget, device
    main = summary.main_device
    placed = {unit: dm.device_of(unit) for unit in units}
    streamed = {u: size for u, size in units.items() if placed[u] != main and not is_accelerator(placed[u])}
    alone = set(summary.solo_units) | set(summary.over_budget)
    assert alone <= set(streamed)
    # Units fetched ahead fit 1 + prefetch at a time in the reserve; those brought alone fit once, or are over budget.
    ahead = [size for u, size in streamed.items() if u not in alone]
    assert (1 + prefetch) * max(ahead, default=0) <= summary.reserve.get(main, 0)
    for unit in summary.solo_units:
        assert streamed[unit] <= summary.reserve[main] <= summary.budgets[main]
    for unit, nbytes in summary.over_budget.items():
        assert nbytes == streamed[unit] > summary.budgets[main] or nbytes > summary.budgets.get("cpu", 0)
    assert summary.streaming_peak.get(main, 0) >= max(streamed.values(), default=0)


unit_names = st.lists(
    st.lists(st.sampled_from(["a", "b", "0", "1"]), max_size=3).map(".".join), min_size=1, max_size=12
)


@settings(max_examples=300, deadline=None)
@given(names=unit_names, data=st.data())
def test_map_entries_are_the_highest_single_device_prefixes(names: list[str], data: st.DataObject) -> None:
    # Any unit names, even ones no module tree makes (duplicates, a unit named like another's prefix).
    devices = data.draw(st.lists(st.sampled_from(["cuda:0", "cpu", "disk"]), min_size=len(names), max_size=len(names)))
    inventory = SimpleNamespace(units=[Unit(name, 1, True) for name in names])

    def devices_under(prefix: str) -> set[str]:
        return {d for n, d in zip(names, devices) if not prefix or n == prefix or n.startswith(prefix + ".")}

    def top(prefix: str) -> str:  # climb while the parent's units share one device
        parent = prefix.rpartition(".")[0]
        return prefix if not prefix or len(devices_under(parent)) > 1 else top(parent)

    expected: dict[str, str] = {}
    for name, device in zip(names, devices):
        expected.setdefault(top(name), device)
    assert list(_collapse(inventory, devices).items()) == list(expected.items())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- (2) fixed cases


def stack(*widths: tuple[int, int]) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(a, b) for a, b in widths])


L16 = linear_bytes(16, 16)  # (256 + 16) x 4 = 1088 bytes
L32 = linear_bytes(32, 32)  # (1024 + 32) x 4 = 4224 bytes


def test_auto_and_balanced_spread_over_two_gpus() -> None:
    model = stack(*[(16, 16)] * 8)  # 8 x 1088 bytes
    total = 8 * L16
    gpus = {"cuda:0": total, "cuda:1": total, "cpu": 10 * total}  # each GPU could hold everything ("8 GiB" each)
    # Balanced budget per GPU: half the model plus one largest unit, so GPU 0 takes 5 layers and GPU 1 the rest.
    per_gpu = total // 2 + L16
    assert get_balanced_memory(model, gpus)["cuda:0"] == per_gpu
    expected = {str(i): "cuda:0" if (i + 1) * L16 <= per_gpu else "cuda:1" for i in range(8)}
    assert list(expected.values()).count("cuda:0") == 5
    for strategy in ("auto", "balanced"):
        dm = infer_auto_device_map(model, gpus, strategy=strategy)
        assert dict(dm) == expected, strategy
        assert dm.summary.planned_bytes == {"cuda:0": 5 * L16, "cuda:1": 3 * L16}
        assert dm.summary.reserve == {}


def test_balanced_gives_a_small_gpu_what_it_has_and_the_rest_to_the_other() -> None:
    model = stack(*[(16, 16)] * 8)
    # GPU 0 holds only 2 layers; an even split would starve the model of GPU 1's room.
    dm = infer_auto_device_map(model, {"cuda:0": 2 * L16, "cuda:1": 100 * L16, "cpu": 100 * L16})
    assert dict(dm) == {"0": "cuda:0", "1": "cuda:0", **{str(i): "cuda:1" for i in range(2, 8)}}


def test_balanced_low_0_keeps_gpu_0_light() -> None:
    model = stack(*[(16, 16)] * 8)
    total = 8 * L16
    # GPU 1 takes the whole model; GPU 0 keeps room for one largest unit only.
    budgets = get_balanced_memory(model, {"cuda:0": total, "cuda:1": total, "cpu": total}, low_zero=True)
    assert budgets["cuda:0"] == L16 and budgets["cuda:1"] == total
    dm = infer_auto_device_map(model, {"cuda:0": total, "cuda:1": total, "cpu": total}, strategy="balanced_low_0")
    assert dict(dm) == {"0": "cuda:0", **{str(i): "cuda:1" for i in range(1, 8)}}


def test_sequential_fills_gpu_0_first() -> None:
    model = stack(*[(16, 16)] * 8)
    total = 8 * L16
    assert dict(infer_auto_device_map(model, {0: total, 1: total, "cpu": total}, strategy="sequential")) == {"": "cuda:0"}
    dm = infer_auto_device_map(model, {0: 3 * L16, 1: 3 * L16, "cpu": total, "disk": 0}, strategy="sequential", prefetch=0)
    # Two layers go to the CPU, so GPU 0 keeps one layer of room to bring them back: it holds 2, GPU 1 holds 3.
    assert dict(dm) == {
        "0": "cuda:0",
        "1": "cuda:0",
        "2": "cuda:1",
        "3": "cuda:1",
        "4": "cuda:1",
        "5": "cpu",
        "6": "cpu",
        "7": "cpu",
    }
    assert dm.summary.reserve == {"cuda:0": L16}


def test_a_device_is_not_abandoned_after_one_big_unit() -> None:
    model = stack((16, 16), (32, 32), (16, 16), (16, 16), (16, 16))  # S, B, S, S, S
    budgets = {"cuda:0": 3 * L16, "cuda:1": 10 * L32, "cpu": 10 * L32}
    dm = infer_auto_device_map(model, budgets, strategy="sequential")
    # B skips to GPU 1, the small layers after it still fill GPU 0 (three fit), the last one follows B.
    assert dict(dm) == {"0": "cuda:0", "1": "cuda:1", "2": "cuda:0", "3": "cuda:0", "4": "cuda:1"}
    assert dm.summary.planned_bytes == {"cuda:0": 3 * L16, "cuda:1": L32 + L16}


def test_tied_embedding_and_head_go_together() -> None:
    model = TinyLM(vocab=16, width=8, depth=2, tie=True)
    embed = 16 * 8 * 4  # 512 bytes, shared with the head
    block = (8 + 8 + 16 * 8 + 16 + 8 * 16 + 8 + 8) * 4 + 8 * 8  # floats + int64 positions = 1280 bytes
    norm = (8 + 8) * 4
    # GPU 0: 2000 bytes, less one block of reserve (prefetch 0) = 720: the embedding (with its head) and the norm.
    dm = infer_auto_device_map(
        model, {"cuda:0": 2000, "cpu": 10**6, "disk": 0}, no_split_module_classes=["Block"], prefetch=0
    )
    assert dict(dm) == {"embed": "cuda:0", "blocks": "cpu", "norm": "cuda:0", "head": "cuda:0"}
    assert dm.summary.reserve == {"cuda:0": block}
    assert dm.summary.planned_bytes == {"cuda:0": embed + norm, "cpu": 2 * block}
    assert dm.summary.total_bytes == embed + 2 * block + norm


def test_direct_buffers_of_a_split_module_stay_in_the_map() -> None:
    model = nn.Sequential(Mixed(4), nn.Linear(4, 4))
    scale, steps, table, inner = 4 * 4, 3 * 4, 4 * 4 * 4, linear_bytes(4, 4)
    # GPU 0 has 100 bytes, less the reserve for the largest unit (80) = 20: only "0.scale" fits.
    dm = infer_auto_device_map(model, {"cuda:0": 100, "cpu": 10**6, "disk": 0}, prefetch=0)
    assert dict(dm) == {"0.scale": "cuda:0", "0.steps": "cpu", "0.table": "cpu", "0.inner": "cpu", "1": "cpu"}
    assert dm.summary.planned_bytes == {"cuda:0": scale, "cpu": steps + table + inner + linear_bytes(4, 4)}
    placed = assign_tensors(build_inventory(model), dm)
    assert placed["0.table"] == "cpu" and placed["0.steps"] == "cpu"  # non-persistent and int buffers placed


def test_special_dtypes_change_what_fits() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8))
    lin = linear_bytes(8, 8, itemsize=2)  # 144 bytes in fp16
    norm32, norm16 = (8 + 8) * 4, (8 + 8) * 2
    budgets = {"cuda:0": lin + 48, "cpu": 10**6, "disk": 0}  # after the reserve (one linear) 48 bytes are left
    plain = infer_auto_device_map(model, budgets, dtype="fp16", prefetch=0)
    assert norm16 <= 48 and dict(plain) == {"0": "cpu", "1": "cuda:0", "2": "cpu"}
    kept = infer_auto_device_map(model, budgets, dtype="fp16", special_dtypes={"1": "fp32"}, prefetch=0)
    assert norm32 > 48 and dict(kept) == {"": "cpu"}
    assert kept.summary.total_bytes == 2 * lin + norm32 and kept.summary.dtype == "float16"


def test_include_buffers_plans_the_same_as_real_buffers() -> None:
    with init_empty_weights(include_buffers=True):
        meta_buffers = nn.Sequential(*[Block(8) for _ in range(4)])
    with init_empty_weights():
        real_buffers = nn.Sequential(*[Block(8) for _ in range(4)])
    assert meta_buffers[0].positions.is_meta and not real_buffers[0].positions.is_meta
    block = (8 + 8 + 16 * 8 + 16 + 8 * 16 + 8 + 8) * 4 + 8 * 8
    # Three blocks of CPU for four: two go to the reserve (prefetch 1), one stays, the rest is on disk.
    budgets = {"cpu": 3 * block, "disk": 10**6}
    expected = {"0": "cpu", "1": "disk", "2": "disk", "3": "disk"}
    for model in (meta_buffers, real_buffers):
        dm = infer_auto_device_map(model, budgets, no_split_module_classes=["Block"])
        assert dict(dm) == expected
        assert dm.summary.reserve == {"cpu": 2 * block}


def test_reserve_on_the_execution_device_scales_with_prefetch() -> None:
    model = stack(*[(16, 16)] * 4)
    budgets = {"cpu": 3 * L16, "disk": 10**6}
    expectations = {
        0: ({"0": "cpu", "1": "cpu", "2": "disk", "3": "disk"}, L16),  # 3 - 1 = 2 layers stay
        1: ({"0": "cpu", "1": "disk", "2": "disk", "3": "disk"}, 2 * L16),  # 3 - 2 = 1 layer stays
        2: ({"": "disk"}, 3 * L16),  # the whole budget is the reserve
    }
    for prefetch, (expected, reserve) in expectations.items():
        dm = infer_auto_device_map(model, budgets, prefetch=prefetch)
        assert dict(dm) == expected, prefetch
        assert dm.summary.reserve == {"cpu": reserve}
        assert dm.summary.planned_bytes.get("cpu", 0) + reserve <= budgets["cpu"]


def test_reserve_with_a_gpu_and_disk_staging() -> None:
    model = stack(*[(16, 16)] * 4)
    dm = infer_auto_device_map(model, {"cuda:0": 3 * L16, "cpu": 3 * L16, "disk": 10**6})
    # GPU keeps 2 layers of room (prefetch 1) for streamed layers; the CPU keeps 2 for staging disk reads.
    assert dict(dm) == {"0": "cuda:0", "1": "cpu", "2": "disk", "3": "disk"}
    assert dm.summary.reserve == {"cuda:0": 2 * L16, "cpu": 2 * L16}


def test_no_reserve_when_everything_is_resident() -> None:
    dm = infer_auto_device_map(stack(*[(16, 16)] * 4), {"cuda:0": 4 * L16, "cpu": L16})
    assert dict(dm) == {"": "cuda:0"} and dm.summary.reserve == {}


def test_a_big_first_unit_stays_resident_when_the_safe_reserve_would_not_fit() -> None:
    model = stack((32, 32), *[(16, 16)] * 6)  # an embedding-like big layer, then small ones
    # 2 x L32 of reserve does not fit the GPU; keeping the big layer resident needs only 2 x L16.
    budget = L32 + 2 * L16 + 2 * L16
    dm = infer_auto_device_map(model, {"cuda:0": budget, "cpu": 10**6, "disk": 0})
    assert dict(dm) == {"0": "cuda:0", "1": "cuda:0", "2": "cuda:0", "3": "cpu", "4": "cpu", "5": "cpu", "6": "cpu"}
    assert dm.summary.reserve == {"cuda:0": 2 * L16}


def test_a_big_tied_embedding_stays_resident_when_it_and_the_reserve_fit() -> None:
    # The embedding and the head share one 2048-byte tensor; each unit counts it, the pair holds it once.
    model = TinyLM(vocab=64, width=8, depth=4, tie=True)
    embed, block, norm = 64 * 8 * 4, 1280, (8 + 8) * 4
    # The safe reserve (2 x the embedding) leaves room for one block only. Keeping the pair on the GPU
    # needs 2 x block of reserve: the pair, one block and the norm fit (counting the pair twice, they would not).
    budget = embed + block + norm + 2 * block
    dm = infer_auto_device_map(model, {"cuda:0": budget, "cpu": 10**6, "disk": 0}, no_split_module_classes=["Block"])
    assert dm.summary.reserve == {"cuda:0": 2 * block}
    assert dm.summary.planned_bytes == {"cuda:0": embed + block + norm, "cpu": 3 * block}
    assert dm["embed"] == dm["head"] == dm["blocks.0"] == dm["norm"] == "cuda:0"


def test_plan_orders_budgets_fastest_first() -> None:
    inv = build_inventory(stack(*[(16, 16)] * 2))
    dm = plan(inv, {"disk": 10**6, "cpu": 10**6, "cuda:0": 10**6})
    assert dict(dm) == {"": "cuda:0"} and dm.summary.main_device == "cuda:0"


def test_resolve_device_map_accepts_devices_maps_and_strategies() -> None:
    model = TinyLM(depth=2, tie=True)
    assert dict(resolve_device_map(model, "cpu")) == {"": "cpu"}
    assert dict(resolve_device_map(model, "disk")) == {"": "disk"}
    assert dict(resolve_device_map(model, 0)) == {"": "cuda:0"}
    assert dict(resolve_device_map(model, torch.device("cuda", 1))) == {"": "cuda:1"}
    single = resolve_device_map(model, "cuda:0")
    assert single.summary.planned_bytes == {"cuda:0": build_inventory(model).total_bytes}
    explicit = {"embed": "cpu", "blocks.0": 0, "blocks.1": "disk", "norm": "cpu", "head": "cpu"}
    resolved = resolve_device_map(model, explicit)
    assert dict(resolved) == {**explicit, "blocks.0": "cuda:0"} and resolved.summary.strategy == "explicit"
    planned = resolve_device_map(model, "sequential", max_memory={"cpu": 10**6})
    assert dict(planned) == {"": "cpu"} and planned.summary.strategy == "sequential"
    assert resolve_device_map(model, planned) is planned


def test_resolve_device_map_rejects_bad_maps() -> None:
    model = TinyLM(depth=1, tie=True)
    with pytest.raises(DeviceMapError, match=r"blocks\.0"):
        resolve_device_map(model, {"embed": "cpu", "norm": "cpu", "head": "cpu"})
    with pytest.raises(DeviceMapError, match="tied tensors"):
        resolve_device_map(model, {"": "cpu", "head": "disk"})
    with pytest.raises(ConfigError, match=r"'fastest'.*'auto'"):
        resolve_device_map(model, "fastest")
    with pytest.raises(ConfigError, match="3.5"):
        resolve_device_map(model, 3.5)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- (3) bad input


def test_unit_larger_than_every_budget_without_disk() -> None:
    model = stack((16, 16), (32, 32), (16, 16))
    with pytest.raises(BudgetError) as info:
        infer_auto_device_map(model, {"cuda:0": 3000, "cpu": 2000, "disk": 0})
    message = str(info.value)
    assert "'1'" in message  # the unit
    assert format_size(L32) in message  # its size
    assert format_size(3000) in message and "(cuda:0)" in message  # the largest budget
    assert "max_memory['cuda:0']" in message and "disk" in message  # what to raise


def test_tied_units_too_big_together_are_named() -> None:
    model = TinyLM(vocab=64, width=8, depth=1, tie=True)  # embedding 64 x 8 x 4 = 2048 bytes
    with pytest.raises(BudgetError, match=r"\['embed', 'head'\].*2.00 KiB"):
        infer_auto_device_map(model, {"cpu": 2000, "disk": 0})


def test_reserve_that_cannot_fit_is_an_error_naming_the_device_with_strict_budget() -> None:
    model = stack((32, 32), (16, 16))
    with pytest.raises(BudgetError) as info:
        infer_auto_device_map(model, {"cpu": 1000, "disk": 10**6}, strict_budget=True)
    message = str(info.value)
    assert "'0'" in message and format_size(2 * L32) in message and "max_memory['cpu']" in message
    assert "prefetch" in message


def test_unknown_strategy_and_negative_prefetch() -> None:
    model = stack((4, 4))
    with pytest.raises(ConfigError, match=r"'greedy'.*\['auto', 'balanced', 'balanced_low_0', 'sequential'\]"):
        infer_auto_device_map(model, {"cpu": 10**6}, strategy="greedy")
    with pytest.raises(ConfigError, match="prefetch=-1"):
        infer_auto_device_map(model, {"cpu": 10**6}, prefetch=-1)


def test_bad_budgets_surface_from_the_planner() -> None:
    model = stack((4, 4))
    with pytest.raises(BudgetError, match="every budget"):
        infer_auto_device_map(model, {"cpu": 0, "disk": 0})
    with pytest.raises(BudgetError, match=r"'lots'"):
        infer_auto_device_map(model, {"cpu": "lots"})
    with pytest.raises(BudgetError, match=r"'npu'"):
        infer_auto_device_map(model, {"npu": 10})


def test_no_split_class_matching_nothing_warns(caplog: pytest.LogCaptureFixture) -> None:
    model = TinyLM(depth=1)
    with caplog.at_level(logging.WARNING, logger="bigjob.engine.plan.resolution"):
        infer_auto_device_map(model, {"cpu": 10**6}, no_split_module_classes=["Block", "LlamaDecoderLayer"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'LlamaDecoderLayer'" in warnings[0]


# ----------------------------------------------------------------------------- (4) linear time


def meta_model(tensors: int) -> nn.Module:
    """A meta model with ``tensors`` tensors in leaves of 8 (4 parameters, 4 buffers), built cheaply."""
    base = torch.empty(tensors, 32, device="meta")
    views = base.unbind(0)  # distinct tensor objects, no storage
    root = nn.Module()
    layers = nn.ModuleList()
    for start in range(0, tensors, 8):
        leaf = nn.Module()
        for k, view in enumerate(views[start : start + 8]):
            if k < 4:
                leaf._parameters[f"w{k}"] = nn.Parameter(view)
            else:
                leaf._buffers[f"b{k}"] = view
        layers.append(leaf)
    root.layers = layers
    return root


def plan_seconds(model: nn.Module) -> float:
    total = sum(t.numel() for t in all_tensors(model).values()) * 4
    budgets = {"cuda:0": total // 8, "cuda:1": total // 8, "cpu": total // 4}
    best = float("inf")
    for _ in range(3):
        gc.collect()
        gc.disable()  # the collector's passes grow with every object alive, not with the planner's work
        try:
            start = time.perf_counter()
            infer_auto_device_map(model, budgets)
            best = min(best, time.perf_counter() - start)
        finally:
            gc.enable()
    return best


def test_planning_time_grows_linearly() -> None:
    # Sizes whose plans take tens of milliseconds: at a few, timer noise decides the ratio.
    small, large = plan_seconds(meta_model(50_000)), plan_seconds(meta_model(100_000))
    assert large < 3 * small, f"2x the tensors took {large / small:.1f}x the time ({small:.3f}s -> {large:.3f}s)"


def test_a_200k_tensor_model_plans_quickly() -> None:
    model = meta_model(200_000)
    start = time.perf_counter()
    dm = infer_auto_device_map(model, {"cuda:0": 10**6, "cuda:1": 10**6, "cpu": 10**7})
    elapsed = time.perf_counter() - start
    assert {"cuda:0", "cuda:1", "cpu", "disk"} == set(dm.devices)
    assert elapsed < 5, f"planning 200k tensors took {elapsed:.2f}s"
