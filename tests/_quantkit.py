"""Shared helpers of the compression tests: a naive reference of group-wise quantization, and models it is applied to.

The reference is the formulas of bigjob.engine.plan.compression computed group by group in
numpy float32, in a plain Python loop: nothing of bigjob's vectorized kernels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bigjob.engine.plan.compression import GROUP_SIZE


def naive(weight: torch.Tensor, scheme: str) -> dict[str, np.ndarray]:
    """The documented formulas, group by group, in numpy float32: codes unpacked, scales, zero points."""
    w = weight.float().numpy()
    out, width = w.shape
    groups = width // GROUP_SIZE
    codes = np.zeros((out, width), np.int32)
    scales = np.zeros((out, groups), np.float32)
    zeros = np.zeros((out, groups), np.int32)
    for r in range(out):
        for g in range(groups):
            values = w[r, g * GROUP_SIZE : (g + 1) * GROUP_SIZE]
            if scheme == "int8":
                scale = np.float32(np.abs(values).max()) / np.float32(127)
                q = np.round(values / scale) if scale > 0 else np.zeros_like(values)
                codes[r, g * GROUP_SIZE : (g + 1) * GROUP_SIZE] = np.clip(q, -127, 127)
            else:
                lo, hi = np.float32(min(values.min(), 0)), np.float32(max(values.max(), 0))
                scale = (hi - lo) / np.float32(15)
                zero = np.clip(np.round(-lo / scale), 0, 15) if scale > 0 else np.float32(0)
                q = np.round(values / scale) + zero if scale > 0 else np.zeros_like(values)
                codes[r, g * GROUP_SIZE : (g + 1) * GROUP_SIZE] = np.clip(q, 0, 15)
                zeros[r, g] = zero
            scales[r, g] = scale
    return {"codes": codes, "scales": scales, "zeros": zeros}


def unpack(packed: torch.Tensor) -> np.ndarray:
    """int4 codes, unpacked by the documented layout (per group: low nibbles first, then high)."""
    p = packed.numpy().astype(np.int32).reshape(packed.shape[0], -1, GROUP_SIZE // 2)
    return np.concatenate([p & 15, p >> 4], axis=-1).reshape(packed.shape[0], -1)


def naive_dequantized(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """``weight`` as the reference quantizes and dequantizes it, in float32, then in the weight's dtype."""
    ref = naive(weight, scheme)
    scales = np.repeat(ref["scales"], GROUP_SIZE, axis=1)
    zeros = np.repeat(ref["zeros"], GROUP_SIZE, axis=1).astype(np.float32)
    values = (ref["codes"].astype(np.float32) - zeros) * scales
    return torch.from_numpy(values.astype(np.float32)).to(weight.dtype)


def fake_quantized(model: nn.Module, names: list[str], scheme: str) -> nn.Module:
    """``model`` (in RAM; changed in place) with each weight of ``names`` replaced by its reference dequantized value."""
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name in names:
            params[name].copy_(naive_dequantized(params[name].detach(), scheme))
    return model
