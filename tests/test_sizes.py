"""Byte accounting: module sizes, dtypes, buffers, ties, special dtypes, units and tensor records."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bigjob.engine.plan.device_map import check_device_map
from bigjob.engine.plan.empty import init_empty_weights
from bigjob.engine.plan.dtypes import resolve_dtype
from bigjob.engine.plan.inventory import build_inventory, compute_module_sizes
from bigjob.errors import ConfigError, DeviceMapError
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


def test_block_sizes_by_hand_in_bf16() -> None:
    # Block(8): norm (8 + 8), up (16x8 + 16), down (8x16 + 8) floats; positions 8 x int64; mask 8 floats.
    inv = build_inventory(Block(8), dtype=torch.bfloat16)
    assert inv.module_sizes["norm"] == (8 + 8) * 2
    assert inv.module_sizes["up"] == (16 * 8 + 16) * 2
    assert inv.module_sizes["down"] == (8 * 16 + 8) * 2
    direct = 8 * 8 + 8 * 2  # int64 positions keep 8 bytes; the float mask becomes bf16
    assert inv.module_sizes[""] == (8 + 8) * 2 + (16 * 8 + 16) * 2 + (8 * 16 + 8) * 2 + direct
    assert inv.total_bytes == inv.module_sizes[""]


def test_stored_dtypes_kept_without_a_target() -> None:
    model = nn.Module()
    model.fp16 = nn.Parameter(torch.zeros(3, 5, dtype=torch.float16))
    model.fp64 = nn.Parameter(torch.zeros(7, dtype=torch.float64))
    model.register_buffer("flags", torch.zeros(9, dtype=torch.bool))
    assert compute_module_sizes(model)[""] == 3 * 5 * 2 + 7 * 8 + 9 * 1
    # With a target every floating tensor takes it; bool stays one byte.
    assert compute_module_sizes(model, dtype="float32")[""] == 3 * 5 * 4 + 7 * 4 + 9 * 1


def test_integer_and_bool_buffers_keep_their_dtype_under_bf16() -> None:
    model = nn.Module()
    model.register_buffer("ids", torch.zeros(10, dtype=torch.int64))
    model.register_buffer("small", torch.zeros(6, dtype=torch.int32))
    model.register_buffer("mask", torch.zeros(4, 4, dtype=torch.bool))
    model.register_buffer("scale", torch.zeros(5))
    inv = build_inventory(model, dtype=torch.bfloat16)
    assert inv.total_bytes == 10 * 8 + 6 * 4 + 4 * 4 * 1 + 5 * 2
    records = inv.tensors
    assert records["ids"].dtype == torch.int64 and records["mask"].dtype == torch.bool
    assert records["small"].dtype == torch.int32 and records["scale"].dtype == torch.bfloat16


def test_persistent_and_non_persistent_buffers_are_counted() -> None:
    inv = build_inventory(Mixed(4))
    # scale 4 floats, steps 3 x int32, table 4x4 floats (non-persistent), inner 4x4 + 4 floats
    assert inv.module_sizes[""] == 4 * 4 + 3 * 4 + 4 * 4 * 4 + (4 * 4 + 4) * 4
    assert inv.tensors["table"].is_buffer and not inv.tensors["table"].persistent
    assert inv.tensors["steps"].is_buffer and inv.tensors["steps"].persistent
    assert not inv.tensors["scale"].is_buffer


def test_tied_weights_counted_once_in_ancestors() -> None:
    model = TinyLM(vocab=16, width=8, depth=2, tie=True)
    untied = TinyLM(vocab=16, width=8, depth=2, tie=False)
    inv, inv_untied = build_inventory(model), build_inventory(untied)
    embed = 16 * 8 * 4
    assert inv.module_sizes["embed"] == embed and inv.module_sizes["head"] == embed  # each module holds it
    assert inv.total_bytes == inv_untied.total_bytes - embed  # but the model counts it once
    assert inv.tied_groups == [("embed.weight", "head.weight")]
    assert inv.alias_of == {"head.weight": "embed.weight"}
    assert inv.tensor("head.weight") is inv.tensors["embed.weight"]
    assert inv.tensors["embed.weight"].aliases == ("head.weight",)


@pytest.mark.parametrize("special", [{"head": "float32"}, {"embed": "float32"}])
def test_a_tied_tensor_counts_at_its_first_names_dtype(special: dict[str, str]) -> None:
    # The first name (embed.weight) decides the dtype, even when special dtypes select only one of the names.
    inv = build_inventory(TinyLM(vocab=16, width=8, depth=2, tie=True), dtype=torch.float16, special_dtypes=special)
    embed = 16 * 8 * (4 if "embed" in special else 2)
    assert inv.tensors["embed.weight"].nbytes == embed
    assert inv.module_sizes["embed"] == inv.module_sizes["head"] == embed
    assert {u.name: u.nbytes for u in inv.units}["head"] == embed
    untied = build_inventory(TinyLM(vocab=16, width=8, depth=2, tie=False), dtype=torch.float16, special_dtypes=special)
    assert inv.total_bytes == untied.total_bytes - untied.module_sizes["head"]


def test_tie_inside_one_subtree_counted_once_there() -> None:
    outer = nn.Module()
    outer.inner = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    outer.inner[1].weight = outer.inner[0].weight
    outer.other = nn.Linear(2, 2, bias=False)
    sizes = compute_module_sizes(outer)
    assert sizes["inner"] == 4 * 4 * 4 and sizes["inner.0"] == sizes["inner.1"] == 4 * 4 * 4
    assert sizes[""] == 4 * 4 * 4 + 2 * 2 * 4


def test_shared_module_is_found_under_every_name() -> None:
    class Shared(nn.Module):  # T5 registers its embedding under three names
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Embedding(10, 4)
            self.encoder = nn.Module()
            self.encoder.embed = self.shared
            self.encoder.proj = nn.Linear(4, 4)

    model = Shared()
    inv = build_inventory(model)
    names = {n for record in inv.tensors.values() for n in (record.name, *record.aliases)}
    assert names == set(model.state_dict())
    assert inv.tied_groups == [("shared.weight", "encoder.embed.weight")]
    assert inv.module_sizes["encoder.embed"] == 10 * 4 * 4
    assert inv.module_sizes["encoder"] == 10 * 4 * 4 + (4 * 4 + 4) * 4
    assert inv.total_bytes == 10 * 4 * 4 + (4 * 4 + 4) * 4
    with pytest.raises(DeviceMapError, match=r"encoder\.embed\.weight"):
        check_device_map(model, {"shared": "cpu", "encoder.proj": "cpu"})


def test_module_that_contains_itself_does_not_hang() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    model.add_module("again", model)
    assert compute_module_sizes(model)[""] == (2 * 2 + 2) * 4


def test_special_dtypes_by_prefix_glob_and_tensor_name() -> None:
    model = TinyLM(vocab=16, width=8, depth=2, tie=False)
    special = {"blocks.1": torch.float32, "*.norm": "float32", "head.weight": "float64"}
    inv = build_inventory(model, dtype=torch.float16, special_dtypes=special)
    records = inv.tensors
    # Prefix: everything floating under blocks.1 stays float32, its int64 buffer keeps 8 bytes.
    assert records["blocks.1.up.weight"].dtype == torch.float32
    assert records["blocks.1.positions"].dtype == torch.int64
    assert inv.module_sizes["blocks.1"] == (8 + 8 + 16 * 8 + 16 + 8 * 16 + 8 + 8) * 4 + 8 * 8
    # Glob: the norm inside every block (not the top-level "norm", which "*.norm" does not match).
    assert records["blocks.0.norm.weight"].dtype == torch.float32
    assert records["blocks.0.up.weight"].dtype == torch.float16
    assert records["norm.weight"].dtype == torch.float16
    assert inv.module_sizes["blocks.0"] == (8 + 8) * 4 + (16 * 8 + 16 + 8 * 16 + 8 + 8) * 2 + 8 * 8
    # Tensor name: only that tensor.
    assert records["head.weight"].dtype == torch.float64 and inv.module_sizes["head"] == 16 * 8 * 8
    assert records["embed.weight"].dtype == torch.float16
    total = sum(record.nbytes for record in records.values())
    assert inv.total_bytes == total


def test_units_for_leaves_no_split_and_split_modules() -> None:
    model = nn.Sequential(Mixed(4), TinyLM(vocab=16, width=8, depth=2, tie=True))
    inv = build_inventory(model, no_split_module_classes=["Block"])
    names = [unit.name for unit in inv.units]
    assert names == [
        "0.scale",
        "0.steps",
        "0.table",
        "0.inner",
        "1.embed",
        "1.blocks.0",
        "1.blocks.1",
        "1.norm",
        "1.head",
    ]
    sizes = {unit.name: unit.nbytes for unit in inv.units}
    assert sizes["0.steps"] == 3 * 4 and sizes["0.table"] == 4 * 4 * 4
    assert sizes["1.blocks.0"] == (8 + 8 + 16 * 8 + 16 + 8 * 16 + 8 + 8) * 4 + 8 * 8
    assert sizes["1.head"] == 16 * 8 * 4  # holds the tied weight
    assert {unit.name: unit.is_module for unit in inv.units}["0.scale"] is False
    assert sizes == reference_units(model, ["Block"])
    # Without no-split classes every leaf is a unit; the block's own buffers are units of their own.
    leaves = [unit.name for unit in build_inventory(model).units]
    assert "1.blocks.0.positions" in leaves and "1.blocks.0.up" in leaves and "1.blocks.0" not in leaves


def test_root_no_split_and_root_leaf_are_one_unit() -> None:
    model = TinyLM(depth=1)
    assert [u.name for u in build_inventory(model, no_split_module_classes=["TinyLM"]).units] == [""]
    assert [u.name for u in build_inventory(nn.Linear(3, 3)).units] == [""]


def test_meta_models_account_like_real_ones() -> None:
    with init_empty_weights(include_buffers=True):
        empty = TinyLM(vocab=32, width=16, depth=3)
    real = TinyLM(vocab=32, width=16, depth=3)
    assert build_inventory(empty, dtype="bf16").module_sizes == build_inventory(real, dtype="bf16").module_sizes


def test_tensor_records_are_lazy_and_agree_with_module_sizes() -> None:
    model = nn.Sequential(Mixed(4), TinyLM(vocab=16, width=8, depth=2, tie=True))
    inv = build_inventory(model, dtype=torch.float16)
    assert inv._tensors is None  # planning never pays for the per-tensor walk
    records = inv.tensors
    assert inv._tensors is records
    for prefix, size in inv.module_sizes.items():
        inside = [r.nbytes for r in records.values() if any(n == prefix or n.startswith(prefix + ".") or not prefix for n in (r.name, *r.aliases))]
        assert sum(inside) == size, prefix
    for record in records.values():
        tensor = all_tensors(model)[record.name]
        assert record.shape == tuple(tensor.shape)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("torch.float16", torch.float16),
        ("FP32", torch.float32),
        (torch.float64, torch.float64),
        (None, None),
        ("auto", None),
    ],
)
def test_resolve_dtype(given: object, expected: torch.dtype | None) -> None:
    assert resolve_dtype(given) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["int8", "float8", torch.int64])
def test_resolve_dtype_rejects_non_floating(bad: object) -> None:
    with pytest.raises(ConfigError, match="dtype"):
        resolve_dtype(bad)  # type: ignore[arg-type]


@settings(max_examples=80, deadline=None)
@given(drawn=tree_specs(), dtype=st.sampled_from([None, torch.float16, torch.bfloat16, torch.float32]), data=st.data())
def test_random_trees_account_like_the_reference(drawn: tuple, dtype: torch.dtype | None, data: st.DataObject) -> None:
    model = random_model(drawn)
    no_split = data.draw(st.lists(st.sampled_from(CLASS_NAMES), unique=True, max_size=3))
    inv = build_inventory(model, dtype=dtype, no_split_module_classes=no_split)
    # Every module prefix (under every name) holds the unique bytes under it.
    for name, _ in model.named_modules(remove_duplicate=False):
        assert inv.module_sizes[name] == unique_bytes(tensors_under(model, name).values(), dtype), name
    assert {u.name: u.nbytes for u in inv.units} == reference_units(model, no_split, dtype)
    assert {frozenset(group) for group in inv.tied_groups} == {frozenset(group) for group in tied_groups(model)}
    names = [n for record in inv.tensors.values() for n in (record.name, *record.aliases)]
    assert sorted(names) == sorted(all_tensors(model))
    assert sum(record.nbytes for record in inv.tensors.values()) == inv.total_bytes
