"""Offload compression end to end: which weights it touches, what the planner counts, and the outputs it gives.

References are independent of bigjob's loader and kernels: the demo model built and held in RAM
by plain PyTorch, and the same model with each compressed weight replaced by its dequantized
value from the naive group-by-group reference (tests/_quantkit.py). A dispatched compressed model
must give the outputs of the latter (the same values, multiplied the same way), and stay within
a bound derived from the quantization error of the former.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from _quantkit import fake_quantized, naive
from torch import nn

from bigjob import get_dispatch_info, init_empty_weights, load_checkpoint_and_dispatch
from bigjob.engine.checkpoints.safetensors_writer import write_file
from bigjob.engine.plan.compression import GROUP_SIZE, compressed_nbytes, compressed_tensors, compressible_tensors, stream_unit_bytes
from bigjob.engine.plan.inventory import build_inventory
from bigjob.engine.plan.planner import plan
from bigjob.engine.plan.resolution import infer_auto_device_map
from bigjob.engine.run.entry_points import disk_offload, dispatch_model
from bigjob.errors import BudgetError, ConfigError
from bigjob.models.demo import DemoTransformer

CONFIG = dict(vocab_size=96, d_model=64, n_layers=4, n_heads=4, d_ff=128, max_seq_len=32)
DISK_BLOCKS = {"embed": "cpu", "rotary": "cpu", "blocks.0": "cpu", "blocks": "disk", "norm": "cpu", "lm_head": "cpu"}
BLOCK_LINEARS = ("qkv", "proj", "fc_in", "fc_out")


def reference() -> DemoTransformer:
    torch.manual_seed(0)
    return DemoTransformer(**CONFIG).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    write_file(path, {k: v for k, v in reference().state_dict().items() if k != "lm_head.weight"})  # the head is tied
    return path


def ids() -> torch.Tensor:
    return torch.randint(0, CONFIG["vocab_size"], (3, 12), generator=torch.Generator().manual_seed(1))


def load(checkpoint: Path, offload: Path, compression: str | None, **kwargs) -> nn.Module:
    with init_empty_weights():
        model = DemoTransformer(**CONFIG).eval()
    extra = {} if compression is None else {"offload_compression": compression}
    kwargs.setdefault("device_map", DISK_BLOCKS)
    return load_checkpoint_and_dispatch(model, checkpoint, offload_folder=offload, **kwargs, **extra)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(ids())["logits"]


def disk_linears() -> list[str]:
    return [f"blocks.{b}.{name}.weight" for b in (1, 2, 3) for name in BLOCK_LINEARS]


# --------------------------------------------------------------------------- which weights, and the plan (pure)


def test_only_untied_linear_weights_with_whole_groups_are_compressible():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 64)  # an embedding: never
            self.fc = nn.Linear(64, 32)  # yes: 64 inputs, one group; its bias: never
            self.narrow = nn.Linear(32, 64)  # 32 inputs: no whole group
            self.norm = nn.LayerNorm(64)  # a norm: never
            self.attn = nn.MultiheadAttention(64, 4)  # its out_proj is no plain Linear (its weight is used by its parent)
            self.head = nn.Linear(64, 10, bias=False)
            self.head.weight = self.embed.weight  # tied: never

    assert compressible_tensors(build_inventory(Net())) == ["fc.weight"]
    assert compressible_tensors(build_inventory(DemoTransformer(**CONFIG))) == [f"blocks.{b}.{n}.weight" for b in range(4) for n in BLOCK_LINEARS]


def test_compressed_weights_are_those_on_the_tiers_that_stream():
    inventory = build_inventory(nn.Sequential(nn.Linear(64, 8), nn.Linear(64, 8), nn.Linear(64, 8)))
    tiers = {"0.weight": "cuda:0", "1.weight": "cpu", "2.weight": "disk"}
    assert compressed_tensors(inventory, tiers, "cpu", "int8") == {"2.weight"}  # CPU RAM is resident on a CPU run
    assert compressed_tensors(inventory, tiers, "cuda:0", "int4") == {"1.weight", "2.weight"}  # streamed to the GPU
    assert compressed_tensors(inventory, tiers, "cuda:0", "none") == set()


U, INT8, INT4 = 256 * 256 * 4 + 1024, 256 * 256 + 256 * 4 * 4 + 1024, 256 * 128 + 256 * 4 * 4 + 256 * 4 + 1024  # bytes of a Linear(256, 256)


def test_the_planner_counts_compressed_bytes_where_units_stream_from_and_full_bytes_in_the_reserve():
    inventory = build_inventory(nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)]))
    assert stream_unit_bytes(inventory, "int8") == [INT8] * 4 and stream_unit_bytes(inventory, "int4") == [INT4] * 4
    budgets = {"cpu": 800_000, "disk": 3 * INT8 + 100}  # the disk holds three units compressed, none in full
    with pytest.raises(BudgetError, match="disk"):
        plan(inventory, budgets, strict_budget=True)
    for scheme, nbytes in (("int8", INT8), ("int4", INT4)):
        planned = plan(inventory, budgets, offload_compression=scheme, strict_budget=True)
        assert dict(planned) == {"0": "cpu", "1": "disk", "2": "disk", "3": "disk"}
        assert planned.summary.planned_bytes == {"cpu": U, "disk": 3 * nbytes}
        assert planned.summary.reserve == {"cpu": 2 * U}  # (1 + prefetch) units brought back, dequantized: full bytes


def test_with_int4_more_layers_stay_in_cpu_ram_for_a_gpu():
    inventory = build_inventory(nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)]))
    budgets = {"cuda:0": 3 * U + 100, "cpu": 3 * INT4 + 1000, "disk": 10**9}  # one unit on the GPU plus room for two
    uncompressed = plan(inventory, budgets)
    assert dict(uncompressed) == {"0": "cuda:0", "1": "disk", "2": "disk", "3": "disk"}
    compressed = plan(inventory, budgets, offload_compression="int4")
    assert dict(compressed) == {"0": "cuda:0", "1": "cpu", "2": "cpu", "3": "cpu"}
    assert compressed.summary.planned_bytes == {"cuda:0": U, "cpu": 3 * INT4} and compressed.summary.reserve == {"cuda:0": 2 * U}


def test_a_bad_setting_is_one_line_naming_the_argument(checkpoint: Path, tmp_path: Path):
    expected = r"^offload_compression must be one of 'none', 'int8', 'int4'; got 'int3'$"
    with pytest.raises(ConfigError, match=expected):
        load(checkpoint, tmp_path, "int3")
    with pytest.raises(ConfigError, match=expected):
        disk_offload(nn.Linear(64, 4), tmp_path, "cpu", offload_compression="int3")
    with pytest.raises(ConfigError, match=expected):
        infer_auto_device_map(nn.Linear(64, 4), {"cpu": 10**6}, offload_compression="int3")


# --------------------------------------------------------------------------- loaded and run


def test_none_is_bit_identical_to_no_setting_and_keeps_the_folder(checkpoint: Path, tmp_path: Path):
    # bfloat16: the disk tier is converted into an offload folder, whose name is its fingerprint.
    before = load(checkpoint, tmp_path / "a", None, dtype=torch.bfloat16)
    now = load(checkpoint, tmp_path / "b", "none", dtype=torch.bfloat16)
    assert torch.equal(logits(before), logits(now))
    assert torch.equal(logits(before), logits(reference().to(torch.bfloat16)))
    a, b = get_dispatch_info(before), get_dispatch_info(now)
    assert Path(a.offload_folder).name == Path(b.offload_folder).name and a.bytes_per_tier == b.bytes_per_tier
    assert b.offload_compression == "none" and not now.blocks[1].fc_in.weight.is_meta


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("disk_reads", ["mapped", "direct"])
def test_compressed_outputs_are_the_in_ram_model_with_its_weights_dequantized(checkpoint: Path, tmp_path: Path, scheme: str, disk_reads: str):
    model = load(checkpoint, tmp_path, scheme, disk_reads=disk_reads)
    expected = fake_quantized(reference(), disk_linears(), scheme)
    got = logits(model)
    torch.testing.assert_close(got, logits(expected), rtol=1e-5, atol=1e-5)  # same values, same products, up to summation order
    torch.testing.assert_close(logits(model), got, rtol=0, atol=0)  # the reused buffers leave nothing behind
    info = get_dispatch_info(model)
    assert info.offload_compression == scheme and info.schedule.unit_reads[disk_reads] > 0
    assert all(model.blocks[1].get_submodule(n).weight.is_meta for n in BLOCK_LINEARS)  # between forwards: no full weights
    # The disk tier holds the compressed Linears and the norms as they are (zero-copy views of the checkpoint).
    norms = 3 * 2 * CONFIG["d_model"] * 4
    linears = 3 * sum(compressed_nbytes(scheme, s) for s in ((192, 64), (64, 64), (128, 64), (64, 128)))
    assert info.bytes_per_tier["disk"] == linears + norms


def test_a_linear_on_disk_is_within_its_derived_quantization_bound(tmp_path: Path):
    # y_r = sum_i w_ri x_i, and each |w_ri - dequantized w_ri| <= scale_r,group(i) / 2: |y_r - y'_r| <= sum_i |x_i| scale_r,g(i) / 2.
    torch.manual_seed(2)
    layer = nn.Linear(4 * GROUP_SIZE, 16)
    x = torch.randn(5, 4 * GROUP_SIZE)
    exact = layer(x).detach()
    for scheme in ("int8", "int4"):
        scales = torch.from_numpy(naive(layer.weight.detach(), scheme)["scales"]).repeat_interleave(GROUP_SIZE, dim=1)  # (16, 256)
        bound = x.abs() @ (scales / 2).T  # (5, 16)
        dispatched = disk_offload(copy.deepcopy(layer), tmp_path / scheme, "cpu", offload_compression=scheme)
        with torch.no_grad():
            error = (dispatched(x) - exact).abs()
        assert (error <= bound * (1 + 1e-4) + 1e-6).all()
        assert error.max() > 0  # it is compressed


def test_int8_is_closer_than_int4_and_both_close_to_full_precision(checkpoint: Path, tmp_path: Path):
    full = logits(reference())
    errors = {s: (logits(load(checkpoint, tmp_path / s, s)) - full).abs().max().item() / full.abs().max().item() for s in ("int8", "int4")}
    assert 0 < errors["int8"] < errors["int4"] < 0.2 and errors["int8"] < 0.02


def test_the_setting_is_in_the_folders_key_an_uncompressed_folder_never_serves_int8(checkpoint: Path, tmp_path: Path):
    everything_on_disk = {**DISK_BLOCKS, "blocks.0": "disk"}
    plain = get_dispatch_info(load(checkpoint, tmp_path, "none", dtype=torch.bfloat16, device_map=everything_on_disk))
    int8 = get_dispatch_info(load(checkpoint, tmp_path, "int8", dtype=torch.bfloat16))  # a subset of plain's tensors
    assert plain.offload_reused is False and int8.offload_reused is False and int8.offload_folder != plain.offload_folder
    again = get_dispatch_info(load(checkpoint, tmp_path, "int8", dtype=torch.bfloat16))
    assert again.offload_reused is True and again.offload_folder == int8.offload_folder
    int4 = get_dispatch_info(load(checkpoint, tmp_path, "int4", dtype=torch.bfloat16))
    assert int4.offload_reused is False and int4.offload_folder not in (plain.offload_folder, int8.offload_folder)


def test_resident_weights_are_never_compressed(checkpoint: Path, tmp_path: Path):
    model = load(checkpoint, tmp_path, "int4", device_map="cpu")
    assert torch.equal(logits(model), logits(reference()))
    assert not any(p.is_meta for p in model.parameters()) and get_dispatch_info(model).offload_folder is None


def test_dispatching_a_model_in_ram_compresses_its_disk_tier(tmp_path: Path):
    model = dispatch_model(reference(), DISK_BLOCKS, offload_folder=tmp_path, offload_compression="int8")
    torch.testing.assert_close(logits(model), logits(fake_quantized(reference(), disk_linears(), "int8")), rtol=1e-5, atol=1e-5)
    assert get_dispatch_info(model).offload_compression == "int8"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the compressed bytes are copied to it, then dequantized there")
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_on_a_gpu_the_cpu_and_disk_tiers_stream_compressed_and_dequantize_there(checkpoint: Path, tmp_path: Path, scheme: str):
    device_map = {**DISK_BLOCKS, "embed": "cuda:0", "rotary": "cuda:0", "norm": "cuda:0", "lm_head": "cuda:0", "blocks.0": "cpu"}
    model = load(checkpoint, tmp_path, scheme, device_map=device_map)
    names = [f"blocks.{b}.{n}.weight" for b in range(4) for n in BLOCK_LINEARS]
    expected = fake_quantized(reference(), names, scheme)
    torch.testing.assert_close(logits(model).cpu(), logits(expected), rtol=1e-4, atol=1e-4)
    assert get_dispatch_info(model).bytes_per_tier["cpu"] < 4 * 64 * 64 * 8  # blocks.0 is held compressed in RAM
