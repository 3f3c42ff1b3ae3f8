"""Tests of the checkpoint readers (checkpoint, opening, index, the two formats) and keys: errors, safety, identity."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from _enginekit import mapped_ranges
from safetensors.torch import save_file

from bigjob.engine.checkpoints.checkpoint import Checkpoint, TensorMeta
from bigjob.engine.checkpoints.keys import KeyReport, compare_keys, resolve_name
from bigjob.engine.checkpoints.opening import open_checkpoint
from bigjob.errors import CheckpointError, UnsafeCheckpointError


def state_dict() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(10, 4, generator=gen),
        "layers.0.weight": torch.randn(4, 4, generator=gen).to(torch.bfloat16),
        "layers.0.bias": torch.randn(4, generator=gen).to(torch.float16),
        "layers.1.weight": torch.randn(4, 4, generator=gen),
        "position_ids": torch.arange(7),
        "mask": torch.tensor([True, False, True]),
        "scale": torch.tensor(0.5),
    }


def file_backed(tensor: torch.Tensor, path: Path) -> bool:
    return any(start <= tensor.data_ptr() < end for start, end in mapped_ranges(path))


def shard(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    names = list(sd)
    return {k: sd[k] for k in names[:3]}, {k: sd[k] for k in names[3:]}


def write_sharded_safetensors(
    folder: Path, sd: dict[str, torch.Tensor], index_name: str = "model.safetensors.index.json"
) -> None:
    first, second = shard(sd)
    save_file(first, folder / "model-00001-of-00002.safetensors")
    save_file(second, folder / "model-00002-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in second})
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_sharded_bin(folder: Path, sd: dict[str, torch.Tensor]) -> None:
    first, second = shard(sd)
    torch.save(first, folder / "pytorch_model-00001-of-00002.bin")
    torch.save(second, folder / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: "pytorch_model-00001-of-00002.bin" for k in first}
    weight_map.update({k: "pytorch_model-00002-of-00002.bin" for k in second})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


LAYOUTS = [
    "safetensors-file",
    "safetensors-dir",
    "safetensors-sharded",
    "bin-file",
    "pt-file",
    "pth-dir",
    "bin-sharded",
    "legacy-bin",
]


def make(layout: str, folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    if layout == "safetensors-file":
        save_file(sd, folder / "weights.safetensors")
        return folder / "weights.safetensors"
    if layout == "safetensors-dir":
        save_file(sd, folder / "model.safetensors")
        return folder
    if layout == "safetensors-sharded":
        write_sharded_safetensors(folder, sd)
        return folder
    if layout == "bin-file":
        torch.save(sd, folder / "pytorch_model.bin")
        return folder / "pytorch_model.bin"
    if layout == "pt-file":
        torch.save(OrderedDict(sd), folder / "w.pt")
        return folder / "w.pt"
    if layout == "pth-dir":
        torch.save(sd, folder / "w.pth")
        return folder
    if layout == "bin-sharded":
        write_sharded_bin(folder, sd)
        return folder
    if layout == "legacy-bin":
        torch.save(sd, folder / "old.bin", _use_new_zipfile_serialization=False)
        return folder / "old.bin"
    raise AssertionError(layout)


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_every_tensor(tmp_path: Path, layout: str) -> None:
    sd = state_dict()
    with open_checkpoint(make(layout, tmp_path, sd)) as ckpt:
        assert isinstance(ckpt, Checkpoint)
        assert ckpt.format == ("safetensors" if layout.startswith("safetensors") else "torch")
        assert sorted(ckpt.keys()) == sorted(sd)
        assert len(ckpt) == len(sd) and "embed.weight" in ckpt and "nope" not in ckpt
        for name, tensor in sd.items():
            assert ckpt.meta(name) == TensorMeta(name, tuple(tensor.shape), tensor.dtype)
            loaded = ckpt.load(name)
            assert loaded.dtype == tensor.dtype and torch.equal(loaded, tensor)
            assert torch.equal(ckpt.view(name), tensor)
        assert all(path.is_file() for path in ckpt.files)
        with pytest.raises(KeyError, match="nope"):
            ckpt.meta("nope")


def test_key_order_is_shard_then_file_order(tmp_path: Path) -> None:
    sd = state_dict()
    write_sharded_bin(tmp_path, sd)
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.keys() == list(sd)  # torch keeps state-dict order
        assert [p.name for p in ckpt.files] == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    save_file({"b": torch.ones(2), "a": torch.ones(3)}, tmp_path / "one.safetensors")
    with open_checkpoint(tmp_path / "one.safetensors") as ckpt:
        # safetensors orders the data by name; keys follow the data layout.
        offsets = [ckpt.info(k).offset for k in ckpt.keys()]  # type: ignore[union-attr]
        assert offsets == sorted(offsets)


@pytest.mark.parametrize("layout", ["safetensors-sharded", "bin-sharded"])
def test_load_converts_only_floats(tmp_path: Path, layout: str) -> None:
    sd = state_dict()
    with open_checkpoint(make(layout, tmp_path, sd)) as ckpt:
        half = ckpt.load("embed.weight", dtype=torch.float16)
        assert half.dtype == torch.float16 and torch.equal(half, sd["embed.weight"].to(torch.float16))
        assert ckpt.load("position_ids", dtype=torch.float16).dtype == torch.int64
        assert ckpt.load("mask", dtype=torch.float16).dtype == torch.bool
        assert ckpt.load("scale", dtype=torch.bfloat16).shape == ()
        assert ckpt.load("embed.weight", device="meta").device.type == "meta"


def test_safetensors_view_is_zero_copy_and_load_is_owned(tmp_path: Path) -> None:
    sd = state_dict()
    path = make("safetensors-file", tmp_path, sd)
    with open_checkpoint(path) as ckpt:
        info = ckpt.info("embed.weight")
        assert info is not None and info.path == path
        view = ckpt.view("embed.weight")
        assert file_backed(view, path)
        owned = ckpt.load("embed.weight")
        assert not file_backed(owned, path)
        owned.zero_()
        assert torch.equal(ckpt.view("embed.weight"), sd["embed.weight"])
        assert len(mapped_ranges(path)) == 1  # one mapping per file, reused
        ckpt.view("layers.1.weight")
        assert len(mapped_ranges(path)) == 1


def test_torch_view_is_file_backed_and_one_shard_is_held(tmp_path: Path) -> None:
    sd = state_dict()
    write_sharded_bin(tmp_path, sd)
    first = tmp_path / "pytorch_model-00001-of-00002.bin"
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.info("embed.weight") is None
        view = ckpt.view("embed.weight")
        assert file_backed(view, first)
        assert not file_backed(ckpt.load("embed.weight"), first)
        del view
        ckpt.load("layers.1.weight")  # lives in shard 2: shard 1's state dict is dropped
        assert ckpt._current is not None and ckpt._current[0].name == "pytorch_model-00002-of-00002.bin"
        assert not mapped_ranges(first)


def test_non_tensor_entries_are_ignored(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2), "step": 3, "name": "x", "nested": {"a": 1}}, tmp_path / "m.pt")
    with open_checkpoint(tmp_path / "m.pt") as ckpt:
        assert ckpt.keys() == ["w"]


def test_nested_state_dict_is_explained(tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 1}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="nested dicts under \\['state_dict'\\]"):
        open_checkpoint(tmp_path / "m.pt")


# ---------------------------------------------------------------- choosing in folders


def test_folder_prefers_safetensors_index(tmp_path: Path) -> None:
    sd = state_dict()
    write_sharded_safetensors(tmp_path, sd)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.format == "safetensors" and len(ckpt.files) == 2
        assert ckpt.index_file == tmp_path / "model.safetensors.index.json"


def test_folder_with_other_index_name(tmp_path: Path) -> None:
    write_sharded_safetensors(tmp_path, state_dict(), index_name="diffusion_pytorch_model.safetensors.index.json")
    with open_checkpoint(tmp_path) as ckpt:
        assert len(ckpt.files) == 2


def test_index_file_can_be_passed_directly(tmp_path: Path) -> None:
    write_sharded_bin(tmp_path, state_dict())
    with open_checkpoint(tmp_path / "pytorch_model.bin.index.json") as ckpt:
        assert ckpt.format == "torch" and len(ckpt) == len(state_dict())


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(missing)
    assert str(err.value) == f"checkpoint '{missing}' does not exist; pass an existing file or folder as `checkpoint`"


def test_empty_folder_lists_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "model.safetensors" in message and "pytorch_model.bin" in message
    assert "README.md" in message and "`checkpoint`" in message


def test_several_unindexed_files_are_ambiguous(tmp_path: Path) -> None:
    save_file({"a": torch.ones(1)}, tmp_path / "a.safetensors")
    save_file({"b": torch.ones(1)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match="a.safetensors"):
        open_checkpoint(tmp_path)


def test_unsupported_suffix(tmp_path: Path) -> None:
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported type '.npz'"):
        open_checkpoint(tmp_path / "w.npz")


# ---------------------------------------------------------------- broken indexes


def test_index_not_json(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON") as err:
        open_checkpoint(tmp_path)
    assert str(index) in str(err.value)


def test_index_without_weight_map(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="`weight_map`"):
        open_checkpoint(tmp_path)


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    write_sharded_safetensors(tmp_path, state_dict())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="'model-00002-of-00002.safetensors', which does not exist"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("shard_name", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE"])
def test_shard_escaping_the_folder_is_refused(tmp_path: Path, shard_name: str) -> None:
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    outside = tmp_path / "outside.safetensors"
    save_file({"w": torch.ones(2)}, outside)  # it exists, so only the check can stop it
    if shard_name == "ABSOLUTE":
        shard_name = str(outside)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard_name}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder") as err:
        open_checkpoint(folder)
    assert shard_name in str(err.value)


def test_tensor_listed_but_absent_from_safetensors_shard(tmp_path: Path) -> None:
    write_sharded_safetensors(tmp_path, state_dict())
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="ghost.weight"):
        open_checkpoint(tmp_path)


def test_tensor_listed_but_absent_from_bin_shard(tmp_path: Path) -> None:
    write_sharded_bin(tmp_path, state_dict())
    index = tmp_path / "pytorch_model.bin.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = "pytorch_model-00002-of-00002.bin"
    index.write_text(json.dumps(data))
    with open_checkpoint(tmp_path) as ckpt, pytest.raises(CheckpointError, match="ghost.weight"):
        ckpt.keys()


def test_unlisted_shard_tensors_are_ignored(tmp_path: Path) -> None:
    sd = state_dict()
    write_sharded_safetensors(tmp_path, sd)
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["embed.weight"]
    index.write_text(json.dumps(data))
    with open_checkpoint(tmp_path) as ckpt:
        assert "embed.weight" not in ckpt and len(ckpt) == len(sd) - 1


# ---------------------------------------------------------------- unsafe and corrupt pickles


class CreatesFile:
    """Unpickling this would create a file (it reduces to a call of ``open``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "evil": CreatesFile(marker)}, path, _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError) as err:
        open_checkpoint(tmp_path).keys()
    message = str(err.value)
    assert str(path) in message and "weights_only=True" in message and "open" in message
    assert "set to `False`" not in message  # torch's advice to turn the protection off is not repeated
    assert not marker.exists()


def test_garbage_bin_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"definitely not a pickle")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(path)
    assert not isinstance(err.value, UnsafeCheckpointError)
    assert str(path) in str(err.value)


def test_truncated_zip_bin(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    torch.save(state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="model.bin"):
        open_checkpoint(path)


def test_not_a_state_dict(tmp_path: Path) -> None:
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        open_checkpoint(tmp_path / "list.pt")


def test_corrupt_safetensors_shard(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        open_checkpoint(tmp_path)


# ---------------------------------------------------------------- identity


def test_identity_is_stable_and_json(tmp_path: Path) -> None:
    write_sharded_safetensors(tmp_path, state_dict())
    with open_checkpoint(tmp_path) as ckpt:
        first = ckpt.identity()
        assert ckpt.identity() == first
        assert json.loads(json.dumps(ckpt.identity(content_hash=True))) == ckpt.identity(content_hash=True)
    assert first["format"] == "safetensors"
    names = [f["name"] for f in first["files"]]
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert first["index"]["name"] == "model.safetensors.index.json" and len(first["index"]["sha256"]) == 64
    with open_checkpoint(tmp_path) as again:
        assert again.identity() == first


def test_identity_changes_with_mtime_size_content_and_index(tmp_path: Path) -> None:
    sd = state_dict()
    write_sharded_safetensors(tmp_path, sd)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    ckpt = open_checkpoint(tmp_path)
    base, base_hash = ckpt.identity(), ckpt.identity(content_hash=True)

    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert ckpt.identity() != base

    # Same size, same mtime, different bytes: only the content hash notices.
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert ckpt.identity() == base
    assert ckpt.identity(content_hash=True) != base_hash

    with open(shard, "ab") as handle:
        handle.write(b"\0")
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert ckpt.identity()["files"][1]["size"] == stat.st_size + 1

    index = tmp_path / "model.safetensors.index.json"
    index.write_text(index.read_text() + " ")
    assert ckpt.identity()["index"] != base["index"]
    ckpt.close()


def test_identity_of_single_torch_file(tmp_path: Path) -> None:
    torch.save(state_dict(), tmp_path / "w.pt")
    with open_checkpoint(tmp_path / "w.pt") as ckpt:
        identity = ckpt.identity()
    assert identity["format"] == "torch" and identity["index"] is None
    assert identity["files"][0]["name"] == "w.pt"


# ---------------------------------------------------------------- key matching


def ckpt_of(tmp_path: Path, shapes: dict[str, tuple[int, ...]]) -> Checkpoint:
    save_file({k: torch.zeros(v) for k, v in shapes.items()}, tmp_path / "k.safetensors")
    return open_checkpoint(tmp_path / "k.safetensors")


def test_compare_keys_exact(tmp_path: Path) -> None:
    shapes = {"a.w": (2, 3), "b.w": (4,)}
    with ckpt_of(tmp_path, shapes) as ckpt:
        report = compare_keys(shapes, ckpt)
    assert report.ok and report.prefix is None and report.matched == 2
    assert (report.missing, report.unexpected, report.mismatched) == ([], [], [])
    assert resolve_name(report, "a.w") == "a.w"


def test_compare_keys_missing_unexpected_mismatched(tmp_path: Path) -> None:
    model = {"a.w": (2, 3), "b.w": (4,), "c.w": (1,)}
    with ckpt_of(tmp_path, {"a.w": (3, 2), "b.w": (4,), "d.w": (5,)}) as ckpt:
        report = compare_keys(model, ckpt)
    assert not report.ok
    assert report.missing == ["c.w"]
    assert report.unexpected == ["d.w"]
    assert report.mismatched == [("a.w", (2, 3), (3, 2))]
    text = report.describe()
    assert "1 missing from the checkpoint: c.w" in text
    assert "1 unexpected in the checkpoint: d.w" in text
    assert "a.w [2, 3] vs [3, 2]" in text


def test_unexpected_keys_alone_are_ok(tmp_path: Path) -> None:
    with ckpt_of(tmp_path, {"a.w": (1,), "rotary.inv_freq": (2,)}) as ckpt:
        report = compare_keys({"a.w": (1,)}, ckpt)
    assert report.ok and report.unexpected == ["rotary.inv_freq"]


def test_checkpoint_carries_extra_prefix(tmp_path: Path) -> None:
    model = {f"layers.{i}.w": (2,) for i in range(5)}
    ckpt_shapes = {f"model.{k}": v for k, v in model.items()}
    ckpt_shapes["lm_head.weight"] = (3,)
    with ckpt_of(tmp_path, ckpt_shapes) as ckpt:
        report = compare_keys({**model, "lm_head.weight": (3,)}, ckpt)
    assert report.ok and report.prefix == "model." and report.prefix_mode == "checkpoint"
    assert report.unexpected == [] and report.matched == 6
    assert resolve_name(report, "layers.0.w") == "model.layers.0.w"
    assert resolve_name(report, "lm_head.weight") == "lm_head.weight"  # mixed checkpoints still resolve
    assert "checkpoint keys carry the prefix 'model.'" in report.describe()


def test_model_carries_extra_prefix(tmp_path: Path) -> None:
    ckpt_shapes = {f"h.{i}.w": (2,) for i in range(4)}
    model = {f"transformer.{k}": v for k, v in ckpt_shapes.items()}
    with ckpt_of(tmp_path, ckpt_shapes) as ckpt:
        report = compare_keys(model, ckpt)
    assert report.ok and report.prefix == "transformer." and report.prefix_mode == "model"
    assert resolve_name(report, "transformer.h.0.w") == "h.0.w"
    assert "model keys carry the prefix 'transformer.'" in report.describe()


def test_two_component_prefix(tmp_path: Path) -> None:
    model = {f"layers.{i}.w": (2,) for i in range(4)}
    with ckpt_of(tmp_path, {f"model.decoder.{k}": v for k, v in model.items()}) as ckpt:
        report = compare_keys(model, ckpt)
    assert report.ok and report.prefix == "model.decoder."


def test_prefixed_shapes_are_still_checked(tmp_path: Path) -> None:
    model = {f"layers.{i}.w": (2,) for i in range(10)}
    ckpt_shapes = {f"model.{k}": v for k, v in model.items()}
    ckpt_shapes["model.layers.3.w"] = (9,)
    with ckpt_of(tmp_path, ckpt_shapes) as ckpt:
        report = compare_keys(model, ckpt)
    assert report.prefix == "model." and report.mismatched == [("layers.3.w", (2,), (9,))] and not report.ok


def test_unrelated_keys_get_no_prefix(tmp_path: Path) -> None:
    with ckpt_of(tmp_path, {"x.a": (1,), "x.b": (1,)}) as ckpt:
        report = compare_keys({"y.a": (1,), "y.c": (1,)}, ckpt)
    assert report.prefix is None and report.missing == ["y.a", "y.c"] and report.unexpected == ["x.a", "x.b"]


def test_describe_truncates_long_lists() -> None:
    report = KeyReport(missing=[f"k{i}" for i in range(25)], unexpected=[], mismatched=[])
    text = report.describe()
    assert "25 missing from the checkpoint" in text and "k19" in text and "k20" not in text
    assert "(and 5 more)" in text


def test_compare_keys_on_torch_checkpoint(tmp_path: Path) -> None:
    sd = state_dict()
    write_sharded_bin(tmp_path, sd)
    with open_checkpoint(tmp_path) as ckpt:
        report = compare_keys({f"model.{k}": tuple(v.shape) for k, v in sd.items()}, ckpt)
    assert report.ok and report.prefix == "model." and report.prefix_mode == "model"
