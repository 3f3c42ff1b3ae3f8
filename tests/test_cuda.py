"""Tests of the accelerator paths of bigjob.engine.run.dispatch/hooks: StreamedUnit with packed pinned
homes and pinned staging buffers, CPU and disk tiers executed on cuda:0, model parallel over GPUs,
and the execution policies (offloaded units run on the CPU: ``local``, ``auto``).

The GPU tests skip on machines without CUDA. References are the tiny model held in RAM by
PyTorch alone and moved to the same GPU; GPU kernels may differ in the last bits between
layouts, so those comparisons use a tight tolerance (a looser one where units compute on the CPU).
One CPU test checks the packing itself.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch
from _enginekit import empty_model, inputs, inside_mapping, resident_kib, untied_state, write_sharded_safetensors
from tiny_transformer import make_reference
from torch import nn

from bigjob import cpu_offload, disk_offload, get_dispatch_info, load_checkpoint_and_dispatch, remove_dispatch
from bigjob.engine.run.hooks import HookHandle, MoveInputs, TensorSlot
from bigjob.engine.run.prefetcher import Prefetcher, Schedule
from bigjob.engine.run.stream_buffers import StagingPool
from bigjob.engine.run.streamed_units import StreamedUnit
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
def test_streamed_disk_pages_are_unmapped_after_the_copy(tmp_path: Path) -> None:
    # The disk tier is copied from the file mapping into the staging buffer; the pages it
    # mapped for that are given back, so RSS stays within the budget over many forwards.
    # The wide model (3.1 MB blocks) makes the pages a unit shares with its neighbours, which
    # stay mapped, a small part of the tier; its own checkpoint keeps other tests' mappings out.
    sharded = write_sharded_safetensors(tmp_path, untied_state(make_reference(**WIDE)))
    model = load_checkpoint_and_dispatch(empty_model(**WIDE), sharded, device_map=GPU_DISK, no_split_module_classes=["Block"])
    files = sorted(sharded.parent.glob("*.safetensors"))
    disk_kib = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not p.is_cuda) // 1024
    ids = inputs().cuda()
    expected = run(make_reference(**WIDE).to("cuda:0"), ids)
    for _ in range(3):
        close(run(model, ids), expected)
    torch.cuda.synchronize()
    get_dispatch_info(model).schedule.prefetcher.drain()  # nothing in flight
    assert disk_kib > 12_000
    assert sum(resident_kib(f) for f in files) < disk_kib // 10  # (before: all of it, ~disk_kib)


@pytest.mark.cuda
@needs_cuda
def test_cpu_tier_file_pages_are_released_once_packed(tmp_path: Path) -> None:
    # The CPU tier is read as views of the checkpoint, copied once into pinned homes, and its
    # file pages given back: held in both, it would count twice against the CPU budget.
    sharded = write_sharded_safetensors(tmp_path, untied_state(make_reference(**WIDE)))
    model = load_checkpoint_and_dispatch(
        empty_model(**WIDE), sharded, device_map={"": "cpu", "embed": "cuda:0", "head": "cuda:0"}, no_split_module_classes=["Block"]
    )
    files = sorted(sharded.parent.glob("*.safetensors"))
    cpu_kib = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not p.is_cuda) // 1024
    assert cpu_kib > 12_000 and model.blocks[0].up.weight.is_pinned()
    assert sum(resident_kib(f) for f in files) < cpu_kib // 10
    ids = inputs().cuda()
    close(run(model, ids), run(make_reference(**WIDE).to("cuda:0"), ids))
    assert sum(resident_kib(f) for f in files) < cpu_kib // 10  # forwards copy from the homes, not the files


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


# --------------------------------------------------------------------------- execution policies on one GPU

# A wider model for memory checks: its largest leaves (up, down: 1.05 MB each) far above the
# activations of a small batch and the allocator's rounding.
WIDE = {"width": 256, "heads": 4}
WIDE_LEAF = (256 * 1024 + 1024) * 4  # blocks.N.up: weight and bias
WIDE_BLOCKS = 4 * (12 * 256 * 256 + 13 * 256) * 4  # 12.7 MB kept on the CPU
# A block of the default model (width 32) under these rates runs locally up to 9 tokens:
# copy 50,816 B / 1e10 B/s = 5.08e-6 s; local 24,576 FLOP / 5e10 + 2 * 128 B / 1e10 = 5.17e-7 s per token.
RATES = {"h2d": "10GB/s", "cpu_flops": "50G", "device_flops": "1T"}


def near(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """CPU and GPU kernels sum in different orders: a looser tolerance than :func:`close`."""
    assert actual.device == expected.device and actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(
    "execution,counts",
    [("local", (4, 0, 0)), ("auto", (0, 4, 0)), ({"cpu": "local", "disk": "auto"}, (2, 2, 0)), ("stream", (0, 0, 4))],
    ids=["local", "auto", "per-tier", "stream"],
)
def test_execution_policies_match_the_reference(sharded: Path, execution: object, counts: tuple[int, int, int]) -> None:
    model = load_checkpoint_and_dispatch(
        empty_model(), sharded, device_map=GPU_MIXED, no_split_module_classes=["Block"], execution=execution, execution_rates=RATES
    )
    info = get_dispatch_info(model)
    assert info.main_device == "cuda:0"
    assert (info.local_units, info.auto_units, info.streamed_units) == counts  # blocks.1-3 and norm
    seen: list[tuple[str, str]] = []  # (weight device, input device) inside blocks.1 during a forward
    probe = model.blocks[1].up.register_forward_pre_hook(lambda m, args: seen.append((m.weight.device.type, args[0].device.type)))
    try:
        reference = gpu_reference()
        for ids, auto_mode in ((inputs(batch=2, length=1), "cpu"), (inputs(batch=3, length=12), "cuda")):
            expected = run(reference, ids.cuda())
            seen.clear()
            near(run(model, ids.cuda()), expected)
            near(run(model, ids), expected.cpu())
            mode = {"local": "cpu", "stream": "cuda", "auto": auto_mode}[execution if isinstance(execution, str) else "local"]
            assert seen == [(mode, mode)] * 2, seen
    finally:
        probe.remove()
    assert model.blocks[1].up.weight.device.type == "cpu"  # homes restored after streamed forwards


@pytest.mark.cuda
@needs_cuda
def test_local_execution_keeps_cpu_tier_weights_off_the_gpu() -> None:
    ids = inputs()
    reference = make_reference(**WIDE).to("cuda:0")
    expected = run(reference, ids.cuda())
    del reference
    torch.cuda.empty_cache()
    peaks: dict[str, int] = {}
    for execution in ("stream", "local"):
        model = cpu_offload(make_reference(**WIDE), "cuda:0", execution=execution)
        info = get_dispatch_info(model)
        # cpu_offload's units are leaves: 6 per block and the norm; the tied embed/head always stream.
        assert info.local_units == (4 * 6 + 1 if execution == "local" else 0)
        # From before the model's first forward (the reference's forward made cuBLAS's workspace), so
        # the device buffers streamed units are copied into, made at the first copy, count too.
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            near(run(model, ids.cuda()), expected)
        peaks[execution] = torch.cuda.max_memory_allocated() - base
        if execution == "local":
            assert not model.blocks[0].up.weight.is_pinned()  # no pinned copy made for units that never stream
        remove_dispatch(model)
        del model, info
        torch.cuda.empty_cache()
    assert peaks["stream"] >= WIDE_LEAF  # the check can fail: streaming brings the largest leaves in
    assert peaks["local"] < WIDE_LEAF < WIDE_BLOCKS, peaks  # not even one of them came to the GPU


@pytest.mark.cuda
@needs_cuda
def test_measured_rates_drive_auto(sharded: Path) -> None:
    from bigjob.engine.run.execution import measure_rates

    rates = measure_rates("cuda:0")
    assert rates.h2d_bytes_per_s > 0 and rates.cpu_flops > 0 and rates.device_flops > 0
    assert measure_rates(torch.device("cuda", 0)) is rates  # once per process
    model = load_checkpoint_and_dispatch(empty_model(), sharded, device_map=GPU_MIXED, no_split_module_classes=["Block"], execution="auto")
    info = get_dispatch_info(model)
    assert info.execution.rates == rates and info.auto_units == 4
    ids = inputs()
    near(run(model, ids.cuda()), run(gpu_reference(), ids.cuda()))


# --------------------------------------------------------------------------- GPU and pinned memory held


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_the_gpu_holds_at_most_one_plus_prefetch_streamed_copies(prefetch: int) -> None:
    # The planner keeps (1 + prefetch) x the largest streamed unit free on the GPU for streaming.
    # Kernels are queued ahead of the GPU, so a host that ran on unchecked would copy every
    # offloaded unit in before the first ones were computed: all 12.7 MB here, not 2-3 MB.
    ids = inputs()
    reference = make_reference(**WIDE).to("cuda:0")
    expected = run(reference, ids.cuda())
    del reference
    torch.cuda.empty_cache()
    model = cpu_offload(make_reference(**WIDE), "cuda:0", prefetch=prefetch)
    units = streamed_units(model)
    largest, streamed = max(u.size for u in units), sum(u.size for u in units)
    # From before the model's first forward (cuBLAS made its workspace for the reference's forward):
    # the device buffers units are copied into are counted too.
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        near(run(model, ids.cuda()), expected)
    extra = torch.cuda.max_memory_allocated() - base
    activations = 2 * 2**20  # this batch's activations and the allocator's rounding, with room to spare
    assert extra <= (1 + prefetch) * largest + activations < streamed, (extra, largest, streamed)


@pytest.mark.cuda
@needs_cuda
def test_pinned_homes_take_the_bytes_they_hold() -> None:
    # PyTorch's pinned allocator would round each 1.05 MB leaf up to 2 MB (and a 50 MB layer to
    # 64 MB): the CPU tier would take up to twice its budget. Homes are pinned at their own size.
    stats = torch.cuda.host_memory_stats
    before = stats().get("allocated_bytes.current", 0)
    model = cpu_offload(make_reference(**WIDE), "cuda:0")
    units = [u for u in streamed_units(model) if u.size]  # not the tied embedding and head: they stay on the GPU
    assert units and all(u.packed is not None and u.packed.is_pinned() for u in units)
    page = mmap.PAGESIZE
    for unit in units:
        assert unit.packed.untyped_storage().nbytes() == -(-unit.size // page) * page
    assert stats().get("allocated_bytes.current", 0) - before < WIDE_LEAF  # nothing from the rounding allocator
    ids = inputs()
    expected = run(make_reference(**WIDE).to("cuda:0"), ids.cuda())
    for _ in range(2):  # asynchronous copies out of the registered pages give the right weights
        near(run(model, ids.cuda()), expected)


def test_device_slots_hand_out_each_buffer_once_until_released() -> None:
    from bigjob.engine.run.stream_buffers import DeviceSlots

    slots = DeviceSlots(torch.device("cpu"), size=1000, count=2)
    a, buffer_a, wait_a = slots.acquire(600)
    b, buffer_b, _ = slots.acquire(1000)
    assert {a, b} == {0, 1} and wait_a is None and buffer_a.numel() == 600 and buffer_b.numel() == 1000
    assert buffer_a.data_ptr() != buffer_b.data_ptr()
    assert slots.acquire(10) == (None, None, None)  # all held: the caller makes a buffer of its own
    slots.release(a, "done-a")
    again, buffer, wait = slots.acquire(10)
    assert again == a and wait == "done-a" and buffer.data_ptr() == buffer_a.data_ptr()  # made once, reused
    assert slots.acquire(2000) == (None, None, None)  # larger than a buffer
    slots.reset()
    assert sorted(i for i, _, _ in (slots.acquire(1), slots.acquire(1))) == [0, 1]


class OutOfOrder(nn.Module):
    """Modules run in another order than the schedule's (a twice): prefetches made for one order go unused."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(torch.relu(self.b(self.a(x)))))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_modules_run_out_of_order_get_their_own_weights(prefetch: int) -> None:
    torch.manual_seed(0)
    module = OutOfOrder().eval()
    x = torch.randn(5, 64)
    reference = OutOfOrder().eval()
    reference.load_state_dict(module.state_dict())
    expected = run(reference.to("cuda:0"), x.cuda())
    model = cpu_offload(module, "cuda:0", prefetch=prefetch)
    for _ in range(3):  # the device buffers are reused across forwards
        near(run(model, x.cuda()), expected)
