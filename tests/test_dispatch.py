"""Tests of bigjob.engine.run.dispatch and its hooks on CPU execution: the seed's example, dispatch
info, prefetch depths, zero-copy disk tier, page release, offload folders, detaching, devices.

References are the tiny model held in RAM by PyTorch alone; outputs are compared bit for bit.
"""

from __future__ import annotations

import threading
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from _enginekit import (
    BLOCK_NUMEL,
    CONTEXT,
    MIXED,
    VOCAB,
    WIDTH,
    empty_model,
    inputs,
    inside_mapping,
    on_meta,
    resident_kib,
    untied_state,
    write_checkpoint,
    write_sharded_safetensors,
)
from safetensors.torch import load_file
from tiny_transformer import TinyLM, make_reference
from torch import nn

from bigjob import (
    cpu_offload,
    disk_offload,
    dispatch_model,
    get_dispatch_info,
    infer_auto_device_map,
    init_empty_weights,
    load_checkpoint_and_dispatch,
    remove_dispatch,
)
from bigjob.engine.run import paged_units
from bigjob.engine.run.hooks import first_device, move_to
from bigjob.engine.tiers.pages import PAGE
from bigjob.engine.checkpoints.safetensors_writer import write_file
from bigjob.errors import DeviceError, OffloadError

EMBED, POS, NORM = VOCAB * WIDTH * 4, CONTEXT * WIDTH * 4, 2 * WIDTH * 4
BLOCK = BLOCK_NUMEL * 4
POSITIONS, MASK = CONTEXT * 8, CONTEXT * CONTEXT * 4


class MyModel(TinyLM):
    """The seed example's ``MyModel(...)``: the literal ``...`` stands for its configuration."""

    def __init__(self, config: object = None) -> None:
        super().__init__()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sharded safetensors checkpoint of the reference; returns its index."""
    return write_sharded_safetensors(tmp_path_factory.mktemp("sharded"), untied_state(make_reference()))


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    return make_reference()


def outputs(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs() if ids is None else ids)


def shard_files(index: Path) -> list[Path]:
    return sorted(index.parent.glob("*.safetensors"))


# --------------------------------------------------------------------------- the seed's example


def test_seed_example_verbatim(tmp_path: Path, reference: nn.Module) -> None:
    path = tmp_path / "checkpoint"
    write_checkpoint(path, "st_sharded_dir")

    from bigjob import init_empty_weights, load_checkpoint_and_dispatch

    with init_empty_weights():
        model = MyModel(...)
    model = load_checkpoint_and_dispatch(model, checkpoint=path, device_map="auto")

    assert isinstance(model, MyModel)
    assert on_meta(model) == []
    assert torch.equal(outputs(model), outputs(reference))


# --------------------------------------------------------------------------- dispatch info, detaching


def test_dispatch_info_fields_are_hand_computed(sharded: Path) -> None:
    model = load_checkpoint_and_dispatch(empty_model(), sharded, device_map=MIXED, no_split_module_classes=["Block"], prefetch=2)
    info = get_dispatch_info(model)
    assert info is not None
    assert dict(info.device_map) == MIXED
    assert info.main_device == "cpu"
    assert info.bytes_per_tier == {
        "cpu": EMBED + POS + 2 * BLOCK + POSITIONS + MASK,  # head is the embedding: counted once
        "disk": 2 * BLOCK + NORM,
    }
    assert info.paged_units == 3  # blocks.1, blocks.2, norm
    assert info.streamed_units == 0
    assert info.prefetch == 2
    assert info.offload_folder is None and info.offload_reused is None
    assert info.load_seconds > 0


def test_hf_device_map_is_the_map_as_accelerate_writes_it(sharded: Path) -> None:
    model = load_checkpoint_and_dispatch(empty_model(), sharded, device_map=MIXED, no_split_module_classes=["Block"])
    assert model.hf_device_map == dict(MIXED)  # no GPU here: "cpu" and "disk" are written as they are
    remove_dispatch(model)
    assert not hasattr(model, "hf_device_map")


def test_all_disk_info(sharded: Path) -> None:
    model = load_checkpoint_and_dispatch(empty_model(), sharded, device_map="disk", no_split_module_classes=["Block"])
    info = get_dispatch_info(model)
    assert info.bytes_per_tier == {"disk": EMBED + POS + 4 * BLOCK + NORM, "cpu": POSITIONS + MASK}
    assert info.paged_units == 7  # embed, 4 blocks, norm, head (its tied weight)


def test_offload_buffers_puts_persistent_buffers_on_disk(sharded: Path, reference: nn.Module) -> None:
    model = load_checkpoint_and_dispatch(empty_model(), sharded, device_map="disk", offload_buffers=True)
    info = get_dispatch_info(model)
    # The int64 persistent buffer is served from the checkpoint; the non-persistent mask has no file.
    assert info.bytes_per_tier == {"disk": EMBED + POS + 4 * BLOCK + NORM + POSITIONS, "cpu": MASK}
    assert inside_mapping(model.positions, shard_files(sharded))
    assert model.positions.dtype == torch.int64
    assert torch.equal(outputs(model), outputs(reference))


class Scaled(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, width), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


class TwoScaled(nn.Module):
    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.a = Scaled(width)
        self.b = Scaled(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_non_persistent_buffer_of_a_disk_module_with_offload_buffers(tmp_path: Path) -> None:
    # Such a buffer has no file to live in: it must stay an ordinary tensor, never have its pages released.
    torch.manual_seed(0)
    reference = TwoScaled().eval()
    write_file(tmp_path / "m.safetensors", reference.state_dict())
    with init_empty_weights():
        model = TwoScaled().eval()
    model = load_checkpoint_and_dispatch(
        model, tmp_path / "m.safetensors", device_map="disk", offload_buffers=True, no_split_module_classes=["Scaled"]
    )
    x = torch.randn(4, 256)
    with torch.no_grad():
        expected = reference(x)
        for _ in range(3):
            assert torch.equal(model(x), expected)
    assert torch.equal(model.a.scale, reference.a.scale)


def test_remove_dispatch_gives_back_a_plain_module(sharded: Path, reference: nn.Module) -> None:
    model = load_checkpoint_and_dispatch(empty_model(), sharded, device_map=MIXED, no_split_module_classes=["Block"])
    info = get_dispatch_info(model)
    assert any(m._forward_pre_hooks for m in model.modules())
    plain = remove_dispatch(model)
    assert plain is model
    assert get_dispatch_info(plain) is None
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in plain.modules())
    assert info.prefetcher is None and info.handles == []
    assert torch.equal(outputs(plain), outputs(reference))
    assert remove_dispatch(plain) is plain  # idempotent


def test_detach_on_the_info_is_remove_dispatch(sharded: Path, reference: nn.Module) -> None:
    model = load_checkpoint_and_dispatch(empty_model(), sharded, device_map="disk")
    get_dispatch_info(model).detach()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert torch.equal(outputs(model), outputs(reference))


def test_dispatching_again_replaces_the_hooks(sharded: Path, reference: nn.Module) -> None:
    model = load_checkpoint_and_dispatch(empty_model(), sharded, device_map="disk")
    model = load_checkpoint_and_dispatch(model, sharded, device_map=MIXED, no_split_module_classes=["Block"])
    assert get_dispatch_info(model).paged_units == 3
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 4  # root + 3 paged units
    assert torch.equal(outputs(model), outputs(reference))


# --------------------------------------------------------------------------- prefetch, repeats, errors


@pytest.mark.parametrize("device_map", ["disk", "mixed"])
def test_prefetch_depths_give_identical_outputs(sharded: Path, reference: nn.Module, device_map: str) -> None:
    ids = inputs(batch=4, length=CONTEXT)
    expected = outputs(reference, ids)
    results = []
    for depth in (0, 1, 2):
        model = load_checkpoint_and_dispatch(
            empty_model(),
            sharded,
            device_map=MIXED if device_map == "mixed" else "disk",
            no_split_module_classes=["Block"],
            prefetch=depth,
        )
        assert get_dispatch_info(model).prefetch == depth
        results.append(outputs(model, ids))
        remove_dispatch(model)
    for out in results:
        assert torch.equal(out, expected)


def test_the_plan_keeps_room_for_the_dispatched_prefetch_depth(sharded: Path, reference: nn.Module) -> None:
    # Room on the CPU for 1 + prefetch blocks brought back at once: a deeper prefetch leaves less resident.
    resident = []
    for depth in (0, 1, 2):
        model = load_checkpoint_and_dispatch(
            empty_model(), sharded, device_map="auto", max_memory={"cpu": 4 * BLOCK}, no_split_module_classes=["Block"], prefetch=depth
        )
        info = get_dispatch_info(model)
        assert info.device_map.summary.reserve == {"cpu": (1 + depth) * BLOCK}
        assert info.bytes_per_tier["cpu"] <= 4 * BLOCK - (1 + depth) * BLOCK
        resident.append(info.bytes_per_tier["cpu"])
        assert torch.equal(outputs(model), outputs(reference))
    assert resident[0] > resident[1] > resident[2]


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_pages_are_populated_ahead_in_the_background(
    sharded: Path, reference: nn.Module, monkeypatch: pytest.MonkeyPatch, depth: int
) -> None:
    calls: list[tuple[str, int]] = []
    real = paged_units.populate

    def populate(ranges, readahead=True):  # type: ignore[no-untyped-def]
        ranges = list(ranges)
        calls.append((threading.current_thread().name, sum(r.length for r in ranges)))
        real(ranges, readahead)

    touches: list[tuple[str, int]] = []
    real_touch = paged_units.touch

    def touch(ranges):  # type: ignore[no-untyped-def]
        ranges = list(ranges)
        touches.append((threading.current_thread().name, sum(r.length for r in ranges)))
        real_touch(ranges)

    monkeypatch.setattr(paged_units, "populate", populate)
    monkeypatch.setattr(paged_units, "touch", touch)
    model = load_checkpoint_and_dispatch(
        empty_model(), sharded, device_map="disk", no_split_module_classes=["Block"], prefetch=depth
    )
    for _ in range(2):
        calls.clear()
        touches.clear()
        assert torch.equal(outputs(model), outputs(reference))
        assert len(calls) == 7  # every paged unit once per forward: embed, 4 blocks, norm, head
        assert touches == calls  # and every populated page read once, by the same thread, before use
        threads = {name for name, _ in calls}
        if depth == 0:
            assert threads == {threading.main_thread().name}
        else:  # all done by the prefetch thread while the main thread computes
            assert all(name.startswith("bigjob-prefetch") for name in threads), threads
        # Each block's whole pages: a partial page at either end of a run of the block's bytes may be
        # shared with a tensor of another unit, so it is left to fault in on use (and never released
        # by this unit). A block is one run, or two when it straddles two shard files.
        blocks = sorted(size for _, size in calls)[-4:]
        assert all(BLOCK - 4 * PAGE <= size <= BLOCK and size % PAGE == 0 for size in blocks), blocks


def test_repeated_forwards_are_identical(sharded: Path, reference: nn.Module) -> None:
    model = load_checkpoint_and_dispatch(empty_model(), sharded, device_map="disk", no_split_module_classes=["Block"])
    for length in (12, CONTEXT, 12):  # (each new shape costs PyTorch a one-off warm-up)
        ids = inputs(length=length, seed=length)
        expected = outputs(reference, ids)
        for _ in range(3):
            assert torch.equal(outputs(model, ids), expected)


def test_with_autograd_enabled(sharded: Path, reference: nn.Module) -> None:
    model = load_checkpoint_and_dispatch(empty_model(), sharded, device_map="disk")
    ids = inputs()
    out = model(ids)
    assert torch.equal(out.detach(), reference(ids).detach())


def test_a_forward_that_fails_midway_leaves_the_model_usable(sharded: Path, reference: nn.Module) -> None:
    model = load_checkpoint_and_dispatch(empty_model(), sharded, device_map="disk", no_split_module_classes=["Block"])
    with pytest.raises((RuntimeError, IndexError)):
        outputs(model, inputs(length=CONTEXT + 4))  # longer than the positions: fails after the embedding ran
    with pytest.raises(IndexError):
        outputs(model, torch.full((1, 4), VOCAB + 1))  # fails inside the (paged) embedding
    assert torch.equal(outputs(model), outputs(reference))


def test_outputs_come_back_on_the_input_device(sharded: Path) -> None:
    model = load_checkpoint_and_dispatch(empty_model(), sharded, device_map="disk")
    assert outputs(model).device == torch.device("cpu")


def test_move_to_and_first_device_walk_structures() -> None:
    Pair = namedtuple("Pair", "a b")
    value = {"x": torch.ones(2), "pair": Pair(torch.zeros(1), [torch.ones(3), "text"]), "n": 3}
    moved = move_to(value, torch.device("meta"))
    assert moved["x"].is_meta and moved["pair"].a.is_meta and moved["pair"].b[0].is_meta
    assert isinstance(moved["pair"], Pair) and moved["pair"].b[1] == "text" and moved["n"] == 3
    same = torch.ones(2)
    assert move_to(same, torch.device("cpu")) is same
    assert first_device((1, [torch.ones(1, device="meta")]), {}) == torch.device("meta")
    assert first_device((), {"k": torch.ones(1)}) == torch.device("cpu")
    assert first_device((1, "a"), {}) is None


# --------------------------------------------------------------------------- the disk tier


def test_disk_and_ram_tiers_are_zero_copy_and_write_nothing(sharded: Path, reference: nn.Module, tmp_path: Path) -> None:
    offload = tmp_path / "offload"
    before = {p: p.read_bytes() for p in shard_files(sharded)}
    model = load_checkpoint_and_dispatch(
        empty_model(), sharded, device_map=MIXED, no_split_module_classes=["Block"], offload_folder=offload
    )
    files = shard_files(sharded)
    disk = [p for n, p in model.named_parameters() if n.startswith(("blocks.1.", "blocks.2.", "norm."))]
    ram = [p for n, p in model.named_parameters() if n.startswith(("blocks.0.", "blocks.3.", "embed.", "pos"))]
    assert len(disk) == 2 * 12 + 2 and len(ram) == 2 * 12 + 2
    assert all(inside_mapping(p, files) for p in disk)
    assert all(inside_mapping(p, files) for p in ram)  # same dtype on the CPU: the checkpoint's pages, not copies
    assert not offload.exists()
    assert get_dispatch_info(model).offload_folder is None
    # The mapping is private: writing to a weight changes this model only, never the file.
    saved = ram[0].detach().clone()
    with torch.no_grad():
        ram[0].add_(1.0)
    assert {p: p.read_bytes() for p in files} == before
    with torch.no_grad():
        ram[0].copy_(saved)
    assert torch.equal(outputs(model), outputs(reference))


def test_ram_tier_in_another_dtype_is_an_owned_copy(sharded: Path) -> None:
    model = load_checkpoint_and_dispatch(empty_model(), sharded, device_map="cpu", dtype=torch.float64)
    files = shard_files(sharded)
    params = list(model.parameters())
    assert params and all(p.dtype == torch.float64 for p in params)
    assert not any(inside_mapping(p, files) for p in params)


def test_disk_pages_are_released_after_use(tmp_path: Path) -> None:
    kwargs = dict(vocab=512, width=256, depth=4, heads=4, context=16)  # ~13 MB of weights
    reference = make_reference(**kwargs)
    path = tmp_path / "model.safetensors"
    write_file(path, untied_state(reference))
    size_kib = path.stat().st_size // 1024
    with init_empty_weights():
        model = TinyLM(**kwargs).eval()
    model = load_checkpoint_and_dispatch(model, path, device_map="disk", no_split_module_classes=["Block"])
    ids = inputs(vocab=512)
    with torch.no_grad():
        expected = reference(ids)
        assert torch.equal(model(ids), expected)
    # After the forward only the root's direct parameter (`pos`, 16 KiB) and pages next to unit
    # boundaries stay mapped: populating a unit makes the kernel map the pages around each fault
    # (64 KiB "fault-around", or a whole large folio on some filesystems), which can take in the
    # tail of the unit released just before. Each block is ~23% of the file: one left mapped fails this.
    assert resident_kib(path) <= 0.15 * size_kib, (resident_kib(path), size_kib)
    # Control: the same views used without hooks stay resident, so the probe does see them.
    remove_dispatch(model)
    with torch.no_grad():
        assert torch.equal(model(ids), expected)
    assert resident_kib(path) > 0.9 * size_kib


def test_conversion_writes_an_offload_folder_once_and_reuses_it(sharded: Path, tmp_path: Path) -> None:
    offload = tmp_path / "offload"
    bf16 = make_reference().to(torch.bfloat16)
    first = load_checkpoint_and_dispatch(
        empty_model(), sharded, device_map="disk", dtype=torch.bfloat16, offload_folder=offload
    )
    info = get_dispatch_info(first)
    assert info.offload_reused is False
    folder = Path(info.offload_folder)
    assert folder.parent == offload and folder.name.startswith("offload-")
    shards = sorted(folder.glob("*.safetensors"))
    assert shards
    stamps = {p: p.stat().st_mtime_ns for p in folder.iterdir()}

    # The folder's files are plain safetensors, in the target dtype, with the converted values.
    stored: dict[str, torch.Tensor] = {}
    for shard in shards:
        stored.update(load_file(str(shard)))
    expected_state = {k: v for k, v in bf16.state_dict().items() if v.is_floating_point() and k not in ("head.weight", "mask")}
    assert set(stored) == set(expected_state)
    for name, tensor in stored.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected_state[name]), name
    assert all(inside_mapping(p, shards) for p in first.parameters())

    second = load_checkpoint_and_dispatch(
        empty_model(), sharded, device_map="disk", dtype=torch.bfloat16, offload_folder=offload
    )
    again = get_dispatch_info(second)
    assert again.offload_reused is True and again.offload_folder == info.offload_folder
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # nothing rewritten
    assert [p.name for p in offload.iterdir()] == [folder.name]
    ids = inputs()
    expected = outputs(bf16, ids)
    assert torch.equal(outputs(first, ids), expected)
    assert torch.equal(outputs(second, ids), expected)


# --------------------------------------------------------------------------- in-RAM models


def test_dispatch_model_on_an_in_ram_model(tmp_path: Path) -> None:
    model = make_reference()
    ids = inputs()
    expected = outputs(model, ids)
    dispatched = dispatch_model(model, MIXED, offload_folder=tmp_path / "offload")
    assert dispatched is model
    info = get_dispatch_info(model)
    folder = Path(info.offload_folder)
    shards = sorted(folder.glob("*.safetensors"))
    assert all(inside_mapping(p, shards) for n, p in model.named_parameters() if n.startswith(("blocks.1.", "norm.")))
    assert not inside_mapping(model.blocks[0].up.weight, shards)
    assert model.embed.weight is model.head.weight
    assert info.bytes_per_tier["disk"] == 2 * BLOCK + NORM
    for _ in range(2):
        assert torch.equal(outputs(model, ids), expected)
    assert torch.equal(remove_dispatch(model)(ids), expected)


def test_dispatch_model_disk_needs_an_offload_folder() -> None:
    with pytest.raises(OffloadError, match="offload_folder"):
        dispatch_model(make_reference(), {"": "disk"})


def test_cpu_offload_on_cpu(reference: nn.Module) -> None:
    model = make_reference()
    ids = inputs()
    model = cpu_offload(model, "cpu")
    assert get_dispatch_info(model).main_device == "cpu"
    assert torch.equal(outputs(model, ids), outputs(reference, ids))


def test_disk_offload_on_cpu(tmp_path: Path, reference: nn.Module) -> None:
    model = disk_offload(make_reference(), tmp_path / "offload", "cpu")
    info = get_dispatch_info(model)
    assert info.main_device == "cpu" and info.offload_reused is False and info.paged_units > 0
    shards = sorted(Path(info.offload_folder).glob("*.safetensors"))
    assert all(inside_mapping(p, shards) for p in model.parameters())
    assert model.embed.weight is model.head.weight
    ids = inputs()
    for _ in range(2):
        assert torch.equal(outputs(model, ids), outputs(reference, ids))
    # The same weights again: the folder (keyed by their content) is reused.
    other = disk_offload(make_reference(), tmp_path / "offload", "cpu")
    assert get_dispatch_info(other).offload_reused is True
    assert torch.equal(outputs(other, ids), outputs(reference, ids))
    # Other weights: another folder, never the first one.
    third = disk_offload(make_reference(seed=5), tmp_path / "offload", "cpu")
    assert get_dispatch_info(third).offload_folder != info.offload_folder
    assert torch.equal(outputs(third, ids), outputs(make_reference(seed=5), ids))


# --------------------------------------------------------------------------- devices


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize(
    "device_map", [{"": "cuda:0"}, {**MIXED, "blocks.3": "cuda:0"}, {**MIXED, "blocks.3": 0}]
)
def test_cuda_map_without_gpu_is_a_device_error(sharded: Path, device_map: dict) -> None:
    model = empty_model()
    with pytest.raises(DeviceError, match="cuda:0"):
        load_checkpoint_and_dispatch(model, sharded, device_map=device_map, no_split_module_classes=["Block"])
    assert get_dispatch_info(model) is None
    assert model.blocks[0].up.weight.is_meta  # raised before anything was loaded


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_planning_for_a_declared_gpu_works_but_dispatch_refuses(sharded: Path) -> None:
    budget = {"cuda:0": 2 * BLOCK + EMBED + POS + 1000, "cpu": 10**7}
    device_map = infer_auto_device_map(empty_model(), max_memory=budget, no_split_module_classes=["Block"])
    assert "cuda:0" in device_map.values() and "cpu" in device_map.values()
    assert device_map.summary is not None and device_map.summary.main_device == "cuda:0"
    model = empty_model()
    with pytest.raises(DeviceError, match="cuda:0"):
        load_checkpoint_and_dispatch(model, sharded, device_map=device_map, no_split_module_classes=["Block"])
    with pytest.raises(DeviceError, match="cuda:0"):
        load_checkpoint_and_dispatch(empty_model(), sharded, device_map="auto", max_memory=budget)
    assert on_meta(model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_dispatch_model_and_cpu_offload_refuse_missing_gpus(tmp_path: Path) -> None:
    model = make_reference()
    with pytest.raises(DeviceError, match="cuda:0"):
        dispatch_model(model, {"": "cuda:0"})
    with pytest.raises(DeviceError, match="cuda:1"):
        cpu_offload(model, "cuda:1")
    with pytest.raises(DeviceError):
        disk_offload(model, tmp_path / "offload", "cuda:0")
    assert all(p.device.type == "cpu" for p in model.parameters())
