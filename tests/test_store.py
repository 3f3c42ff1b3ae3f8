"""Tests of bigjob.engine.tiers.store: offload folders are built atomically, keyed by a fingerprint,
never trusted without a matching marker, cleaned after crashes and safe for concurrent builders.

Every load here converts the tiny model to bf16 on the disk tier, so its weights are served from
an offload folder; outputs are compared with the in-RAM reference converted the same way.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from _enginekit import empty_model, inputs, untied_state
from tiny_transformer import make_reference

from bigjob import get_dispatch_info, load_checkpoint_and_dispatch
from bigjob.engine.checkpoints import safetensors_writer
from bigjob.engine.tiers import store
from bigjob.engine.checkpoints.opening import open_checkpoint
from bigjob.engine.checkpoints.safetensors_header import read_header
from bigjob.engine.checkpoints.safetensors_writer import write_file
from bigjob.engine.tiers.store import MARKER, OffloadEntry, offload_fingerprint, prepare_offload_folder
from bigjob.errors import OffloadError

REPO = Path(__file__).resolve().parent.parent
BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    write_file(path, untied_state(make_reference()))
    return path


@pytest.fixture(scope="module")
def expected() -> torch.Tensor:
    with torch.no_grad():
        return make_reference().to(BF16)(inputs())


def load(checkpoint: Path, offload: Path) -> torch.nn.Module:
    return load_checkpoint_and_dispatch(
        empty_model(), checkpoint, device_map="disk", dtype=BF16, offload_folder=offload, no_split_module_classes=["Block"]
    )


def check(model: torch.nn.Module, expected: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(model(inputs()), expected)


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def built_folder(checkpoint: Path, offload: Path) -> Path:
    """Build the folder once and return where it lives."""
    model = load(checkpoint, offload)
    info = get_dispatch_info(model)
    assert info.offload_reused is False
    return Path(info.offload_folder)


# --------------------------------------------------------------------------- what is trusted


def test_offloaded_weights_are_views_that_start_on_cache_lines(checkpoint: Path, tmp_path: Path, expected: torch.Tensor) -> None:
    model = load(checkpoint, tmp_path / "off")
    folder = Path(get_dispatch_info(model).offload_folder)
    files = sorted(folder.glob("*.safetensors"))
    mappings = {}
    for path in files:
        infos, _ = read_header(path)
        mappings.update(infos)
    whole = 0
    for name, param in model.named_parameters():
        info = mappings[name]
        assert param.data_ptr() % 4096 == info.offset % 4096  # a zero-copy view of the folder's file
        if info.nbytes % 64 == 0:
            assert param.data_ptr() % 64 == 0, name
            whole += 1
    assert whole >= len(list(model.parameters())) // 2  # most weights are whole cache lines
    check(model, expected)


def test_marker_records_fingerprint_and_sizes(checkpoint: Path, tmp_path: Path) -> None:
    folder = built_folder(checkpoint, tmp_path / "off")
    marker = json.loads((folder / MARKER).read_text())
    assert folder.name == f"offload-{marker['fingerprint'][:24]}"
    assert marker["files"] == {name: (folder / name).stat().st_size for name in marker["files"]}
    assert set(marker["files"]) == {p.name for p in folder.iterdir()} - {MARKER}
    assert entries(tmp_path / "off") == [folder.name]  # no temporary left behind


def _load_map(checkpoint: Path, offload: Path, on_cpu: int, dtype: torch.dtype = BF16) -> torch.nn.Module:
    """The first ``on_cpu`` blocks in RAM, every other module on disk (converted to ``dtype``)."""
    model = empty_model()
    device_map = {name: "disk" for name, _ in model.named_children()}
    device_map.pop("blocks")
    device_map.update({name: "cpu" for name, _ in [*model.named_parameters(recurse=False), *model.named_buffers(recurse=False)]})
    device_map.update({f"blocks.{i}": "cpu" if i < on_cpu else "disk" for i in range(len(model.blocks))})
    return load_checkpoint_and_dispatch(model, checkpoint, device_map=device_map, dtype=dtype, offload_folder=offload)


def test_a_plan_with_fewer_tensors_on_disk_uses_the_folder_that_holds_them(checkpoint: Path, tmp_path: Path, expected: torch.Tensor) -> None:
    offload = tmp_path / "off"
    everything = get_dispatch_info(_load_map(checkpoint, offload, 0))
    marker = json.loads((Path(everything.offload_folder) / MARKER).read_text())
    assert marker["source"] == json.loads(json.dumps(open_checkpoint(checkpoint).identity()))
    # Every tensor but the root's own (kept in RAM by the map), each converted to bf16.
    assert {e[0] for e in marker["entries"]} == {n for n in untied_state(make_reference()) if "." in n}
    assert {e[2] for e in marker["entries"]} == {"BF16"}
    # A larger budget: two blocks in RAM, the rest on disk. That subset is in the folder already.
    model = _load_map(checkpoint, offload, 2)
    info = get_dispatch_info(model)
    assert info.offload_reused is True and info.offload_folder == everything.offload_folder
    assert entries(offload) == [Path(everything.offload_folder).name]  # nothing new written
    assert 0 < info.bytes_per_tier["disk"] < everything.bytes_per_tier["disk"]
    check(model, expected)
    # The other way round is a new folder: the smaller plan's folder lacks the blocks now on disk.
    smaller = tmp_path / "off-small"
    first = get_dispatch_info(_load_map(checkpoint, smaller, 2))
    second = get_dispatch_info(_load_map(checkpoint, smaller, 0))
    assert second.offload_reused is False and second.offload_folder != first.offload_folder
    assert len(entries(smaller)) == 2
    # Another dtype is another conversion: never served from the bf16 folder.
    fp16 = get_dispatch_info(_load_map(checkpoint, offload, 2, torch.float16))
    assert fp16.offload_reused is False and len(entries(offload)) == 2


def test_a_superset_folder_that_is_damaged_or_of_another_checkpoint_is_not_used(checkpoint: Path, tmp_path: Path, expected: torch.Tensor) -> None:
    offload = tmp_path / "off"
    full = Path(get_dispatch_info(_load_map(checkpoint, offload, 0)).offload_folder)
    shard = next(full.glob("*.safetensors"))
    with open(shard, "r+b") as handle:  # one file shorter than its marker says: incomplete
        handle.truncate(shard.stat().st_size - 1)
    info = get_dispatch_info(_load_map(checkpoint, offload, 2))
    assert info.offload_reused is False and Path(info.offload_folder) != full
    check(_load_map(checkpoint, offload, 2), expected)
    # A copy of the checkpoint elsewhere is another source (its identity names its folder).
    other = tmp_path / "copy" / "model.safetensors"
    other.parent.mkdir()
    other.write_bytes(checkpoint.read_bytes())
    before = entries(offload)
    info = get_dispatch_info(_load_map(other, offload, 3))
    assert info.offload_reused is False and len(entries(offload)) == len(before) + 1


def test_foreign_accelerate_style_folder_is_rebuilt_not_used(checkpoint: Path, tmp_path: Path, expected: torch.Tensor) -> None:
    offload = tmp_path / "off"
    folder = built_folder(checkpoint, offload)
    # Replace it with what the incumbent would happily reuse: an index.json and raw .dat files,
    # holding another model's weights in the right dtype and shapes.
    for path in folder.iterdir():
        path.unlink()
    other = make_reference(seed=7).to(BF16)
    index = {}
    for name, tensor in other.state_dict().items():
        if tensor.is_floating_point():
            (folder / f"{name}.dat").write_bytes(tensor.view(torch.int16).numpy().tobytes())
            index[name] = {"dtype": "bfloat16", "shape": list(tensor.shape)}
    (folder / "index.json").write_text(json.dumps(index))

    model = load(checkpoint, offload)
    info = get_dispatch_info(model)
    assert info.offload_reused is False and Path(info.offload_folder) == folder
    check(model, expected)
    assert not list(folder.glob("*.dat")) and not (folder / "index.json").exists()
    assert (folder / MARKER).exists()


def _drop_marker(folder: Path) -> None:
    (folder / MARKER).unlink()


def _other_fingerprint(folder: Path) -> None:
    marker = json.loads((folder / MARKER).read_text())
    marker["fingerprint"] = "0" * 64
    (folder / MARKER).write_text(json.dumps(marker))


def _garbage_marker(folder: Path) -> None:
    (folder / MARKER).write_text("{not json")


def _truncate_shard(folder: Path) -> None:
    shard = next(folder.glob("*.safetensors"))
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 64)


def _grow_shard(folder: Path) -> None:
    shard = next(folder.glob("*.safetensors"))
    with open(shard, "ab") as handle:
        handle.write(b"\0" * 8)


def _delete_shard(folder: Path) -> None:
    next(folder.glob("*.safetensors")).unlink()


def _empty(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()


def _a_file(folder: Path) -> None:
    _empty(folder)
    folder.rmdir()
    folder.write_text("not a folder")


def _dangling_link(folder: Path) -> None:
    _a_file(folder)
    folder.unlink()
    folder.symlink_to(folder.parent / "nowhere")


@pytest.mark.parametrize(
    "damage",
    [_drop_marker, _other_fingerprint, _garbage_marker, _truncate_shard, _grow_shard, _delete_shard, _empty, _a_file, _dangling_link],
    ids=lambda f: f.__name__.strip("_"),
)
def test_damaged_folder_is_rebuilt(checkpoint: Path, tmp_path: Path, expected: torch.Tensor, damage) -> None:  # type: ignore[no-untyped-def]
    offload = tmp_path / "off"
    folder = built_folder(checkpoint, offload)
    damage(folder)
    model = load(checkpoint, offload)
    info = get_dispatch_info(model)
    assert info.offload_reused is False
    check(model, expected)
    assert folder.is_dir() and not folder.is_symlink()
    assert entries(offload) == [folder.name]
    # And the rebuilt folder is trusted next time.
    assert get_dispatch_info(load(checkpoint, offload)).offload_reused is True


def test_other_dtype_or_changed_checkpoint_gets_its_own_folder(checkpoint: Path, tmp_path: Path) -> None:
    offload = tmp_path / "off"
    (offload).mkdir()
    (offload / "notes.txt").write_text("mine")  # the user's file: never touched
    bf16 = built_folder(checkpoint, offload)
    fp16 = load_checkpoint_and_dispatch(empty_model(), checkpoint, device_map="disk", dtype=torch.float16, offload_folder=offload)
    fp16_folder = Path(get_dispatch_info(fp16).offload_folder)
    assert fp16_folder != bf16
    # A changed checkpoint (same names and shapes, other values and mtime) never reuses the old folder.
    changed = tmp_path / "changed.safetensors"
    write_file(changed, untied_state(make_reference(seed=3)))
    model = load(changed, offload)
    info = get_dispatch_info(model)
    assert info.offload_reused is False and Path(info.offload_folder) not in (bf16, fp16_folder)
    with torch.no_grad():
        assert torch.equal(model(inputs()), make_reference(seed=3).to(BF16)(inputs()))
    assert (offload / "notes.txt").read_text() == "mine"
    assert len(list(offload.glob("offload-*"))) == 3


def test_fingerprint_covers_source_names_dtypes_and_shapes() -> None:
    base = [OffloadEntry("a", "a", BF16, (2, 3)), OffloadEntry("b", "x.b", BF16, (4,))]
    key = offload_fingerprint({"files": [1]}, base)
    assert key == offload_fingerprint({"files": [1]}, list(reversed(base)))  # order-free
    variants = [
        ({"files": [2]}, base),
        ({"files": [1]}, [base[0]]),
        ({"files": [1]}, [OffloadEntry("a", "a", torch.float16, (2, 3)), base[1]]),
        ({"files": [1]}, [OffloadEntry("a", "a", BF16, (3, 2)), base[1]]),
        ({"files": [1]}, [OffloadEntry("a", "other", BF16, (2, 3)), base[1]]),
        ({"files": [1]}, [OffloadEntry("z", "a", BF16, (2, 3)), base[1]]),
    ]
    keys = {offload_fingerprint(source, ents) for source, ents in variants}
    assert key not in keys and len(keys) == len(variants)


# --------------------------------------------------------------------------- crashes and failures


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_half_written_temp_of_a_dead_builder_is_cleaned(checkpoint: Path, tmp_path: Path, expected: torch.Tensor) -> None:
    offload = tmp_path / "off"
    offload.mkdir()
    dead = offload / f".tmp-offload-0123456789ab-{_dead_pid()}-deadbeef"
    dead.mkdir()
    (dead / "offload-00001-of-00001.safetensors").write_bytes(b"\0" * 1000)  # half written, no marker
    alive = offload / f".tmp-offload-0123456789ab-{os.getppid()}-0badf00d"  # a builder still running
    alive.mkdir()
    model = load(checkpoint, offload)
    check(model, expected)
    assert not dead.exists()
    assert alive.exists()
    assert len(list(offload.glob("offload-*"))) == 1


def test_dead_builder_temp_is_cleaned_even_when_the_folder_is_reused(checkpoint: Path, tmp_path: Path) -> None:
    offload = tmp_path / "off"
    built_folder(checkpoint, offload)
    dead = offload / f".tmp-offload-0123456789ab-{_dead_pid()}-deadbeef"
    dead.mkdir()
    assert get_dispatch_info(load(checkpoint, offload)).offload_reused is True
    assert not dead.exists()


def _enospc_after(calls: int):  # type: ignore[no-untyped-def]
    real = safetensors_writer._write_all
    count = {"n": 0}

    def write_all(fd: int, data) -> None:  # type: ignore[no-untyped-def]
        count["n"] += 1
        if count["n"] > calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    return write_all


@pytest.mark.parametrize("calls", [0, 1, 5])
def test_disk_full_while_writing_leaves_nothing_a_later_run_would_trust(
    checkpoint: Path, tmp_path: Path, expected: torch.Tensor, monkeypatch: pytest.MonkeyPatch, calls: int
) -> None:
    offload = tmp_path / "off"
    monkeypatch.setattr(safetensors_writer, "_write_all", _enospc_after(calls))
    model = empty_model()
    with pytest.raises(OffloadError) as err:
        load_checkpoint_and_dispatch(model, checkpoint, device_map="disk", dtype=BF16, offload_folder=offload)
    message = str(err.value)
    assert str(offload) in message and "offload_folder" in message and "No space left on device" in message
    assert entries(offload) == []  # neither a folder nor a temporary
    assert get_dispatch_info(model) is None
    monkeypatch.undo()
    model = load(checkpoint, offload)
    assert get_dispatch_info(model).offload_reused is False
    check(model, expected)


def test_disk_full_while_writing_the_marker(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = store._write_json

    def write_json(path: Path, data: dict) -> None:
        if path.name == MARKER:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(store, "_write_json", write_json)
    with pytest.raises(OffloadError, match="offload_folder"):
        load(checkpoint, tmp_path / "off")
    assert entries(tmp_path / "off") == []


def test_interrupted_build_removes_its_temp(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = store._build
    seen: list[Path] = []

    def interrupted(folder: Path, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        real(folder, *args, **kwargs)
        seen.append(folder)
        assert (folder / MARKER).exists() and not list((tmp_path / "off").glob("offload-*"))  # built aside
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "_build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load(checkpoint, tmp_path / "off")
    assert seen and seen[0].name.startswith(".tmp-offload-")
    assert entries(tmp_path / "off") == []


def test_unwritable_offload_folder_is_an_offload_error(checkpoint: Path, tmp_path: Path) -> None:
    # A path under a regular file cannot be created, even by root (chmod would not stop root).
    (tmp_path / "afile").write_text("x")
    for target in (tmp_path / "afile" / "sub", tmp_path / "afile"):
        with pytest.raises(OffloadError) as err:
            load(checkpoint, target)
        assert str(target) in str(err.value) and "offload_folder" in str(err.value)
    assert (tmp_path / "afile").read_text() == "x"


# --------------------------------------------------------------------------- concurrent builders


def test_two_threads_building_at_once(checkpoint: Path, tmp_path: Path, expected: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    real = store._build
    barrier = threading.Barrier(2, timeout=30)

    def together(*args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        barrier.wait()  # both are building before either finishes
        real(*args, **kwargs)

    monkeypatch.setattr(store, "_build", together)
    offload = tmp_path / "off"
    models: list[torch.nn.Module] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            models.append(load(checkpoint, offload))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert sorted(get_dispatch_info(m).offload_reused for m in models) == [False, True]
    assert len({get_dispatch_info(m).offload_folder for m in models}) == 1
    for model in models:
        check(model, expected)
    assert len(entries(offload)) == 1 and entries(offload)[0].startswith("offload-")


_WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import torch
    from _enginekit import empty_model, inputs
    from bigjob import get_dispatch_info, load_checkpoint_and_dispatch
    from bigjob.engine.tiers import store

    checkpoint, offload, gate, expected = sys.argv[1:5]
    real = store._build

    def together(*args, **kwargs):
        # A file barrier: both processes are building before either renames its folder into place.
        Path(gate, str(__import__("os").getpid())).touch()
        deadline = time.time() + 60
        while len(list(Path(gate).iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.01)
        real(*args, **kwargs)

    store._build = together
    model = load_checkpoint_and_dispatch(
        empty_model(), checkpoint, device_map="disk", dtype=torch.bfloat16, offload_folder=offload,
        no_split_module_classes=["Block"],
    )
    with torch.no_grad():
        same = torch.equal(model(inputs()), torch.load(expected))
    info = get_dispatch_info(model)
    print(json.dumps({"same": same, "reused": info.offload_reused, "folder": info.offload_folder}))
    """
)


def test_two_processes_building_at_once(checkpoint: Path, tmp_path: Path, expected: torch.Tensor) -> None:
    offload, gate = tmp_path / "off", tmp_path / "gate"
    gate.mkdir()
    torch.save(expected, tmp_path / "expected.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    command = [sys.executable, "-c", _WORKER, str(checkpoint), str(offload), str(gate), str(tmp_path / "expected.pt")]
    workers = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["same"] for r in results)
    assert sorted(r["reused"] for r in results) == [False, True]
    assert len({r["folder"] for r in results}) == 1
    assert len(entries(offload)) == 1
    # What is left is complete: a third, unhindered load trusts it.
    assert get_dispatch_info(load(checkpoint, offload)).offload_reused is True


# --------------------------------------------------------------------------- the folder API itself


def test_prepare_offload_folder_streams_converted_tensors(tmp_path: Path) -> None:
    source_path = tmp_path / "src.safetensors"
    tensors = {"w": torch.randn(64, 32), "b": torch.randn(7), "i": torch.arange(5)}
    write_file(source_path, tensors)
    source = open_checkpoint(source_path)
    wanted = [
        OffloadEntry("layer.w", "w", torch.float16, (64, 32)),
        OffloadEntry("layer.b", "b", BF16, (7,)),
        OffloadEntry("layer.i", "i", torch.int64, (5,)),
    ]
    folder = prepare_offload_folder(tmp_path / "off", source, wanted, shard_bytes=1000)
    assert folder.reused is False
    assert len(list(folder.path.glob("*.safetensors"))) >= 2  # sharded by shard_bytes
    view = folder.checkpoint
    assert torch.equal(view.load("layer.w"), tensors["w"].half())
    assert torch.equal(view.load("layer.b"), tensors["b"].to(BF16))
    assert torch.equal(view.load("layer.i"), tensors["i"])
    again = prepare_offload_folder(tmp_path / "off", open_checkpoint(source_path), list(reversed(wanted)), shard_bytes=1000)
    assert again.reused is True and again.path == folder.path
