"""Tests of the accelerator paths of bigjob.engine.dispatch/hooks: StreamedUnit with packed pinned
homes and pinned staging buffers, CPU and disk tiers executed on cuda:0, model parallel over GPUs.

The GPU tests skip on machines without CUDA. References are the tiny model held in RAM by
PyTorch alone and moved to the same GPU; GPU kernels may differ in the last bits between
layouts, so those comparisons use a tight tolerance. One CPU test checks the packing itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _enginekit import empty_model, inputs, inside_mapping, untied_state, write_sharded_safetensors
from tiny_transformer import make_reference
from torch import nn

from bigjob import cpu_offload, disk_offload, get_dispatch_info, load_checkpoint_and_dispatch, remove_dispatch
from bigjob.engine.hooks import HookHandle, MoveInputs, Prefetcher, Schedule, StagingPool, StreamedUnit, TensorSlot
from bigjob.errors import DeviceError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
needs_two = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"
)

GPU_MIXED = {
    "embed": "cuda:0",
    "pos": "cuda:0",
    "blocks.0": "cuda:0",
    "blocks.1": "cpu",
    "blocks.2": "disk",
    "blocks.3": "cpu",
    "norm": "disk",
    "head": "cuda:0",  # tied to embed: same device
    "positions": "cuda:0",
    "mask": "cuda:0",
}
# Everything on disk but the tied embedding/head, so cuda:0 is the execution device
# (a map naming no GPU at all, like "disk", executes on the CPU).
GPU_DISK = {"": "disk", "embed": "cuda:0", "head": "cuda:0"}


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.device == expected.device and actual.dtype == expected.dtype
    tol = 1e-5 if expected.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sharded_safetensors(tmp_path_factory.mktemp("sharded"), untied_state(make_reference()))


def gpu_reference(dtype: torch.dtype = torch.float32) -> nn.Module:
    return make_reference().to(device="cuda:0", dtype=dtype)


def run(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    if out.is_cuda:
        torch.cuda.synchronize()
    return out


def streamed_units(model: nn.Module) -> list[StreamedUnit]:
    return [h.hook for h in get_dispatch_info(model).handles if isinstance(h.hook, StreamedUnit)]


# --------------------------------------------------------------------------- single GPU


@pytest.mark.cuda
@needs_cuda
def test_cuda_execution_with_cpu_and_disk_tiers(sharded: Path) -> None:
    model = load_checkpoint_and_dispatch(empty_model(), sharded, device_map=GPU_MIXED, no_split_module_classes=["Block"])
    info = get_dispatch_info(model)
    assert info.main_device == "cuda:0"
    assert info.streamed_units == 4 and info.paged_units == 0  # blocks.1-3 and norm
    ids = inputs()
    expected = run(gpu_reference(), ids.cuda())
    out = run(model, ids.cuda())
    close(out, expected)
    for _ in range(2):  # repeated forwards: same result, homes restored in between
        assert torch.equal(run(model, ids.cuda()), out)
    # Homes between forwards: CPU tier in (pinned) RAM, disk tier a view of the checkpoint files.
    assert model.blocks[1].up.weight.device.type == "cpu" and model.blocks[1].up.weight.is_pinned()
    assert model.blocks[3].qkv.bias.is_pinned()
    files = sorted(sharded.parent.glob("*.safetensors"))
    assert model.blocks[2].up.weight.device.type == "cpu" and inside_mapping(model.blocks[2].up.weight, files)
    assert inside_mapping(model.norm.weight, files)
    assert model.blocks[0].up.weight.is_cuda and model.embed.weight.is_cuda
    assert model.embed.weight is model.head.weight


@pytest.mark.cuda
@needs_cuda
def test_outputs_come_back_where_the_inputs_were(sharded: Path) -> None:
    model = load_checkpoint_and_dispatch(empty_model(), sharded, device_map=GPU_MIXED, no_split_module_classes=["Block"])
    ids = inputs()
    expected = run(gpu_reference(), ids.cuda())
    on_cpu = run(model, ids)  # read at once: the device-to-host copy must be complete
    assert on_cpu.device.type == "cpu"
    close(on_cpu, expected.cpu())
    on_gpu = run(model, ids.cuda())
    assert on_gpu.device == torch.device("cuda:0")
    assert torch.equal(on_gpu.cpu(), on_cpu)


@pytest.mark.cuda
@needs_cuda
def test_pinned_staging_buffers_are_allocated_once_and_reused(sharded: Path) -> None:
    model = load_checkpoint_and_dispatch(
        empty_model(), sharded, device_map=GPU_DISK, no_split_module_classes=["Block"], prefetch=2
    )
    assert get_dispatch_info(model).main_device == "cuda:0"
    units = streamed_units(model)
    assert len(units) == 5 and all(u.staging is not None for u in units)  # 4 blocks and norm
    pools = {id(u.staging): u.staging for u in units if u.staging is not None}
    assert len(pools) == 1  # one pool shared by every disk-tier unit
    pool = next(iter(pools.values()))
    assert len(pool.buffers) == 1 + 2 and all(b.is_pinned() for b in pool.buffers)
    before = [b.data_ptr() for b in pool.buffers]
    ids = inputs()
    expected = run(gpu_reference(), ids.cuda())
    for _ in range(3):
        close(run(model, ids.cuda()), expected)
    assert [b.data_ptr() for b in pool.buffers] == before
    assert sorted(pool.free) == [0, 1, 2]  # every buffer given back


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("device_map", ["disk", "mixed"])
def test_prefetch_depths_agree_on_gpu(sharded: Path, device_map: str) -> None:
    ids = inputs(batch=4, length=16)
    expected = run(gpu_reference(), ids.cuda())
    results = []
    for depth in (0, 1, 2):
        model = load_checkpoint_and_dispatch(
            empty_model(),
            sharded,
            device_map=GPU_MIXED if device_map == "mixed" else GPU_DISK,
            no_split_module_classes=["Block"],
            prefetch=depth,
        )
        results.append(run(model, ids.cuda()))
        remove_dispatch(model)
    for out in results:
        close(out, expected)
        assert torch.equal(out, results[0])  # same kernels on the same data: bit-identical


@pytest.mark.cuda
@needs_cuda
def test_bf16_conversion_on_gpu_with_offload_folder(sharded: Path, tmp_path: Path) -> None:
    model = load_checkpoint_and_dispatch(
        empty_model(),
        sharded,
        device_map=GPU_MIXED,
        no_split_module_classes=["Block"],
        dtype=torch.bfloat16,
        offload_folder=tmp_path / "offload",
    )
    assert get_dispatch_info(model).offload_reused is False
    ids = inputs()
    close(run(model, ids.cuda()), run(gpu_reference(torch.bfloat16), ids.cuda()))


@pytest.mark.cuda
@needs_cuda
def test_auto_plan_with_a_small_gpu_budget(sharded: Path, tmp_path: Path) -> None:
    block = (12 * 32 * 32 + 13 * 32) * 4
    # cuda:0 keeps room to stream 1 + prefetch blocks in, and holds the embedding and one block.
    model = load_checkpoint_and_dispatch(
        empty_model(),
        sharded,
        device_map="auto",
        max_memory={0: 3 * block + 20_000, "cpu": 10 * block},
        no_split_module_classes=["Block"],
        offload_folder=tmp_path / "offload",
    )
    devices = set(get_dispatch_info(model).device_map.values())
    assert {"cuda:0", "cpu"} <= devices, devices
    assert get_dispatch_info(model).streamed_units > 0
    ids = inputs()
    close(run(model, ids.cuda()), run(gpu_reference(), ids.cuda()))


@pytest.mark.cuda
@needs_cuda
def test_cpu_offload_to_gpu() -> None:
    ids = inputs()
    expected = run(gpu_reference(), ids.cuda())
    model = cpu_offload(make_reference(), "cuda:0")
    info = get_dispatch_info(model)
    assert info.main_device == "cuda:0" and info.streamed_units > 0
    assert all(p.is_pinned() for n, p in model.named_parameters() if n.startswith("blocks."))
    close(run(model, ids.cuda()), expected)
    close(run(model, ids), expected.cpu())


@pytest.mark.cuda
@needs_cuda
def test_disk_offload_to_gpu(tmp_path: Path) -> None:
    ids = inputs()
    expected = run(gpu_reference(), ids.cuda())
    model = disk_offload(make_reference(), tmp_path / "offload", "cuda:0")
    info = get_dispatch_info(model)
    shards = sorted(Path(info.offload_folder).glob("*.safetensors"))
    assert all(inside_mapping(p, shards) for n, p in model.named_parameters() if n.startswith("blocks."))
    for _ in range(2):
        close(run(model, ids.cuda()), expected)


@pytest.mark.cuda
@needs_cuda
def test_a_gpu_beyond_the_count_is_a_device_error(sharded: Path) -> None:
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(DeviceError, match=missing):
        load_checkpoint_and_dispatch(empty_model(), sharded, device_map={"": missing})


# --------------------------------------------------------------------------- several GPUs


@pytest.mark.cuda
@needs_two
def test_model_parallel_over_two_gpus(sharded: Path) -> None:
    # Units on cuda:1 between units on cuda:0: inputs must move both ways (head follows norm on cuda:1).
    device_map = {
        "embed": "cuda:0",
        "pos": "cuda:0",
        "positions": "cuda:0",
        "mask": "cuda:0",
        "blocks.0": "cuda:0",
        "blocks.1": "cuda:1",
        "blocks.2": "cuda:1",
        "blocks.3": "cpu",
        "norm": "cuda:1",
        "head": "cuda:0",
    }
    model = load_checkpoint_and_dispatch(empty_model(), sharded, device_map=device_map, no_split_module_classes=["Block"])
    assert model.blocks[1].up.weight.device == torch.device("cuda:1")
    movers = {h.module for h in get_dispatch_info(model).handles if isinstance(h.hook, MoveInputs)}
    assert model.head in movers and model.blocks[1] in movers
    ids = inputs()
    expected = run(gpu_reference(), ids.cuda())
    close(run(model, ids.cuda()), expected)
    close(run(model, ids), expected.cpu())


# --------------------------------------------------------------------------- packing, on any device


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 3)
        self.register_buffer("shift", torch.arange(3, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) + self.shift


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("depth", [0, 1])
def test_streamed_unit_packing_is_exact(staged: bool, depth: int) -> None:
    # A StreamedUnit "to" the CPU exercises the packing (offsets aligned to 256 bytes, one buffer,
    # views installed for the forward and homes restored after) without a GPU.
    torch.manual_seed(0)
    module = Pair().eval()
    x = torch.randn(4, 5)
    with torch.no_grad():
        expected = module(x)
    modules = dict(module.named_modules())
    names = ["a.weight", "a.bias", "b.weight", "b.bias", "shift"]
    slots = []
    for name in names:
        owner, _, local = name.rpartition(".")
        is_param = local in modules[owner]._parameters
        tensor = getattr(modules[owner], local)
        slots.append(TensorSlot(modules[owner], local, is_param, tensor.data if is_param else tensor))
    homes = [slot.home for slot in slots]
    schedule = Schedule(Prefetcher(depth))
    staging = StagingPool(4096, 1 + depth, pin=False) if staged else None
    unit = StreamedUnit("pair", slots, torch.device("cpu"), schedule, staging)
    unit.position = schedule.add(unit)
    assert all(slot.offset % 256 == 0 for slot in slots)
    assert unit.size >= sum(h.numel() * h.element_size() for h in homes)
    handle = HookHandle(module, unit)
    seen: list[int] = []
    probe = module.a.register_forward_pre_hook(lambda m, args: seen.append(m.weight.data_ptr()))
    try:
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(module(x), expected)
    finally:
        probe.remove()
        handle.remove()
        schedule.prefetcher.close()
    homes_now = [module.a.weight, module.a.bias, module.b.weight, module.b.bias, module.shift]
    assert len(seen) == 3
    if staged:  # the forward never runs on a staging buffer: it is handed to the next unit at once
        for buffer in staging.buffers:
            assert not any(buffer.data_ptr() <= ptr < buffer.data_ptr() + buffer.numel() for ptr in seen)
    if not staged:  # the homes were packed into one buffer
        assert unit.packed is not None
        base = unit.packed.data_ptr()
        assert all(base <= t.data_ptr() < base + unit.size for t in homes_now)
    for home, now in zip(homes, homes_now):
        assert torch.equal(home, now)
    with torch.no_grad():
        assert torch.equal(module(x), expected)
