"""A damaged offload folder is found by the checksums its marker records, and rebuilt from the checkpoint.

The damages are those a cache meets: bytes flipped inside a tensor file with its size kept,
a header's dtype relabelled to another of the same size, shards swapped between two folders
(bfloat16 and float16 builds of one checkpoint), an index edited. Each load after the damage
must rebuild the folder (one warning naming it) and give the outputs of the in-RAM reference
converted the same way; ``offload_problems`` reports the damage, the quick check or the full.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
from pathlib import Path

import pytest
import torch
from _enginekit import empty_model, inputs, untied_state
from tiny_transformer import make_reference

from bigjob import get_dispatch_info, load_checkpoint_and_dispatch
from bigjob.engine.checkpoints.safetensors_writer import write_file
from bigjob.engine.tiers import checksums
from bigjob.engine.tiers.store import MARKER, offload_problems


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    write_file(path, untied_state(make_reference()))
    return path


def load(checkpoint: Path, offload: Path, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    return load_checkpoint_and_dispatch(
        empty_model(), checkpoint, device_map="disk", dtype=dtype, offload_folder=offload, no_split_module_classes=["Block"]
    )


def reference(dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():
        return make_reference().to(dtype)(inputs())


def folder_of(model: torch.nn.Module) -> Path:
    return Path(get_dispatch_info(model).offload_folder)


def shard(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


def header_length(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def flip_in_first_page(folder: Path) -> None:
    path = shard(folder)
    data = bytearray(path.read_bytes())
    data[header_length(path) + 10] ^= 0xFF
    path.write_bytes(bytes(data))


def relabel_dtype(folder: Path) -> None:
    path = shard(folder)
    data = bytearray(path.read_bytes())
    end = header_length(path)
    header = bytes(data[8:end])
    assert b'"BF16"' in header
    data[8:end] = header.replace(b'"BF16"', b'"F16"' + b" ", 1)  # same size, still valid JSON
    path.write_bytes(bytes(data))


def edit_index(folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = data["weight_map"][first].replace("00001", "00001")  # same text, other spacing
    index.write_text(json.dumps(data, indent=1))


@pytest.mark.parametrize("damage", [flip_in_first_page, relabel_dtype, edit_index], ids=lambda f: f.__name__)
def test_a_damaged_folder_is_rebuilt_with_one_warning(checkpoint, tmp_path, caplog, damage) -> None:  # type: ignore[no-untyped-def]
    offload = tmp_path / "off"
    folder = folder_of(load(checkpoint, offload))
    assert offload_problems(folder) == [] and offload_problems(folder, full=True) == []
    damage(folder)
    assert offload_problems(folder) != []
    with caplog.at_level(logging.WARNING, logger="bigjob"):
        model = load(checkpoint, offload)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(folder) in warnings[0] and "rebuilding" in warnings[0], warnings
    assert get_dispatch_info(model).offload_reused is False and folder_of(model) == folder
    with torch.no_grad():
        assert torch.equal(model(inputs()), reference(torch.bfloat16))
    assert offload_problems(folder, full=True) == []
    assert get_dispatch_info(load(checkpoint, offload)).offload_reused is True


def test_shards_swapped_between_a_bf16_and_an_fp16_folder_are_both_rebuilt(checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    offload = tmp_path / "off"
    bf16, fp16 = folder_of(load(checkpoint, offload, torch.bfloat16)), folder_of(load(checkpoint, offload, torch.float16))
    a, b = shard(bf16), shard(fp16)
    assert a.name == b.name  # same layout: only the dtypes (and the header's length) differ
    swap = tmp_path / "swap"
    shutil.move(a, swap)
    shutil.move(b, a)
    shutil.move(swap, b)
    assert offload_problems(bf16) and offload_problems(fp16)
    for dtype in (torch.bfloat16, torch.float16):
        model = load(checkpoint, offload, dtype)
        assert get_dispatch_info(model).offload_reused is False
        with torch.no_grad():
            assert torch.equal(model(inputs()), reference(dtype))


def test_a_flip_between_sampled_pages_is_found_by_the_full_check(checkpoint, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(checksums, "SAMPLES", 2)  # the first and last page only, so a flip between them is not sampled
    offload = tmp_path / "off"
    folder = folder_of(load(checkpoint, offload))
    path = shard(folder)
    data = bytearray(path.read_bytes())
    middle = header_length(path) + (len(data) - header_length(path)) // 2
    assert len(data) - header_length(path) > 3 * checksums.PAGE
    data[middle] ^= 0x01
    path.write_bytes(bytes(data))
    assert offload_problems(folder) == []
    assert offload_problems(folder, full=True) == [f"{path.name}: its bytes differ from those it was built with"]


def test_a_marker_without_checksums_is_rebuilt(checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    offload = tmp_path / "off"
    folder = folder_of(load(checkpoint, offload))
    marker = json.loads((folder / MARKER).read_text())
    del marker["checks"]  # as folders built before checksums were recorded
    (folder / MARKER).write_text(json.dumps(marker))
    assert offload_problems(folder) == ["its marker records no checksums (built by an older bigjob)"]
    assert get_dispatch_info(load(checkpoint, offload)).offload_reused is False


def test_the_recorded_checks_are_the_hand_computed_digests(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "t.safetensors"
    write_file(path, {"w": torch.arange(5000, dtype=torch.float32)})
    raw = path.read_bytes()
    end = header_length(path)
    pages = min(checksums.SAMPLES, -(-(len(raw) - end) // checksums.PAGE))
    last = len(raw) - end - checksums.PAGE
    sampled = hashlib.blake2b(digest_size=16)
    for i in range(pages):
        offset = end + last * i // (pages - 1)
        sampled.update(raw[offset : offset + checksums.PAGE])
    assert checksums.file_checks(path) == {
        "size": len(raw),
        "header": hashlib.sha256(raw[:end]).hexdigest(),
        "sampled": sampled.hexdigest(),
        "full": hashlib.blake2b(raw, digest_size=16).hexdigest(),
    }


def test_a_folder_changed_after_its_check_and_before_it_is_mapped_is_an_error(checkpoint, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The check of a reused folder and the mapping of its files are a whole load apart: a flip in between is found."""
    from bigjob.engine.run import loading
    from bigjob.errors import CheckpointError

    offload = tmp_path / "off"
    folder = folder_of(load(checkpoint, offload))
    prepare = loading.prepare_offload_folder

    def flipped_after_the_check(*args, **kwargs):  # type: ignore[no-untyped-def]
        prepared = prepare(*args, **kwargs)
        flip_in_first_page(prepared.path)
        return prepared

    monkeypatch.setattr(loading, "prepare_offload_folder", flipped_after_the_check)
    with pytest.raises(CheckpointError, match=rf"'{shard(folder)}' was changed while the model loaded.*load the model again"):
        load(checkpoint, offload)
    monkeypatch.setattr(loading, "prepare_offload_folder", prepare)
    model = load(checkpoint, offload)  # loaded again: the check finds the flip and rebuilds
    assert get_dispatch_info(model).offload_reused is False
    with torch.no_grad():
        assert torch.equal(model(inputs()), reference(torch.bfloat16))
