"""Tests of the safetensors header, mapping and writer (checkpoints.safetensors_*) against the official package."""

from __future__ import annotations

import errno
import gc
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from _enginekit import mapped_ranges, mapping_flags, resident_kib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bigjob.engine.checkpoints import safetensors_writer
from bigjob.engine.checkpoints.safetensors_header import MAX_HEADER_BYTES, TensorInfo, dtype_name, read_header
from bigjob.engine.checkpoints.safetensors_mapping import MappedFile
from bigjob.engine.checkpoints.safetensors_writer import SafetensorsWriter, write_file
from bigjob.engine.tiers.pages import huge_pages_enabled
from bigjob.errors import CheckpointError, OffloadError

DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 4).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=gen, dtype=torch.int64).to(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN-safe, works for float8)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def raw_file(path: Path, header: object, data: bytes, *, pad: bool = True) -> Path:
    encoded = json.dumps(header).encode() if not isinstance(header, bytes) else header
    if pad:
        encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3), (2, 0, 4)], ids=str)
def test_round_trip_against_official(tmp_path: Path, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = sample(dtype, shape)
    ours = tmp_path / "ours.safetensors"
    write_file(ours, {"t": tensor, "pad": torch.ones(1, dtype=torch.int8)})
    assert same(load_file(ours)["t"], tensor)

    theirs = tmp_path / "theirs.safetensors"
    save_file({"t": tensor, "x": torch.ones(1, dtype=torch.int8)}, theirs)
    infos, _ = read_header(theirs)
    assert infos["t"].dtype == dtype and infos["t"].shape == shape
    with MappedFile(theirs) as mapped:
        assert same(mapped.view(infos["t"]), tensor)
        assert same(mapped.read(infos["t"]), tensor)


def test_unsigned_dtypes_read(tmp_path: Path) -> None:
    tensors = {"u16": torch.arange(5).to(torch.uint16), "u32": torch.arange(3).to(torch.uint32)}
    save_file(tensors, tmp_path / "u.safetensors")
    infos, _ = read_header(tmp_path / "u.safetensors")
    with MappedFile(tmp_path / "u.safetensors") as mapped:
        for name, tensor in tensors.items():
            assert same(mapped.view(infos[name]), tensor)


def test_metadata_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_file(path, {"a": torch.zeros(2)}, metadata={"format": "pt", "note": "hé"})
    with safe_open(path, "pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "hé"}
    assert read_header(path)[1] == {"format": "pt", "note": "hé"}
    save_file({"a": torch.zeros(2)}, tmp_path / "o.safetensors", metadata={"k": "v"})
    assert read_header(tmp_path / "o.safetensors")[1] == {"k": "v"}


def test_data_starts_on_a_cache_line_and_offsets_are_absolute(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    tensors = {"b": torch.arange(3, dtype=torch.int8), "a": torch.arange(4, dtype=torch.float64), "w": torch.ones(3, 16)}
    write_file(path, tensors)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert (8 + header_len) % 64 == 0
    infos, _ = read_header(path)
    # w (192 bytes, whole cache lines) first; then by itemsize: a (32 bytes) at 8 + header + 192, b after it.
    assert list(infos) == ["w", "a", "b"]
    assert [info.offset for info in infos.values()] == [8 + header_len, 8 + header_len + 192, 8 + header_len + 224]
    for name, info in infos.items():
        assert isinstance(info, TensorInfo) and info.path == path
        assert info.offset % info.dtype.itemsize == 0
        assert raw[info.offset : info.offset + info.nbytes] == tensors[name].numpy().tobytes()


def test_data_align_8_lays_out_as_the_safetensors_library_does(tmp_path: Path) -> None:
    tensors = {"w": torch.ones(3, 16), "b": torch.arange(3, dtype=torch.int8)}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    with SafetensorsWriter(ours, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], data_align=8) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    save_file(tensors, theirs)
    # Padded to a multiple of 8 only, as the library pads its headers; read back by the library.
    assert (8 + struct.unpack("<Q", ours.read_bytes()[:8])[0]) % 8 == 0
    assert all(same(load_file(ours)[n], t) for n, t in tensors.items())
    with pytest.raises(ValueError, match="data_align must be a positive multiple of 8, got 12"):
        SafetensorsWriter(tmp_path / "x.safetensors", [("w", torch.float32, (1,))], data_align=12)


def test_infos_come_in_file_order(tmp_path: Path) -> None:
    header = {
        "z": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
        "a": {"dtype": "U8", "shape": [1], "data_offsets": [4, 5]},
        "m": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]},
    }
    infos, _ = read_header(raw_file(tmp_path / "o.safetensors", header, bytes(range(5))))
    assert list(infos) == ["z", "m", "a"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    specs=st.lists(
        st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 8), max_size=3)),
        min_size=1,
        max_size=8,
    )
)
def test_property_round_trip(tmp_path: Path, specs: list[tuple[torch.dtype, list[int]]]) -> None:
    tensors = {f"t{i}": sample(dtype, tuple(shape), seed=i) for i, (dtype, shape) in enumerate(specs)}
    path = tmp_path / "p.safetensors"
    write_file(path, tensors)
    loaded = load_file(path)
    infos, _ = read_header(path)
    with MappedFile(path) as mapped:
        for name, tensor in tensors.items():
            assert same(loaded[name], tensor)
            assert same(mapped.view(infos[name]), tensor)
            info = infos[name]
            assert info.offset % info.dtype.itemsize == 0
            if info.nbytes % 64 == 0:  # whole cache lines: starts on one
                assert info.offset % 64 == 0, (name, info.offset, info.nbytes)


# ---------------------------------------------------------------- zero copy


def test_view_is_zero_copy_inside_the_file_mapping(tmp_path: Path) -> None:
    path = tmp_path / "z.safetensors"
    save_file({"w": torch.arange(4096, dtype=torch.float32), "b": torch.ones(7, dtype=torch.bfloat16)}, path)
    infos, _ = read_header(path)
    with MappedFile(path) as mapped:
        for info in infos.values():
            view = mapped.view(info)
            address = mapped.address(info)
            assert view.data_ptr() == address
            assert mapped.base_address <= address < mapped.base_address + mapped.size
            # The kernel says this address belongs to a mapping of the file itself (not anonymous memory).
            assert any(start <= address < end for start, end in mapped_ranges(path)), "view is not file-backed"
        # Two views of one tensor share memory: a write through one shows in the other ...
        first, second = mapped.view(infos["w"]), mapped.view(infos["w"])
        first[0] = 42.0
        assert second[0].item() == 42.0
    # ... but never reaches the file (ACCESS_COPY is a private mapping).
    assert load_file(path)["w"][0].item() == 0.0


@pytest.mark.skipif(not huge_pages_enabled(), reason="transparent huge pages are not available on this system")
def test_mapping_asks_for_huge_folios(tmp_path: Path) -> None:
    # Pages streamed through the mapping are cheapest to map and unmap as 2 MiB folios; the
    # mapping carries the hint (VmFlags "hg") so that reads it causes bring them in that size.
    path = tmp_path / "h.safetensors"
    write_file(path, {"w": torch.arange(3 << 20, dtype=torch.float32)})  # 12 MiB
    info = read_header(path)[0]["w"]
    with MappedFile(path) as mapped:
        assert "hg" in mapping_flags(path)
        view = mapped.view(info)
        assert torch.equal(view[:5], torch.arange(5, dtype=torch.float32))  # still the same bytes
        assert resident_kib(path) > 0


def test_views_keep_the_mapping_alive_after_close(tmp_path: Path) -> None:
    path = tmp_path / "k.safetensors"
    write_file(path, {"w": torch.arange(1000, dtype=torch.int64)})
    info = read_header(path)[0]["w"]
    mapped = MappedFile(path)
    view = mapped.view(info)[10:20]
    mapped.close()
    assert mapped.closed
    gc.collect()
    assert view.tolist() == list(range(10, 20))
    with pytest.raises(ValueError, match="closed"):
        mapped.view(info)
    mapped.close()  # idempotent


def test_close_without_views_unmaps(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    write_file(path, {"w": torch.ones(3)})
    mapped = MappedFile(path)
    assert mapped_ranges(path)
    copy = mapped.read(read_header(path)[0]["w"])  # an owned copy does not pin the mapping
    mapped.close()
    assert copy.tolist() == [1.0, 1.0, 1.0]
    gc.collect()
    assert not mapped_ranges(path)


def test_misaligned_tensor_is_copied_correctly(tmp_path: Path) -> None:
    values = torch.tensor([1.5, -2.25, 3.0], dtype=torch.float32)
    header = {
        "byte": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "f": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]},
    }
    path = raw_file(tmp_path / "mis.safetensors", header, b"\x07" + values.numpy().tobytes())
    infos, _ = read_header(path)
    assert infos["f"].offset % 4 == 1
    with MappedFile(path) as mapped:
        copy = mapped.view(infos["f"])
        assert torch.equal(copy, values)
        assert torch.equal(copy, load_file(path)["f"])
        assert not mapped.base_address <= copy.data_ptr() < mapped.base_address + mapped.size
        assert copy.data_ptr() % 4 == 0


def test_zero_element_and_zero_dim(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    write_file(path, {"empty": torch.zeros(0, 5), "scalar": torch.tensor(2.5, dtype=torch.bfloat16)})
    infos, _ = read_header(path)
    with MappedFile(path) as mapped:
        empty, scalar = mapped.view(infos["empty"]), mapped.view(infos["scalar"])
    assert empty.shape == (0, 5) and empty.dtype == torch.float32
    assert scalar.shape == () and scalar.item() == 2.5


def test_view_rejects_info_outside_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    write_file(path, {"w": torch.ones(2)})
    bogus = TensorInfo("w", torch.float32, (1000,), path, 8, 4000)
    with MappedFile(path) as mapped, pytest.raises(ValueError, match="outside"):
        mapped.view(bogus)


# ---------------------------------------------------------------- header validation


def _good_header() -> dict[str, object]:
    return {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize(
    ("header", "data", "needle"),
    [
        (b"{not json", bytes(8), "not valid JSON"),
        ([1, 2], bytes(8), "JSON list, not an object"),
        ({"a": {"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "unknown dtype 'F31'"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(12), "needs 12"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "[-2]"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, bytes(8), "negative or reversed"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), "negative or reversed"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, bytes(8), "not a pair of integers"),
        ({"a": [1]}, bytes(8), "not an object"),
        ({"__metadata__": {"k": 1}, **_good_header()}, bytes(8), "__metadata__"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
            "'a' and 'b' overlap",
        ),
    ],
    ids=["json", "list", "dtype", "nbytes", "negdim", "negoffset", "reversed", "pair", "entry", "meta", "overlap"],
)
def test_bad_headers(tmp_path: Path, header: object, data: bytes, needle: str) -> None:
    path = raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError) as err:
        read_header(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_file_shorter_than_8_bytes(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(CheckpointError, match="holds 3 bytes"):
        read_header(path)


def test_header_length_beyond_the_file(tmp_path: Path) -> None:
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(CheckpointError, match="header length 1000") as err:
        read_header(path)
    assert str(path) in str(err.value)


def test_header_length_absurd(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds"):
        read_header(path)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(100), "b": torch.ones(100)}, path)
    full = path.read_bytes()
    path.write_bytes(full[:-10])
    with pytest.raises(CheckpointError) as err:
        read_header(path)
    message = str(err.value)
    assert f"header promises {len(full)} bytes but the file holds {len(full) - 10}" in message
    assert str(path) in message


def test_header_lying_about_offsets(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    path = raw_file(tmp_path / "lie.safetensors", header, bytes(4))
    with pytest.raises(CheckpointError, match="ends at data byte 8"):
        read_header(path)


def test_gaps_are_tolerated(tmp_path: Path) -> None:
    header = {"a": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}
    infos, _ = read_header(raw_file(tmp_path / "gap.safetensors", header, bytes([0, 0, 0, 0, 9, 8])))
    with MappedFile(infos["a"].path) as mapped:
        assert mapped.view(infos["a"]).tolist() == [9, 8]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        read_header(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        MappedFile(tmp_path / "nope.safetensors")


def test_a_header_of_200000_entries_parses_whole(tmp_path: Path) -> None:
    # (Its speed, about 0.5 s on the 2-core development VM, is a benchmark's business, not a test's.)
    count = 200_000
    header = {
        f"model.layers.{i}.weight": {"dtype": "F16", "shape": [2], "data_offsets": [4 * i, 4 * i + 4]}
        for i in range(count)
    }
    path = raw_file(tmp_path / "big.safetensors", header, bytes(4 * count))
    infos, _ = read_header(path)
    assert len(infos) == count
    last = infos[f"model.layers.{count - 1}.weight"]
    assert (last.shape, last.dtype) == ((2,), torch.float16)


# ---------------------------------------------------------------- writer


def test_streaming_writer(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    a, b = torch.randn(3, 4).to(torch.bfloat16), torch.tensor([True, False])
    with SafetensorsWriter(path, [("a", a.dtype, (3, 4)), ("b", torch.bool, (2,))], {"k": "v"}) as writer:
        writer.write("a", a.t().contiguous().t())  # non-contiguous input is fine
        writer.write("b", b)
    loaded = load_file(path)
    assert same(loaded["a"], a) and same(loaded["b"], b)


def test_writer_checks_order_dtype_and_shape(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    writer = SafetensorsWriter(path, [("a", torch.float32, (2,)), ("b", torch.int64, ())])
    with pytest.raises(ValueError, match="expected entry 'a'"):
        writer.write("b", torch.tensor(1))
    with pytest.raises(ValueError, match="declared torch.float32"):
        writer.write("a", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"\[3\]"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="1 entries unwritten"):
        writer.close()
    assert not path.exists()


def test_writer_rejects_extra_writes_and_bad_entries(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    with SafetensorsWriter(path, [("a", torch.float32, (1,))]) as writer:
        writer.write("a", torch.zeros(1))
        with pytest.raises(ValueError, match="extra 'a2'"):
            writer.write("a2", torch.zeros(1))
    with pytest.raises(ValueError, match="more than once"):
        SafetensorsWriter(tmp_path / "d.safetensors", [("a", torch.float32, (1,)), ("a", torch.float32, (1,))])
    with pytest.raises(ValueError, match="cannot be stored"):
        dtype_name(torch.complex128)


def test_exception_in_with_block_removes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "e.safetensors"
    with pytest.raises(RuntimeError), SafetensorsWriter(path, [("a", torch.float32, (1,))]):
        raise RuntimeError("boom")
    assert not path.exists()


def test_write_file_aligns_every_tensor(tmp_path: Path) -> None:
    tensors = {
        "i8": torch.ones(3, dtype=torch.int8),
        "f16": torch.ones(3, dtype=torch.float16),
        "f32": torch.ones(3),
        "f64": torch.ones(3, dtype=torch.float64),
        "bool": torch.ones(1, dtype=torch.bool),
    }
    path = tmp_path / "al.safetensors"
    write_file(path, tensors)
    infos, _ = read_header(path)
    assert list(infos) == ["f64", "f32", "f16", "bool", "i8"]
    assert all(info.offset % info.dtype.itemsize == 0 for info in infos.values())


@pytest.mark.parametrize("fail_at", [1, 2])
def test_enospc_gives_offload_error_and_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int) -> None:
    """fail_at=1 fails on the header, 2 on the first tensor's data."""
    real = safetensors_writer._write_all
    calls = []

    def flaky(fd: int, data: object) -> None:
        calls.append(1)
        if len(calls) == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(safetensors_writer, "_write_all", flaky)
    path = tmp_path / "full.safetensors"
    with pytest.raises(OffloadError) as err:
        write_file(path, {"a": torch.ones(10), "b": torch.ones(10)})
    assert str(path) in str(err.value)
    assert "No space left on device" in str(err.value)
    assert not path.exists()


def test_unwritable_destination(tmp_path: Path) -> None:
    with pytest.raises(OffloadError, match="No such file or directory"):
        write_file(tmp_path / "missing-dir" / "a.safetensors", {"a": torch.ones(1)})


def test_large_tensor_bytes_are_exact(tmp_path: Path) -> None:
    tensor = torch.randn(256, 1024)
    path = tmp_path / "big.safetensors"
    write_file(path, {"t": tensor})
    assert torch.equal(load_file(path)["t"], tensor)
    info = read_header(path)[0]["t"]
    assert info.nbytes == math.prod(tensor.shape) * 4
