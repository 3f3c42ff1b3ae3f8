"""Tests of bigjob.engine.run.loading: every checkpoint format and device map gives the in-RAM outputs,
dtype conversion, key checks, bad checkpoints.

The reference is always the tiny model built in RAM by PyTorch alone (``make_reference()``,
converted with ``.to(dtype)`` where a dtype is asked for); outputs are compared bit for bit.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from _enginekit import (
    BLOCK_NUMEL,
    CONTEXT,
    FORMATS,
    MIXED,
    VOCAB,
    WIDTH,
    empty_model,
    inputs,
    on_meta,
    untied_state,
    write_checkpoint,
    write_sharded_safetensors,
)
from safetensors.torch import save_file
from tiny_transformer import TinyLM, make_reference

from bigjob import (
    get_dispatch_info,
    init_empty_weights,
    load_checkpoint_and_dispatch,
    load_checkpoint_in_model,
    remove_dispatch,
)
from bigjob.engine.checkpoints.safetensors_writer import write_file
from bigjob.errors import CheckpointError, OffloadError, UnsafeCheckpointError

TOTAL = 4 * BLOCK_NUMEL * 4 + VOCAB * WIDTH * 4 + CONTEXT * WIDTH * 4 + 2 * WIDTH * 4 + CONTEXT * 8 + CONTEXT * CONTEXT * 4
RESERVE = 2 * BLOCK_NUMEL * 4  # the planner keeps (1 + prefetch) x the largest offloaded unit free on the CPU

# name -> (device_map, max_memory, no_split_module_classes, expect cpu+disk both used)
MAPS: dict[str, tuple[object, dict | None, list[str] | None, bool]] = {
    "cpu": ("cpu", None, ["Block"], False),
    "disk": ("disk", None, ["Block"], False),
    "explicit_mixed": (MIXED, None, ["Block"], True),
    "explicit_root_disk": ({"": "disk", "blocks.2": "cpu", "pos": "cpu", "embed": "cpu", "head": "cpu"}, None, ["Block"], True),
    # Leaves of one block on disk, the rest of it in RAM (no no-split class: every leaf is a unit).
    "explicit_inside_block": ({"": "cpu", "blocks.1.up": "disk", "blocks.1.qkv": "disk", "blocks.2.ln1": "disk"}, None, None, True),
    "auto": ("auto", {"cpu": RESERVE + 70_000}, ["Block"], True),
    "balanced": ("balanced", {"cpu": RESERVE + 70_000}, ["Block"], True),
    "balanced_low_0": ("balanced_low_0", {"cpu": RESERVE + 70_000}, ["Block"], True),
    "sequential": ("sequential", {"cpu": RESERVE + 60_000}, ["Block"], True),
}


def test_total_is_hand_computed() -> None:
    # Guards the constants the budgets above are built from.
    model = make_reference()
    numel = sum(p.numel() for p in model.parameters())  # the tie counted once
    assert numel * 4 + CONTEXT * 8 + CONTEXT * CONTEXT * 4 == TOTAL


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {fmt: write_checkpoint(root / fmt, fmt) for fmt in FORMATS}


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return make_reference()


def assert_loaded_like_reference(model: torch.nn.Module, reference: torch.nn.Module, dtype: torch.dtype = torch.float32) -> None:
    assert on_meta(model) == []
    assert model.embed.weight is model.head.weight, "the tie was broken"
    assert model.positions.dtype == torch.int64 and torch.equal(model.positions, torch.arange(CONTEXT))
    for name, param in model.named_parameters():
        assert param.dtype == dtype, name
    ids = inputs()
    with torch.no_grad():
        expected = reference(ids)
        out = model(ids)
    assert out.dtype == dtype
    assert torch.equal(out, expected)


@pytest.mark.parametrize("map_name", list(MAPS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_and_map_gives_reference_outputs(
    checkpoints: dict[str, Path], reference: torch.nn.Module, tmp_path: Path, fmt: str, map_name: str
) -> None:
    device_map, max_memory, no_split, mixed = MAPS[map_name]
    model = load_checkpoint_and_dispatch(
        empty_model(),
        checkpoints[fmt],
        device_map=device_map,
        max_memory=max_memory,
        no_split_module_classes=no_split,
        offload_folder=tmp_path / "offload",
    )
    assert_loaded_like_reference(model, reference)
    tiers = get_dispatch_info(model).bytes_per_tier
    assert sum(tiers.values()) == TOTAL
    if mixed:
        assert tiers.get("cpu", 0) > 0 and tiers.get("disk", 0) > 0, tiers
    if map_name == "cpu":
        assert tiers == {"cpu": TOTAL}
    if map_name == "disk":  # buffers of disk modules stay in RAM (offload_buffers=False)
        assert tiers == {"disk": TOTAL - CONTEXT * 8 - CONTEXT * CONTEXT * 4, "cpu": CONTEXT * 8 + CONTEXT * CONTEXT * 4}


def test_load_checkpoint_in_model_defaults_to_cpu(checkpoints: dict[str, Path], reference: torch.nn.Module) -> None:
    model = empty_model()
    result = load_checkpoint_in_model(model, checkpoints["st_sharded"])
    assert dict(result.device_map) == {"": "cpu"}
    assert result.bytes_per_tier == {"cpu": TOTAL}
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert_loaded_like_reference(model, reference)


@pytest.mark.parametrize("fmt", ["st_sharded", "bin_sharded"])
def test_loading_leaves_no_file_open(checkpoints: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    def cycle(device_map: str) -> None:
        model = load_checkpoint_and_dispatch(empty_model(), checkpoints[fmt], device_map=device_map, offload_folder=tmp_path / "off")
        with torch.no_grad():
            model(inputs())
        remove_dispatch(model)
        del model
        gc.collect()

    cycle("disk")  # first use: imports, the offload folder
    before = open_files()
    for device_map in ("cpu", "disk", "cpu", "disk"):
        cycle(device_map)
    assert open_files() == before


def test_checkpoint_holding_only_the_tied_alias(tmp_path: Path, reference: torch.nn.Module) -> None:
    # The tie saved under its second name (head.weight) only: embed.weight is not missing.
    state = untied_state(reference)
    state["head.weight"] = state.pop("embed.weight")
    write_file(tmp_path / "model.safetensors", state)
    for device_map in ("cpu", "disk"):
        model = load_checkpoint_and_dispatch(empty_model(), tmp_path / "model.safetensors", device_map=device_map)
        assert_loaded_like_reference(model, reference)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("map_name", ["cpu", "disk", "explicit_mixed", "auto"])
@pytest.mark.parametrize("fmt", ["st_sharded", "bin_sharded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_conversion_matches_reference_converted_alike(
    checkpoints: dict[str, Path], tmp_path: Path, fmt: str, map_name: str, dtype: torch.dtype
) -> None:
    device_map, max_memory, no_split, _ = MAPS[map_name]
    if max_memory is not None:
        max_memory = {"cpu": max_memory["cpu"] // 2}  # the budget is in bytes of the target dtype
    model = load_checkpoint_and_dispatch(
        empty_model(),
        checkpoints[fmt],
        device_map=device_map,
        max_memory=max_memory,
        no_split_module_classes=no_split,
        dtype=dtype,
        offload_folder=tmp_path / "offload",
    )
    assert_loaded_like_reference(model, make_reference().to(dtype), dtype)
    assert model.mask.dtype == dtype  # a float buffer follows the target dtype, like Module.to(dtype)


def test_dtype_names_are_accepted(checkpoints: dict[str, Path]) -> None:
    model = load_checkpoint_and_dispatch(empty_model(), checkpoints["st_bigjob"], device_map="cpu", dtype="bf16")
    assert_loaded_like_reference(model, make_reference().to(torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("device_map", ["cpu", "disk"])
def test_special_dtypes_keep_norms_in_fp32(checkpoints: dict[str, Path], tmp_path: Path, device_map: str) -> None:
    model = load_checkpoint_and_dispatch(
        empty_model(),
        checkpoints["st_sharded"],
        device_map=device_map,
        no_split_module_classes=["Block"],
        dtype=torch.bfloat16,
        special_dtypes={"norm": torch.float32, "*.ln1": "float32"},
        offload_folder=tmp_path / "offload",
    )
    # The kept modules hold the checkpoint's fp32 values (not fp32 -> bf16 -> fp32 round trips).
    full = make_reference()
    reference = make_reference().to(torch.bfloat16)
    reference.norm = full.norm
    for block, source in zip(reference.blocks, full.blocks):
        block.ln1 = source.ln1
    for name, param in model.named_parameters():
        fp32 = name.startswith("norm.") or ".ln1." in name
        assert param.dtype == (torch.float32 if fp32 else torch.bfloat16), name
    assert model.embed.weight is model.head.weight
    ids = inputs()
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))
    if device_map == "disk":
        # fp32 norms are stored as they are needed: read from the checkpoint itself, not converted.
        info = get_dispatch_info(model)
        assert info.offload_folder is not None
        from safetensors import safe_open

        folder = Path(info.offload_folder)
        names = set()
        for shard in folder.glob("*.safetensors"):
            with safe_open(str(shard), "pt") as handle:
                names.update(handle.keys())
        assert "norm.weight" not in names and "blocks.0.ln1.weight" not in names
        assert "blocks.0.up.weight" in names


def test_dtype_none_keeps_the_checkpoint_dtype(tmp_path: Path) -> None:
    half = make_reference().half()
    write_file(tmp_path / "model.safetensors", untied_state(half))
    model = empty_model()
    result = load_checkpoint_in_model(model, tmp_path / "model.safetensors")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert model.positions.dtype == torch.int64
    assert result.bytes_per_tier == {"cpu": (TOTAL - CONTEXT * 8) // 2 + CONTEXT * 8}
    ids = inputs()
    with torch.no_grad():
        assert torch.equal(model(ids), half(ids))


def test_dtype_none_keeps_each_tensor_dtype_of_a_mixed_checkpoint(tmp_path: Path) -> None:
    # Mostly fp16, norms kept in fp32 (as many published checkpoints are): nothing is converted.
    mixed = make_reference().half()
    mixed.norm.float()
    for block in mixed.blocks:
        block.ln1.float()
        block.ln2.float()
    write_file(tmp_path / "model.safetensors", untied_state(mixed))
    model = load_checkpoint_and_dispatch(empty_model(), tmp_path / "model.safetensors", device_map="disk")
    for name, param in model.named_parameters():
        stored = mixed.get_parameter(name).dtype
        assert param.dtype == stored, name
    info = get_dispatch_info(model)
    assert info.offload_folder is None  # every disk tensor already in its dtype: served from the checkpoint
    ids = inputs()
    with torch.no_grad():
        assert torch.equal(model(ids), mixed(ids))


def test_int_tensor_where_the_model_has_float_is_an_error(tmp_path: Path, reference: torch.nn.Module) -> None:
    state = untied_state(reference)
    state["norm.weight"] = torch.ones(WIDTH, dtype=torch.int32)
    write_file(tmp_path / "model.safetensors", state)
    model = empty_model()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_in_model(model, tmp_path / "model.safetensors")
    assert "norm.weight" in str(err.value) and "torch.int32" in str(err.value)
    assert model.norm.weight.is_meta  # nothing was loaded


def test_integer_buffer_of_another_width_is_an_error(tmp_path: Path, reference: torch.nn.Module) -> None:
    state = untied_state(reference)
    state["positions"] = torch.arange(CONTEXT, dtype=torch.int32)
    write_file(tmp_path / "model.safetensors", state)
    with pytest.raises(CheckpointError, match="positions"):
        load_checkpoint_in_model(empty_model(), tmp_path / "model.safetensors")


# --------------------------------------------------------------------------- key checks


def test_missing_keys_are_listed(tmp_path: Path, reference: torch.nn.Module) -> None:
    state = untied_state(reference)
    del state["blocks.1.up.weight"], state["norm.bias"]
    write_file(tmp_path / "model.safetensors", state)
    model = empty_model()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_in_model(model, tmp_path / "model.safetensors", device_map="disk")
    message = str(err.value)
    assert "2 missing" in message and "blocks.1.up.weight" in message and "norm.bias" in message
    assert "blocks.0.up.weight" not in message


def test_every_key_problem_is_reported_at_once(tmp_path: Path, reference: torch.nn.Module) -> None:
    state = untied_state(reference)
    del state["pos"]
    state["blocks.0.up.weight"] = torch.zeros(4 * WIDTH, WIDTH // 2)
    state["extra.weight"] = torch.zeros(3)
    write_file(tmp_path / "model.safetensors", state)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_in_model(empty_model(), tmp_path / "model.safetensors", strict=True)
    message = str(err.value)
    assert "pos" in message and "extra.weight" in message
    assert f"[{4 * WIDTH}, {WIDTH}]" in message and f"[{4 * WIDTH}, {WIDTH // 2}]" in message


def test_shape_mismatch_names_both_shapes(tmp_path: Path, reference: torch.nn.Module) -> None:
    state = untied_state(reference)
    state["blocks.2.qkv.weight"] = torch.zeros(3 * WIDTH, WIDTH + 1)
    write_file(tmp_path / "model.safetensors", state)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_and_dispatch(empty_model(), tmp_path / "model.safetensors", device_map="cpu")
    message = str(err.value)
    assert "blocks.2.qkv.weight" in message
    assert f"[{3 * WIDTH}, {WIDTH}]" in message and f"[{3 * WIDTH}, {WIDTH + 1}]" in message


def test_unexpected_keys_warn_by_default_and_fail_with_strict(
    tmp_path: Path, reference: torch.nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    state = untied_state(reference)
    state["lm.extra_bias"] = torch.ones(5)
    write_file(tmp_path / "model.safetensors", state)
    model = empty_model()
    with caplog.at_level(logging.WARNING, logger="bigjob"):
        load_checkpoint_in_model(model, tmp_path / "model.safetensors")
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "lm.extra_bias" in r.getMessage()]
    assert warned
    assert_loaded_like_reference(model, reference)

    with pytest.raises(CheckpointError, match="lm.extra_bias"):
        load_checkpoint_in_model(empty_model(), tmp_path / "model.safetensors", strict=True)
    # load_checkpoint_and_dispatch is strict by default (the signature).
    with pytest.raises(CheckpointError, match="strict=True"):
        load_checkpoint_and_dispatch(empty_model(), tmp_path / "model.safetensors", device_map="cpu")


def test_model_prefix_in_checkpoint_is_detected_applied_and_reported(
    tmp_path: Path, reference: torch.nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    state = {"model." + k: v for k, v in untied_state(reference).items()}
    write_sharded_safetensors(tmp_path, state)
    model = empty_model()
    with caplog.at_level(logging.INFO, logger="bigjob"):
        model = load_checkpoint_and_dispatch(model, tmp_path, device_map=MIXED, no_split_module_classes=["Block"])
    assert any("'model.'" in r.getMessage() and "prefix" in r.getMessage() for r in caplog.records)
    assert_loaded_like_reference(model, reference)


def test_prefix_is_named_in_errors(tmp_path: Path, reference: torch.nn.Module) -> None:
    state = {"model." + k: v for k, v in untied_state(reference).items() if k != "norm.weight"}
    write_file(tmp_path / "model.safetensors", state)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_in_model(empty_model(), tmp_path / "model.safetensors")
    assert "norm.weight" in str(err.value) and "'model.'" in str(err.value)


def test_empty_model_without_its_unsaved_buffers_is_refused_before_loading(checkpoints: dict[str, Path]) -> None:
    # init_empty_weights(include_buffers=True) puts the non-persistent mask on meta: no checkpoint has it.
    with init_empty_weights(include_buffers=True):
        model = TinyLM().eval()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_and_dispatch(model, checkpoints["st_bigjob"], device_map="cpu")
    assert "mask" in str(err.value) and "include_buffers" in str(err.value)
    assert len(on_meta(model)) == len(list(model.parameters())) + len(list(model.buffers()))  # nothing loaded


# --------------------------------------------------------------------------- bad checkpoints


def test_truncated_safetensors_is_a_checkpoint_error(tmp_path: Path, reference: torch.nn.Module) -> None:
    path = tmp_path / "model.safetensors"
    save_file(untied_state(reference), str(path))
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size - 100)  # the header now promises more bytes than the file holds
    model = empty_model()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_and_dispatch(model, path, device_map="disk")
    assert str(path) in str(err.value) and "truncated" in str(err.value)
    assert get_dispatch_info(model) is None


def test_index_naming_a_missing_shard(tmp_path: Path, reference: torch.nn.Module) -> None:
    index = write_sharded_safetensors(tmp_path, untied_state(reference))
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        load_checkpoint_and_dispatch(empty_model(), index, device_map="cpu")


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def test_bin_needing_arbitrary_code_is_refused_and_never_runs(tmp_path: Path, reference: torch.nn.Module) -> None:
    marker = tmp_path / "code-ran"
    state: dict[str, object] = dict(untied_state(reference))
    state["evil"] = _Payload(str(marker))
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    assert not marker.exists()
    model = empty_model()
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint_and_dispatch(model, path, device_map="cpu", offload_folder=tmp_path / "off")
    assert str(path) in str(err.value)
    assert not marker.exists()
    assert not (tmp_path / "off").exists()
    # Sanity check of the payload itself: an unrestricted unpickler does run it.
    pickle.loads(pickle.dumps(_Payload(str(marker)))).close()
    assert marker.exists()


def test_disk_conversion_without_offload_folder_names_the_argument(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(OffloadError) as err:
        load_checkpoint_and_dispatch(empty_model(), checkpoints["st_bigjob"], device_map="disk", dtype=torch.float16)
    assert "offload_folder" in str(err.value)
    with pytest.raises(OffloadError, match="offload_folder"):  # torch checkpoints always need one for disk
        load_checkpoint_and_dispatch(empty_model(), checkpoints["bin"], device_map="disk")


def test_disk_without_conversion_needs_no_offload_folder(checkpoints: dict[str, Path], reference: torch.nn.Module) -> None:
    model = load_checkpoint_and_dispatch(empty_model(), checkpoints["st_official"], device_map="disk")
    assert get_dispatch_info(model).offload_folder is None
    assert_loaded_like_reference(model, reference)


def test_load_result_reports_placement(checkpoints: dict[str, Path]) -> None:
    model = empty_model()
    result = load_checkpoint_in_model(model, checkpoints["st_sharded"], device_map=MIXED, no_split_module_classes=["Block"])
    assert result.placement["blocks.1.up.weight"] == "disk"
    assert result.placement["blocks.0.up.weight"] == "cpu"
    assert result.placement["norm.weight"] == "disk"
    assert "head.weight" not in result.placement  # a tie is placed under its first name only
    # Same dtype on a CPU run: every parameter, disk tier and RAM tier, is a view of the checkpoint;
    # buffers stay owned copies.
    params = {name for name, _ in model.named_parameters()}
    assert {n for n, tier in result.placement.items() if tier == "disk"} <= result.zero_copy
    assert result.zero_copy == {n for n in result.placement if n in params}
    assert result.offload is None and result.offload_reused is None
    assert result.main_device == "cpu"
