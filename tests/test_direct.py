"""Tests of bigjob.engine.tiers.direct: disk-tier units read past the page cache into reused buffers.

The reference is the tiny model held in RAM by plain PyTorch; what the page cache holds is
read with ``mincore`` (:func:`bigjob.engine.tiers.pages.resident`), independently of the choice
the engine makes from it.
"""

from __future__ import annotations

import errno
import gc
import os
from pathlib import Path

import pytest
import torch
from _enginekit import empty_model, evict, inputs, untied_state, write_sharded_safetensors
from tiny_transformer import TinyLM

from bigjob import dispatch_model, get_dispatch_info, load_checkpoint_and_dispatch
from bigjob.engine.tiers.direct import ALIGN, GAP, BufferPool, DirectReads, Files, Layout, cached_fraction
from bigjob.engine.run.paged_units import PagedUnit
from bigjob.engine.tiers.pages import PAGE, Range, resident
from bigjob.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT") or not Path("/proc/self/maps").exists(), reason="needs Linux")

SHAPE = dict(vocab=512, width=256, depth=4, heads=4, context=16)


# --- the layout -----------------------------------------------------------------------------


def test_layout_merges_near_tensors_and_keeps_their_offset_within_a_block() -> None:
    places = [
        ("/b", 10_000, 100),  # second file: its own extent
        ("/a", 4_100, 8),
        ("/a", 4_108, 6_000),  # ends at 10_108: the extent runs to 12_288
        ("/a", 10_108 + GAP + 1, 16),  # more than GAP past the end: a new extent
    ]
    layout = Layout.of(places)
    far = 10_108 + GAP + 1
    assert [(e.path, e.offset, e.length, e.at, e.end) for e in layout.extents] == [
        ("/a", 4_096, 8_192, 0, 10_108),
        ("/a", far - far % 4_096, 4_096, 8_192, far + 16),
        ("/b", 8_192, 4_096, 12_288, 10_100),
    ]
    # Positions in the order given, each at its file offset modulo ALIGN within its extent.
    assert layout.positions == (12_288 + 10_000 - 8_192, 4, 12, 8_192 + far % 4_096)
    assert layout.size == 16_384
    for (path, offset, _), position in zip(places, layout.positions):
        assert position % ALIGN == offset % ALIGN


def test_layout_reads_a_gap_smaller_than_the_limit_in_the_same_request() -> None:
    layout = Layout.of([("/a", 0, 4_096), ("/a", 4_096 + GAP, 4_096)])
    assert [(e.offset, e.length) for e in layout.extents] == [(0, 4_096 + GAP + 4_096)]
    assert layout.positions == (0, 4_096 + GAP)


# --- files and buffers ----------------------------------------------------------------------


def _bytes_file(path: Path, size: int) -> bytes:
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(size)).numpy().tobytes()
    path.write_bytes(data)
    return data


def test_reads_give_the_file_bytes_and_leave_the_page_cache_alone(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    data = _bytes_file(path, 3 * 2**20 + 123)
    evict(path)
    places = [(str(path), 5_000, 70_000), (str(path), 2 * 2**20, 2**20 + 123)]
    layout = Layout.of(places)
    files = Files()
    assert files.add(str(path), path.stat().st_ino)
    buffer = bytearray(layout.size + ALIGN)
    view = memoryview(_aligned(buffer, layout.size))
    for extent in layout.extents:
        files.read(extent, view[extent.at : extent.at + extent.length])
    for (_, offset, nbytes), at in zip(places, layout.positions):
        assert bytes(view[at : at + nbytes]) == data[offset : offset + nbytes]
    fd, is_direct = files.open(str(path))
    if is_direct:  # ext4, xfs, tmpfs on recent kernels: nothing of the file was cached by the reads
        assert _cached_pages(path) == 0
    view.release()
    files.close()


def test_a_file_replaced_since_it_was_mapped_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    _bytes_file(path, 8192)
    inode = path.stat().st_ino
    replacement = tmp_path / "new.bin"
    _bytes_file(replacement, 8192)
    os.replace(replacement, path)
    files = Files()
    assert path.stat().st_ino != inode
    assert not files.add(str(path), inode)
    assert files.add(str(path), path.stat().st_ino)
    files.close()


def test_a_truncated_file_is_a_checkpoint_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    _bytes_file(path, 64 * 1024)
    files = Files()
    assert files.add(str(path), path.stat().st_ino)
    os.truncate(path, 10_000)
    extent = Layout.of([(str(path), 8_192, 40_000)]).extents[0]
    buffer = bytearray(extent.length + ALIGN)
    with pytest.raises(CheckpointError, match=r"w\.bin' ends at byte 10000, but its weights run to byte 48192"):
        files.read(extent, memoryview(_aligned(buffer, extent.length)))
    files.close()


def test_a_refused_direct_read_falls_back_to_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What a file system whose block size exceeds ALIGN, or a device that refuses O_DIRECT reads, does.
    path = tmp_path / "w.bin"
    data = _bytes_file(path, 20_000)
    files = Files()
    assert files.add(str(path), path.stat().st_ino)
    fd, is_direct = files.open(str(path))
    if not is_direct:
        pytest.skip("this file system refuses O_DIRECT at open: the fallback is the only path")
    real = os.preadv

    def refuse_direct(fd_: int, buffers: list, offset: int) -> int:
        if fd_ == fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd_, buffers, offset)

    monkeypatch.setattr(os, "preadv", refuse_direct)
    extent = Layout.of([(str(path), 100, 19_000)]).extents[0]
    buffer = bytearray(extent.length + ALIGN)
    view = memoryview(_aligned(buffer, extent.length))
    files.read(extent, view)
    assert bytes(view[100 : 100 + 19_000]) == data[100 : 100 + 19_000]
    assert files.open(str(path))[1] is False  # later reads go through the cache at once
    view.release()
    files.close()


def test_the_pool_reuses_buffers_grows_when_one_is_held_and_trims_free_ones() -> None:
    pool = BufferPool(10_000)
    assert pool.size == 12_288
    first = pool.acquire()
    second = pool.acquire()  # the first is still out (a prefetched unit the forward skipped): a new one
    assert first is not second and pool.held == 2
    pool.release(first)
    assert pool.acquire() is first
    pool.release(first)
    pool.release(second)
    pool.trim()
    assert pool.held == 0
    assert pool.acquire() not in (first, second)


def test_the_cached_fraction_sampled_follows_what_mincore_counts_whole(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    _bytes_file(path, 32 * 2**20)
    _warm([path])
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # dirty pages cannot be dropped
    os.posix_fadvise(fd, 0, 8 * 2**20, os.POSIX_FADV_DONTNEED)  # the first quarter leaves the cache
    os.posix_fadvise(fd, 20 * 2**20, 4 * 2**20, os.POSIX_FADV_DONTNEED)  # and an eighth further on
    os.close(fd)
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as m:
        view = torch.frombuffer(m, dtype=torch.uint8)
        whole = Range(view.data_ptr(), 32 * 2**20)
        del view
        exact = resident(whole) / (whole.length // PAGE)
        sampled = cached_fraction([whole])
        small = cached_fraction([Range(whole.start, 64 * PAGE)])  # one window: counted whole
    assert exact == pytest.approx(0.625, abs=0.01)
    assert sampled == pytest.approx(exact, abs=1 / 8)
    assert small == 0.0


# --- dispatched models ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(**SHAPE).eval()


@pytest.fixture(scope="module")
def checkpoint(reference: TinyLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sharded_safetensors(tmp_path_factory.mktemp("direct") / "ckpt", untied_state(reference), count=2)


def _dispatch(checkpoint: Path, reference: TinyLM, disk_reads: str) -> torch.nn.Module:
    total = sum(p.numel() * 4 for p in reference.parameters())
    return load_checkpoint_and_dispatch(
        empty_model(**SHAPE),
        checkpoint,
        device_map="auto",
        max_memory={"cpu": total * 3 // 5},
        no_split_module_classes=["Block"],
        disk_reads=disk_reads,
    )


def _units(model: torch.nn.Module) -> list[PagedUnit]:
    schedule = get_dispatch_info(model).schedule
    assert schedule is not None
    return [u for u in schedule.units if isinstance(u, PagedUnit)]


def _disk_files(model: torch.nn.Module) -> list[Path]:
    paths = {e.path for u in _units(model) if u.direct is not None for e in u.direct.layout.extents}
    return sorted(Path(p) for p in paths)


def _disk_pages(model: torch.nn.Module) -> tuple[int, int]:
    """(cached, total) pages of the disk tier's bytes in their files."""
    cached = total = 0
    for unit in _units(model):
        for r in unit.ranges:
            total += r.length // PAGE
            cached += resident(r) or 0
    return cached, total


def _forward(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``model(x)`` and how many disk-tier units that forward read directly."""
    reads = get_dispatch_info(model).schedule.unit_reads
    before = reads["direct"]
    out = model(x)
    return out, reads["direct"] - before


@pytest.mark.parametrize("disk_reads", ["mapped", "direct", "auto"])
def test_outputs_equal_the_model_in_ram_warm_and_evicted(checkpoint: Path, reference: TinyLM, disk_reads: str) -> None:
    model = _dispatch(checkpoint, reference, disk_reads)
    units = _units(model)
    assert len(units) >= 2
    assert all((u.direct is None) == (disk_reads == "mapped") for u in units)
    ids = inputs(vocab=SHAPE["vocab"], length=8)
    with torch.no_grad():
        expected = reference(ids)
        for evicted in (False, True, True, False, True):
            if evicted:
                evict(*_disk_files(model) or sorted(checkpoint.parent.glob("*.safetensors")))
            assert torch.equal(model(ids), expected)
    # The forward's tensors are the file views again, whatever the forward ran on.
    for unit in units:
        for slot in unit.slots:
            assert getattr(slot.module, slot.local).data_ptr() == slot.home.data_ptr()


def test_direct_reads_leave_the_disk_tier_out_of_the_page_cache(checkpoint: Path, reference: TinyLM) -> None:
    model = _dispatch(checkpoint, reference, "direct")
    files = _disk_files(model)
    assert files
    if not all(Files._open(str(p))[1] for p in files):
        pytest.skip("this file system refuses O_DIRECT")
    ids = inputs(vocab=SHAPE["vocab"], length=8)
    with torch.no_grad():
        evict(*files)
        before, total = _disk_pages(model)  # pages another live mapping holds cannot be evicted: a few may stay
        assert before < total // 10
        _, read = _forward(model, ids)
    cached, total = _disk_pages(model)
    assert cached == before
    assert read == len(_units(model))
    # The mapped path, for contrast, leaves them cached.
    mapped = _dispatch(checkpoint, reference, "mapped")
    with torch.no_grad():
        evict(*files)
        mapped(ids)
    cached, total = _disk_pages(mapped)
    assert cached == total


def test_direct_reads_follow_dispatch_model_and_bad_values_are_refused(checkpoint: Path, reference: TinyLM, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"disk_reads must be one of 'auto', 'mapped', 'direct'; got 'fast'"):
        _dispatch(checkpoint, reference, "fast")
    # A model in RAM sent to an offload folder by dispatch_model reads that folder directly.
    model = TinyLM(**SHAPE).eval()
    model.load_state_dict(reference.state_dict())
    device_map = {"embed": "cpu", "pos": "cpu", "blocks.0": "cpu", "blocks.1": "disk", "blocks.2": "disk", "blocks.3": "cpu", "norm": "cpu", "head": "cpu", "positions": "cpu", "mask": "cpu"}
    model = dispatch_model(model, device_map, offload_folder=tmp_path / "off", disk_reads="direct")
    units = _units(model)
    assert len(units) >= 2 and all(u.direct is not None for u in units)
    assert all(Path(e.path).is_relative_to(tmp_path / "off") for u in units for e in u.direct.layout.extents)
    ids = inputs(vocab=SHAPE["vocab"], length=8)
    with torch.no_grad():
        out, read = _forward(model, ids)
        assert torch.equal(out, reference(ids))
    assert read == len(units)


def test_auto_is_the_default(checkpoint: Path, reference: TinyLM) -> None:
    total = sum(p.numel() * 4 for p in reference.parameters())
    model = load_checkpoint_and_dispatch(empty_model(**SHAPE), checkpoint, device_map="auto", max_memory={"cpu": total * 3 // 5}, no_split_module_classes=["Block"])
    reads = get_dispatch_info(model).schedule.reads
    assert reads is not None and reads.policy.mode == "auto"


# --- helpers --------------------------------------------------------------------------------


def _aligned(buffer: bytearray, size: int) -> memoryview:
    """``size`` bytes of ``buffer`` starting at an ALIGN-aligned address (O_DIRECT needs one)."""
    address = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    skip = -address % ALIGN
    return memoryview(buffer)[skip : skip + size]


def _warm(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass


def _cached_pages(path: Path) -> int:
    import mmap

    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        view = torch.frombuffer(m, dtype=torch.uint8)
        address = view.data_ptr()
        del view  # the mapping can close only once nothing exports it
        count = resident(Range(address, size + -size % PAGE))
    assert count is not None
    return count


def test_tied_weights_on_the_disk_tier_read_directly(checkpoint: Path, reference: TinyLM) -> None:
    # The head shares the embedding's weight; both modules on disk, each read into its own buffer.
    device_map = {"embed": "disk", "pos": "cpu", "blocks.0": "cpu", "blocks.1": "disk", "blocks.2": "cpu", "blocks.3": "disk",
                  "norm": "cpu", "head": "disk", "positions": "cpu", "mask": "cpu"}
    model = load_checkpoint_and_dispatch(empty_model(**SHAPE), checkpoint, device_map=device_map, disk_reads="direct")
    assert model.head.weight is model.embed.weight
    ids = inputs(vocab=SHAPE["vocab"], length=8)
    with torch.no_grad():
        expected = reference(ids)
        for _ in range(3):
            evict(*_disk_files(model))
            out, read = _forward(model, ids)
            assert torch.equal(out, expected)
    assert read >= 3
    assert model.head.weight is model.embed.weight  # restored, still tied


def test_removing_the_hooks_closes_the_files_read_directly(checkpoint: Path, reference: TinyLM) -> None:
    from bigjob import remove_dispatch

    def open_on_checkpoint() -> int:
        folder = str(checkpoint.parent.resolve())
        return sum(1 for fd in Path("/proc/self/fd").iterdir() if os.path.realpath(fd).startswith(folder + os.sep))

    gc.collect()
    gc.disable()  # what is freed below must be freed by reference counting, not by a collection
    try:
        before = open_on_checkpoint()
        model = _dispatch(checkpoint, reference, "direct")
        with torch.no_grad():
            model(inputs(vocab=SHAPE["vocab"], length=8))
        dispatched, shards = open_on_checkpoint(), len(_disk_files(model))
        assert dispatched >= before + 2 * shards  # the loader's and the direct reads' descriptors
        remove_dispatch(model)
        assert open_on_checkpoint() == dispatched - shards  # the direct reads' closed at once
        del model
        assert open_on_checkpoint() == before  # and the model's own go with it: no cycle holds it
    finally:
        gc.enable()


class _Table(torch.nn.Module):
    """Returns a view of its own weight (as a rotary or positional table may): the output aliases the unit's bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(64, 1024))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight[:4]


class _Tables(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = _Table(), _Table(), _Table()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second, third = self.a(x), self.b(x), self.c(x)  # all three alive until the sum
        return first + 2 * second + 3 * third


def test_an_output_that_views_the_weights_keeps_its_bytes(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from bigjob import init_empty_weights

    torch.manual_seed(0)
    reference = _Tables().eval()
    save_file(reference.state_dict(), str(tmp_path / "t.safetensors"))
    with init_empty_weights():
        model = _Tables().eval()
    model = load_checkpoint_and_dispatch(model, str(tmp_path / "t.safetensors"), device_map={"a": "disk", "b": "disk", "c": "disk"},
                                         disk_reads="direct")
    x = torch.zeros(1)
    with torch.no_grad():
        expected = reference(x)
        for _ in range(3):  # each unit's buffer would otherwise be refilled by the next unit's read while its output lives
            out, read = _forward(model, x)
            assert torch.equal(out, expected)
    assert read == 3
