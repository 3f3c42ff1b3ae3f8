"""Tests of bigjob.engine.tiers.folios: finding streamed files held in small page-cache folios and re-reading them once."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
from pathlib import Path

import pytest
import torch
from _enginekit import empty_model, evict, inputs, resident_kib, untied_state, write_sharded_safetensors
from tiny_transformer import TinyLM

from bigjob import get_dispatch_info, load_checkpoint_and_dispatch
from bigjob.engine.run import hooks
from bigjob.engine.tiers import folios
from bigjob.engine.tiers.folios import HUGE, drop_cached, file_mappings, refresh_small_folios
from bigjob.engine.tiers import pages
from bigjob.engine.tiers.pages import PAGE, Range, huge_pages_enabled, merge, populate, release, resident, touch
from bigjob.engine.checkpoints.safetensors_header import read_header
from bigjob.engine.checkpoints.safetensors_mapping import MappedFile
from bigjob.engine.checkpoints.safetensors_writer import write_file

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")

MIB = 2**20
def resident_pages(r: Range) -> int:
    """Pages of ``r`` (page-aligned) in the page cache, whether or not this process maps them."""
    count = resident(r)
    assert count is not None, "mincore failed"
    return count


def tensor_file(path: Path, mib: int) -> Path:
    write_file(path, {"w": torch.arange(mib * MIB // 4, dtype=torch.float32)})
    return path


def read_in_small_folios(path: Path) -> None:
    """Bring ``path`` into the page cache one 4 KiB page at a time, in random order (no readahead)."""
    evict(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        offsets = list(range(0, os.fstat(fd).st_size, PAGE))
        random.Random(0).shuffle(offsets)
        for offset in offsets:
            os.pread(fd, PAGE, offset)
    finally:
        os.close(fd)


def whole_range(mapped: MappedFile, path: Path) -> Range:
    info = read_header(path)[0]["w"]
    return merge([Range(mapped.address(info), info.nbytes)])[0]


@pytest.fixture(scope="module")
def huge_folios(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skips unless a cold read through a bigjob mapping here brings 2 MiB folios (kernel, filesystem, THP)."""
    if not huge_pages_enabled():
        pytest.skip("transparent huge pages are off on this system")
    path = tensor_file(tmp_path_factory.mktemp("probe") / "probe.safetensors", 8)
    evict(path)
    with MappedFile(path) as mapped:
        populate([whole_range(mapped, path)], readahead=False)
        if resident_kib(path, "FilePmdMapped") == 0:
            pytest.skip("this filesystem's page cache holds no 2 MiB folios here")


def test_touch_reads_every_page_of_its_ranges_and_no_other(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pages, "_TOUCH_CHUNK", 3)  # several chunks, the last one short
    area = mmap.mmap(-1, 16 * PAGE)  # anonymous: a page is resident only once something touched it
    start = ctypes.addressof(ctypes.c_char.from_buffer(area))
    whole = Range(start, 16 * PAGE)
    assert resident_pages(whole) == 0
    touch([Range(start + 2 * PAGE, 10 * PAGE), Range(start + 14 * PAGE + 100, 50)])  # the second one unaligned
    assert [resident_pages(Range(start + i * PAGE, PAGE)) for i in range(16)] == [0, 0] + [1] * 10 + [0, 0, 1, 0]
    assert bytes(area) == bytes(16 * PAGE)  # read, never written


def test_file_mappings_give_path_and_file_offset(tmp_path: Path) -> None:
    path = tensor_file(tmp_path / "m.safetensors", 1)
    info = read_header(path)[0]["w"]
    with MappedFile(path) as mapped:
        address = mapped.address(info)
        found = file_mappings([address, address + 1000, 8])  # 8: in no mapping
        assert set(found) == {address, address + 1000}
        mapping = found[address]
        assert mapping is found[address + 1000]
        assert Path(mapping.path) == path.resolve()
        assert mapping.file_offset(address) == info.offset
        assert mapping.file_offset(address + 1000) == info.offset + 1000


def test_drop_cached_drops_exactly_the_range(tmp_path: Path) -> None:
    path = tensor_file(tmp_path / "d.safetensors", 4)
    read_in_small_folios(path)  # a folio reaching past the range's edge is kept whole: keep them single pages here
    with MappedFile(path) as mapped:
        whole = whole_range(mapped, path)
        assert resident_pages(whole) == whole.length // PAGE
        first, second = Range(whole.start, MIB), Range(whole.start + MIB, whole.length - MIB)
        assert drop_cached([first]) == MIB
        assert resident_pages(first) == 0
        assert resident_pages(second) == second.length // PAGE


def test_pages_still_mapped_are_not_dropped(tmp_path: Path) -> None:
    path = tensor_file(tmp_path / "k.safetensors", 2)
    with MappedFile(path) as mapped:
        whole = whole_range(mapped, path)
        populate([whole])
        drop_cached([whole])  # the kernel keeps what someone maps
        assert resident_pages(whole) == whole.length // PAGE
        release([whole])


def test_small_folios_are_dropped_once_and_come_back_huge(tmp_path: Path, huge_folios: None) -> None:
    path = tensor_file(tmp_path / "s.safetensors", 16)
    read_in_small_folios(path)
    with MappedFile(path) as mapped:
        whole = whole_range(mapped, path)
        populate([whole])
        assert resident_kib(path, "FilePmdMapped") == 0  # the independent check: 4 KiB folios only
        release([whole])
        assert refresh_small_folios([whole]) == [str(path.resolve())]
        assert resident_pages(whole) == 0  # dropped: the next forward reads them again
        populate([whole], readahead=False)  # ... through the mapping that asks for huge folios
        assert resident_kib(path, "FilePmdMapped") >= (whole.length - 2 * HUGE) // 1024
        assert torch.equal(mapped.view(read_header(path)[0]["w"])[-3:], torch.arange(4 * MIB - 3, 4 * MIB, dtype=torch.float32))
        release([whole])
        assert refresh_small_folios([whole]) == []  # huge now: left alone
        assert resident_pages(whole) == whole.length // PAGE


def test_nothing_happens_without_transparent_huge_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tensor_file(tmp_path / "n.safetensors", 8)
    read_in_small_folios(path)
    monkeypatch.setattr(folios, "huge_pages_enabled", lambda: False)
    with MappedFile(path) as mapped:
        whole = whole_range(mapped, path)
        assert refresh_small_folios([whole]) == []
        assert resident_pages(whole) == whole.length // PAGE


def test_dispatch_checks_the_streamed_pages_once_after_the_first_forward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    reference = TinyLM(vocab=512, width=256, depth=4, heads=4, context=16).eval()
    index = write_sharded_safetensors(tmp_path / "ckpt", untied_state(reference), count=2)
    calls: list[list[Range]] = []
    monkeypatch.setattr(hooks, "refresh_small_folios", lambda ranges: calls.append(list(ranges)) or [])
    model = empty_model(vocab=512, width=256, depth=4, heads=4, context=16)
    total = sum(p.numel() * 4 for p in reference.parameters())
    model = load_checkpoint_and_dispatch(model, index, device_map="auto", max_memory={"cpu": total * 3 // 5}, no_split_module_classes=["Block"])
    disk = {n for n, t in get_dispatch_info(model).device_map.items() if t == "disk"}
    assert disk
    ids = inputs(vocab=512, length=8)
    with torch.no_grad():
        expected = reference(ids)
        for _ in range(3):
            assert torch.equal(model(ids), expected)
    assert len(calls) == 1
    # What was checked is what the forwards map and unmap: the disk tier's file views, nothing resident.
    checked = calls[0]
    disk_params = {n: p for n, p in model.named_parameters() if any(n == m or n.startswith(m + ".") for m in disk)}
    disk_bytes = sum(p.numel() * p.element_size() for p in disk_params.values())
    assert disk_bytes * 0.95 <= sum(r.length for r in checked) <= disk_bytes
    spans = [(r.start, r.start + r.length) for r in checked]
    for name, p in model.named_parameters():
        begin, end = p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()
        inside = any(s < end and begin < e for s, e in spans)
        assert inside == (name in disk_params) or p.numel() * p.element_size() < 2 * PAGE, name
    assert all(Path(m.path).parent == index.parent.resolve() for m in file_mappings(r.start for r in checked).values())


def test_a_cold_file_comes_in_huge_from_its_first_bytes(tmp_path: Path, huge_folios: None) -> None:
    # Reading the header must not leave small folios at the start of the file: the first
    # tensor's fault would then read small ones, and the readahead after it too.
    path = tensor_file(tmp_path / "c.safetensors", 32)
    evict(path)
    info = read_header(path)[0]["w"]
    with MappedFile(path) as mapped:
        populate([Range(mapped.base_address, info.offset + info.nbytes).aligned()], readahead=False)
        assert resident_kib(path, "FilePmdMapped") >= (info.offset + info.nbytes - HUGE) // 1024
