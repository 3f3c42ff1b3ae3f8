"""Tests of bigjob.engine.tiers.quantize: group-wise int8/int4 against hand-computed values and a naive reference.

The hand-computed cases use scales that are powers of two, so every code, scale, zero point and
dequantized value is exact and written out here. The naive reference is a Python loop over
groups in numpy float32 (the formulas of bigjob.engine.plan.compression, nothing of the kernels).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _quantkit import naive, unpack

from bigjob.engine.plan.compression import GROUP_SIZE, compressed_nbytes, parts
from bigjob.engine.tiers import quantize as kernels
from bigjob.engine.tiers.quantize import dequantize, dequantize_into, quantize, scratch_bytes

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def group(values: dict[int, float]) -> list[float]:
    """A group of GROUP_SIZE values: zeros but at the given positions."""
    out = [0.0] * GROUP_SIZE
    for index, value in values.items():
        out[index] = value
    return out


def test_int8_codes_scales_and_values_by_hand():
    # (2, 128): four groups. Row 0: max |w| = 127/64 (scale 1/64), then an all-zero group;
    # row 1: max |w| = 127/32 (scale 1/32), then 127/128 everywhere (scale 1/128).
    rows = [
        group({0: 127 / 64, 1: -0.5, 2: 0.1, 3: -7 / 64, 4: 0.5 / 64, 5: 1.5 / 64}) + group({}),
        group({10: -127 / 32, 11: 1.0}) + [127 / 128] * GROUP_SIZE,
    ]
    q = quantize(torch.tensor(rows), "int8")
    assert q["codes"].dtype == torch.int8 and tuple(q["codes"].shape) == (2, 128)
    assert q["scales"].dtype == F32 and q["scales"].tolist() == [[1 / 64, 0.0], [1 / 32, 1 / 128]]
    # w / scale: 127, -32, 6.4 -> 6, -7, 0.5 -> 0 and 1.5 -> 2 (round half to even), the rest 0
    assert q["codes"][0, :6].tolist() == [127, -32, 6, -7, 0, 2] and not q["codes"][0, 6:].any()
    assert q["codes"][1, 10:12].tolist() == [-127, 32] and q["codes"][1, 64:].tolist() == [127] * GROUP_SIZE
    back = dequantize(q, "int8", (2, 128), F32)
    assert back[0, :6].tolist() == [127 / 64, -0.5, 6 / 64, -7 / 64, 0.0, 2 / 64]
    assert back[1, 10:12].tolist() == [-127 / 32, 1.0] and back[1, 64:].tolist() == [127 / 128] * GROUP_SIZE
    assert not back[0, 64:].any()


def test_int4_codes_zero_points_packing_and_values_by_hand():
    # Row 0, group 0: lo -0.5, hi 7/16: scale (7/16 + 1/2) / 15 = 1/16, zero 8.
    # Row 0, group 1: all >= 0, hi 15/8: the range widened to 0: scale 1/8, zero 0.
    # Row 1, group 0: all <= 0, lo -15/8: scale 1/8, zero 15. Row 1, group 1: all zero.
    rows = [
        group({0: -0.5, 1: 7 / 16, 2: 0.1, 3: -0.5 / 16, 32: 1.5 / 16, 33: 7 / 16}) + group({0: 15 / 8, 1: 1.0, 32: 0.3}),
        group({0: -15 / 8, 1: -1.0, 32: -0.25}) + group({}),
    ]
    q = quantize(torch.tensor(rows), "int4")
    assert q["scales"].tolist() == [[1 / 16, 1 / 8], [1 / 8, 0.0]]
    assert q["zeros"].dtype == torch.uint8 and q["zeros"].tolist() == [[8, 0], [15, 0]]
    # codes = round(w / scale) + zero: group (0, 0): 0, 15, 1.6 -> 2 + 8 = 10, -0.5 -> 0 + 8 = 8; at 32: 1.5 -> 2 + 8 = 10; 33: 15; rest 8
    # group (0, 1): 15, 8, at 32: 2.4 -> 2; rest 0. Group (1, 0): 0, 7, at 32: -2 + 15 = 13; rest 15.
    # Two a byte: byte j of a group holds value j (low nibble) and value j + 32 (high nibble).
    codes = q["codes"]
    assert codes.dtype == torch.uint8 and tuple(codes.shape) == (2, 64)
    assert codes[0, :4].tolist() == [0 | 10 << 4, 15 | 15 << 4, 10 | 8 << 4, 8 | 8 << 4] and codes[0, 4:32].tolist() == [8 | 8 << 4] * 28
    assert codes[0, 32:35].tolist() == [15 | 2 << 4, 8, 0] and codes[1, :3].tolist() == [0 | 13 << 4, 7 | 15 << 4, 15 | 15 << 4]
    assert codes[1, 32:].tolist() == [0] * 32
    back = dequantize(q, "int4", (2, 128), F32)  # (codes - zero) * scale
    assert back[0, :4].tolist() == [-0.5, 7 / 16, 2 / 16, 0.0] and back[0, 32:34].tolist() == [2 / 16, 7 / 16]
    assert back[0, 64:66].tolist() == [15 / 8, 1.0] and back[0, 96] == 0.25
    assert back[1, :2].tolist() == [-15 / 8, -1.0] and back[1, 32] == -0.25 and not back[1, 64:].any()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_random_weights_match_the_naive_reference_and_come_back_within_half_a_scale(scheme, dtype):
    gen = torch.Generator().manual_seed(7)
    weight = (torch.randn(6, 192, generator=gen) * torch.logspace(-3, 1, 6).unsqueeze(1)).to(dtype)
    weight[2, 64:128] = 0  # an all-zero group
    weight[3, :64] = weight[3, :64].abs()  # all of one sign
    q = quantize(weight, scheme)
    ref = naive(weight, scheme)
    got_codes = unpack(q["codes"]) if scheme == "int4" else q["codes"].numpy()
    np.testing.assert_array_equal(got_codes, ref["codes"])
    np.testing.assert_array_equal(q["scales"].numpy(), ref["scales"])
    if scheme == "int4":
        np.testing.assert_array_equal(q["zeros"].numpy(), ref["zeros"])
    for name, (part_dtype, part_shape) in parts(scheme, (6, 192)).items():
        assert q[name].dtype == part_dtype and tuple(q[name].shape) == part_shape
    back = dequantize(q, scheme, (6, 192), F32)
    # Half a scale, and float32's rounding of w / scale and codes * scale (a few ulps of |w|).
    bound = q["scales"].repeat_interleave(GROUP_SIZE, dim=1) / 2 + weight.float().abs() * 2**-21
    assert ((back - weight.float()).abs() <= bound).all()
    # In the weight's own dtype: the float32 value, rounded once.
    assert torch.equal(dequantize(q, scheme, (6, 192), dtype), back.to(dtype))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(3, 64), (5000, 128), (2, kernels.CPU_BLOCK * 2)])  # one block, many (ragged), a row wider than one
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_the_cpu_blocks_and_the_accelerator_pass_give_the_same_bits(scheme, shape, dtype):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    q = quantize(weight, scheme)
    scratch = torch.empty(scratch_bytes(scheme), dtype=torch.uint8)
    blocked = dequantize_into(torch.empty(shape, dtype=dtype), q, scheme, scratch)
    whole = kernels._on_device(torch.empty(shape, dtype=dtype), q, scheme)  # the accelerator path, run on the CPU here
    assert torch.equal(blocked, whole)
    assert torch.equal(dequantize_into(torch.empty(shape, dtype=dtype), q, scheme, scratch), blocked)  # scratch reused


def test_parts_bytes_and_their_padding():
    assert compressed_nbytes("int8", (16, 64)) == 16 * 64 + 16 * 4
    assert compressed_nbytes("int4", (16, 64)) == 16 * 32 + 16 * 4 + 16 + 48  # 592 bytes, padded to 640
    assert compressed_nbytes("int4", (4096, 4096)) / (4096 * 4096 * 2) < 0.3  # under 0.3x of bf16
    assert compressed_nbytes("int8", (4096, 4096)) / (4096 * 4096 * 2) < 0.54


def test_a_bad_shape_is_refused_by_dequantize():
    q = quantize(torch.randn(2, 64), "int8")
    with pytest.raises(ValueError, match="part 'codes'"):
        dequantize(q, "int8", (2, 128), F32)
