"""A checkpoint file changed under a dispatched model: a clear error, never mixed weights or SIGBUS."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from _enginekit import (
    MIXED,
    empty_model,
    inputs,
    untied_state,
    write_sharded_safetensors,
)
from tiny_transformer import make_reference
from torch import nn

from bigjob import get_dispatch_info, load_checkpoint_and_dispatch
from bigjob.engine.tiers.sources import Sources
from bigjob.errors import CheckpointError

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")

A_DAY_AGO = 86_400 * 10**9


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    """A fresh sharded checkpoint whose files look saved a day ago (a later write changes their times)."""
    index = write_sharded_safetensors(tmp_path / "ckpt", untied_state(make_reference()))
    for path in index.parent.iterdir():
        then = path.stat().st_mtime_ns - A_DAY_AGO
        os.utime(path, ns=(then, then))
    return index


def shards(index: Path) -> list[Path]:
    return sorted(index.parent.glob("*.safetensors"))


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs())


def dispatched(index: Path, **kwargs: object) -> nn.Module:
    return load_checkpoint_and_dispatch(empty_model(), index, no_split_module_classes=["Block"], **kwargs)  # type: ignore[arg-type]


def root_sources(model: nn.Module) -> Sources:
    sources = get_dispatch_info(model).sources
    assert sources is not None
    return sources


@pytest.mark.parametrize("device_map", ["disk", MIXED])
def test_every_shard_the_weights_map_is_watched(checkpoint: Path, device_map: object) -> None:
    model = dispatched(checkpoint, device_map=device_map)
    assert root_sources(model).paths == [str(p) for p in shards(checkpoint)]


def test_a_model_copied_into_ram_watches_nothing(checkpoint: Path) -> None:
    model = dispatched(checkpoint, device_map="cpu", dtype=torch.float64)  # converted: owned copies
    assert root_sources(model).paths == []
    for path in shards(checkpoint):
        path.write_bytes(b"")  # nothing of the model lives there any more
    assert torch.equal(run(model), run(make_reference().double()))


@pytest.mark.parametrize("device_map", ["disk", MIXED])
@pytest.mark.parametrize("disk_reads", ["mapped", "direct"])
def test_a_shard_truncated_in_place_is_a_checkpoint_error_naming_it(checkpoint: Path, device_map: object, disk_reads: str) -> None:
    model = dispatched(checkpoint, device_map=device_map, disk_reads=disk_reads)
    assert torch.equal(run(model), run(make_reference()))
    victim = shards(checkpoint)[1]
    with open(victim, "r+b") as handle:  # what a saver opening the path with "wb" does first
        handle.truncate(100)
    for _ in range(2):  # and again: the model does not carry on as if nothing happened
        with pytest.raises(CheckpointError, match=rf"'{victim}' was changed in place .*size went from \d+ to 100 bytes.*Load the model again"):
            run(model)


def test_a_shard_rewritten_in_place_with_the_same_size_is_an_error(checkpoint: Path) -> None:
    model = dispatched(checkpoint, device_map="disk")
    victim = shards(checkpoint)[0]
    data = bytearray(victim.read_bytes())
    data[-8:] = bytes(8)  # new weights, same length
    with open(victim, "r+b") as handle:
        handle.write(data)
    with pytest.raises(CheckpointError, match="modified, same size"):
        run(model)


def test_a_shard_replaced_by_rename_or_deleted_leaves_the_model_running_on_what_it_loaded(checkpoint: Path, tmp_path: Path) -> None:
    model = dispatched(checkpoint, device_map=MIXED)
    expected = run(make_reference())
    first, second = shards(checkpoint)[:2]
    fresh = tmp_path / "new.safetensors"
    shutil.copyfile(second, fresh)
    with open(fresh, "r+b") as handle:
        handle.truncate(100)  # whatever the new file holds, the mapping keeps the old one's pages
    os.replace(fresh, second)
    first.unlink()
    assert torch.equal(run(model), expected)


def test_a_shard_rewritten_during_a_forward_fails_that_forward(checkpoint: Path) -> None:
    """The check before the forward passed; the output, made of old and new weights, is never returned."""
    model = dispatched(checkpoint, device_map="disk")
    victim = shards(checkpoint)[-1]

    def rewrite(module: nn.Module, args: tuple) -> None:
        data = bytearray(victim.read_bytes())
        data[-8:] = bytes(8)
        with open(victim, "r+b") as handle:
            handle.write(data)

    hook = next(m for name, m in model.named_modules() if name.endswith("1")).register_forward_pre_hook(rewrite)
    with pytest.raises(CheckpointError, match=rf"'{victim}' was changed in place .*modified, same size"):
        run(model)
    hook.remove()
    with pytest.raises(CheckpointError):  # and the next forward refuses too, before reading anything
        run(model)
