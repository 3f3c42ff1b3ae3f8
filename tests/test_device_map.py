"""DeviceMap: JSON round trip, longest-prefix lookup, checks against a model, the per-device table."""

from __future__ import annotations

import json

import pytest
from torch import nn

from bigjob.engine.plan.device_map import DeviceMap, PlanSummary, assign_tensors, check_device_map, summarize
from bigjob.engine.plan.devices import UNLIMITED
from bigjob.engine.plan.inventory import build_inventory
from bigjob.engine.plan.resolution import infer_auto_device_map
from bigjob.errors import ConfigError, DeviceMapError
from models_for_planning import TinyLM, all_tensors


def test_json_round_trip_with_summary_is_lossless() -> None:
    model = TinyLM(vocab=16, width=8, depth=4)
    dm = infer_auto_device_map(model, {"cuda:0": 1500, "cpu": 2500, "disk": 10**6}, dtype="bf16", strategy="sequential")
    assert dm.summary is not None and len(dm.devices) == 3
    text = dm.to_json()
    back = DeviceMap.from_json(text)
    assert list(back.items()) == list(dm.items())  # order kept
    assert back.summary == dm.summary
    assert back.to_json() == text
    assert DeviceMap.from_json(json.loads(text)) == dm  # from an already-parsed mapping too
    assert json.loads(text)["plan"]["budgets"]["disk"] == 10**6


def test_json_round_trip_without_summary_and_plain_objects() -> None:
    dm = DeviceMap({"b": 0, "a": "gpu1", "": "cpu"})
    assert list(dm.items()) == [("b", "cuda:0"), ("a", "cuda:1"), ("", "cpu")]
    back = DeviceMap.from_json(dm.to_json())
    assert list(back.items()) == list(dm.items()) and back.summary is None
    assert DeviceMap.from_json('{"x": "disk", "y": 1}') == {"x": "disk", "y": "cuda:1"}
    with pytest.raises(DeviceMapError, match="JSON object"):
        DeviceMap.from_json("[1, 2]")


def test_order_matters_for_equality_between_maps_only() -> None:
    assert DeviceMap({"a": "cpu", "b": "disk"}) != DeviceMap({"b": "disk", "a": "cpu"})
    assert DeviceMap({"a": "cpu", "b": "disk"}) == {"b": "disk", "a": "cpu"}


def test_device_of_takes_the_longest_prefix() -> None:
    dm = DeviceMap({"": "disk", "layers": "cpu", "layers.1": "cuda:0", "layers.1.mlp.weight": "cuda:1"})
    assert dm.device_of("layers.1.mlp.weight") == "cuda:1"
    assert dm.device_of("layers.1.mlp.bias") == "cuda:0"
    assert dm.device_of("layers.10.mlp.weight") == "cpu"  # "layers.1" is not a prefix of "layers.10"
    assert dm.device_of("layers") == "cpu"
    assert dm.device_of("head.weight") == "disk"
    assert dm.devices == ["cuda:0", "cuda:1", "cpu", "disk"]
    with pytest.raises(KeyError):
        DeviceMap({"layers": "cpu"}).device_of("head.weight")


def test_bad_keys_and_devices_are_map_errors() -> None:
    with pytest.raises(DeviceMapError, match="3"):
        DeviceMap({3: "cpu"})
    with pytest.raises(DeviceMapError, match=r"'tpu'.*device_map\['layers'\]"):
        DeviceMap({"layers": "tpu"})
    assert issubclass(DeviceMapError, ConfigError)


def test_check_device_map_accepts_a_complete_map() -> None:
    model = TinyLM(vocab=16, width=8, depth=2, tie=True)
    check_device_map(model, {"": "cpu"})
    check_device_map(model, {"embed": 0, "blocks": "cpu", "norm": "disk", "head": "cuda:0"})
    placed = assign_tensors(build_inventory(model), DeviceMap({"embed": 0, "blocks": "cpu", "norm": "disk", "head": 0}))
    assert set(placed) == set(all_tensors(model))  # every name, aliases and non-persistent buffers included
    assert placed["blocks.1.mask"] == "cpu" and placed["head.weight"] == "cuda:0"


def test_check_device_map_names_uncovered_tensors() -> None:
    model = TinyLM(vocab=16, width=8, depth=2, tie=False)
    with pytest.raises(DeviceMapError) as info:
        check_device_map(model, {"embed": "cpu", "blocks.0": "cpu", "norm": "cpu", "head": "cpu"})
    message = str(info.value)
    assert "blocks.1.norm.weight" in message and "blocks.1.positions" in message and "blocks.1.mask" in message
    assert "blocks.0." not in message  # covered by its key


def test_check_device_map_names_unknown_keys() -> None:
    model = TinyLM(depth=1)
    with pytest.raises(DeviceMapError, match=r"name no module or tensor.*'blocks\.7'.*'decoder'"):
        check_device_map(model, {"": "cpu", "blocks.7": "cpu", "decoder": "disk"})


def test_check_device_map_rejects_tied_tensors_on_two_devices() -> None:
    model = TinyLM(depth=1, tie=True)
    with pytest.raises(DeviceMapError, match=r"tied tensors \['embed.weight', 'head.weight'\].*\['cpu', 'cuda:0'\]"):
        check_device_map(model, {"": "cpu", "head": "cuda:0"})


def test_check_device_map_collects_every_problem() -> None:
    model = TinyLM(depth=1, tie=True)
    with pytest.raises(DeviceMapError) as info:
        check_device_map(model, {"embed": "cpu", "head": "disk", "ghost": "cpu"})
    message = str(info.value)
    assert "'ghost'" in message and "blocks.0.up.weight" in message and "tied tensors" in message


def test_summarize_counts_bytes_once_and_units_per_device() -> None:
    model = TinyLM(vocab=16, width=8, depth=2, tie=True)
    inv = build_inventory(model)
    dm = DeviceMap({"embed": "cuda:0", "blocks": "cpu", "norm": "cpu", "head": "cuda:0"})
    summary = summarize(inv, dm, {"cuda:0": 10**6, "cpu": 10**6}, "explicit", "cuda:0")
    block = (8 + 8 + 16 * 8 + 16 + 8 * 16 + 8 + 8) * 4 + 8 * 8
    assert summary.planned_bytes == {"cuda:0": 16 * 8 * 4, "cpu": 2 * block + (8 + 8) * 4}
    # Units: embed, head on the GPU; 2 x (norm, up, down, positions, mask) + norm on the CPU.
    assert summary.units == {"cuda:0": 2, "cpu": 11}
    assert summary.total_bytes == sum(summary.planned_bytes.values())


def test_describe_table_with_a_summary() -> None:
    summary = PlanSummary(
        strategy="auto",
        budgets={"cuda:0": 4 * 2**30, "cuda:1": 2**30, "cpu": 8 * 2**30, "disk": UNLIMITED},
        planned_bytes={"cuda:0": 3 * 2**30, "cpu": 2 * 2**30, "disk": 5 * 2**20},
        units={"cuda:0": 10, "cpu": 6, "disk": 1},
        main_device="cuda:0",
    )
    dm = DeviceMap({"a": "cuda:0", "b": "cpu", "c": "disk"}, summary)
    lines = dm.describe().splitlines()
    assert lines[0].split() == ["device", "planned", "budget", "share", "units"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["cuda:0"] == ["cuda:0", "3.00", "GiB", "4.00", "GiB", "75.0%", "10"]
    assert rows["cpu"] == ["cpu", "2.00", "GiB", "8.00", "GiB", "25.0%", "6"]
    assert rows["disk"] == ["disk", "5.00", "MiB", "unlimited", "-", "1"]
    assert "cuda:1" not in rows  # budgeted but unused
    assert rows["total"][-1] == "17" and rows["total"][1:3] == [f"{(5 * 2**30 + 5 * 2**20) / 2**30:.2f}", "GiB"]


def test_describe_without_a_summary_counts_entries() -> None:
    lines = DeviceMap({"a": "cpu", "b": "cpu", "c": "disk"}).describe().splitlines()
    assert [line.split() for line in lines] == [["device", "entries"], ["cpu", "2"], ["disk", "1"]]


def test_explicit_maps_round_trip_through_json_with_their_summary() -> None:
    from bigjob.engine.plan.resolution import resolve_device_map

    model = TinyLM(depth=2, tie=True)
    dm = resolve_device_map(model, {"embed": "cpu", "blocks": "disk", "norm": "cpu", "head": "cpu"})
    assert dm.summary is not None and dm.summary.strategy == "explicit"
    back = DeviceMap.from_json(dm.to_json())
    assert back == dm and back.summary == dm.summary


def test_model_without_tensors_needs_no_keys() -> None:
    check_device_map(nn.Sequential(nn.ReLU()), {})


def test_describe_shows_the_users_budget_and_the_planners_cap_beside_it() -> None:
    """A balanced plan caps each GPU below its budget: the budget column is what the user asked for, the cap its own column."""
    caps = {"cuda:0": 2 * 2**30, "cuda:1": 3 * 2**30, "cpu": 8 * 2**30}
    asked = {"cuda:0": 10 * 2**30, "cuda:1": 10 * 2**30, "cpu": 8 * 2**30}
    summary = PlanSummary("balanced", caps, {"cuda:0": 2**30, "cuda:1": 3 * 2**30}, {"cuda:0": 4, "cuda:1": 6}, "cuda:0")
    dm = DeviceMap({"a": "cuda:0", "b": "cuda:1"}, summary)
    lines = dm.describe(asked).splitlines()
    assert lines[0].split() == ["device", "planned", "budget", "cap", "share", "units"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["cuda:0"] == ["cuda:0", "1.00", "GiB", "10.00", "GiB", "2.00", "GiB", "10.0%", "4"]
    assert rows["cuda:1"] == ["cuda:1", "3.00", "GiB", "10.00", "GiB", "3.00", "GiB", "30.0%", "6"]
    same = dm.describe(caps).splitlines()  # nothing capped: no cap column
    assert same[0].split() == ["device", "planned", "budget", "share", "units"]
