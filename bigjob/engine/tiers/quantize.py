"""Group-wise int8 and int4 quantization of weight matrices: the kernels of offload compression.

What is stored, and why a weight comes back within ``scale / 2``, is said in
:mod:`bigjob.engine.plan.compression`. Both directions are whole-tensor torch operations on
``(out, groups, GROUP_SIZE)`` views: no Python loop over groups. :func:`dequantize_into`
writes into a buffer the caller reuses:

* on the CPU, in blocks of rows of about :data:`CPU_BLOCK` values, each converted to float32
  and scaled in place (vectorized, multi-threaded) in a scratch block, then rounded once into
  ``out`` (an int8 weight run in float32 needs no scratch: two operations over the whole
  weight). Mixed-dtype products straight into bfloat16 fall back to a slow scalar loop in
  PyTorch's CPU kernels (measured 30x slower on this project's VM). Blocks are large because
  each operation is a parallel region: on a machine whose cores are shared (load above its
  core count) every region waits for its slowest thread, and fewer regions won more than a
  cache-sized block (1 MiB blocks measured 2-3x slower at the median there, as fast when idle);
* on an accelerator, the parts already copied there (the compressed bytes crossed the bus),
  a few elementwise kernels over the whole weight, straight into ``out``.

>>> w = torch.tensor([[0.75, -1.0, 0.25, 1.0] * 16])  # (1, 64): one group, max |w| = 1
>>> q = quantize(w, "int8")
>>> q["codes"][0, :4].tolist(), q["scales"].item() == torch.tensor(1 / 127).item()  # 95.25 -> 95, 31.75 -> 32
([95, -127, 32, 127], True)
>>> back = dequantize(q, "int8", (1, 64), torch.float32)
>>> bool((back - w).abs().max() <= q["scales"].max() / 2)
True
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from bigjob.engine.plan.compression import GROUP_SIZE, check_compression, parts

__all__ = ["CPU_BLOCK", "dequantize", "dequantize_into", "quantize", "scratch_bytes"]

CPU_BLOCK = 1 << 20  # values per block on the CPU: 4 MiB of float32 scratch
_HALF = GROUP_SIZE // 2


def quantize(weight: torch.Tensor, scheme: str) -> dict[str, torch.Tensor]:
    """The parts of ``weight`` (``(out, in)``, ``in`` a multiple of ``GROUP_SIZE``) under ``scheme``.

    Computed in float32 from the values given (already in the dtype the model runs in).
    ``int8``: ``codes`` (int8), ``scales``; ``int4``: ``codes`` (uint8, two a byte), ``scales``, ``zeros`` (uint8).

    >>> q = quantize(torch.tensor([[-1.0, 0.0, 2.0, 4.0] * 16]), "int4")  # lo -1, hi 4: scale 1/3, zero 3
    >>> q["zeros"].tolist(), q["scales"].item() == torch.tensor(5 / 15).item()  # codes 0, 3, 9, 15, ...
    ([[3]], True)
    >>> q["codes"][0, :2].tolist()  # byte 0: values 0 and 32 (codes 0, 0); byte 1: values 1 and 33 (3, 3)
    [0, 51]
    """
    check_compression(scheme)
    out, width = weight.shape
    groups = weight.detach().to(torch.float32).reshape(out, width // GROUP_SIZE, GROUP_SIZE)  # (O, G, g)
    if scheme == "int8":
        scales = groups.abs().amax(dim=-1) / 127  # (O, G)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero group: codes 0
        codes = torch.round(groups / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
        return {"codes": codes.reshape(out, width).contiguous(), "scales": scales.contiguous()}
    if scheme == "int4":
        lo = groups.amin(dim=-1).clamp(max=0)
        hi = groups.amax(dim=-1).clamp(min=0)
        scales = (hi - lo) / 15
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        zeros = torch.round(-lo / safe).clamp_(0, 15)
        codes = (torch.round(groups / safe.unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp_(0, 15).to(torch.uint8)
        packed = codes[..., :_HALF] | (codes[..., _HALF:] << 4)  # (O, G, g / 2): value j low, j + g / 2 high
        return {"codes": packed.reshape(out, width // 2).contiguous(), "scales": scales.contiguous(), "zeros": zeros.to(torch.uint8).contiguous()}
    raise ValueError(f"quantize: nothing to do for compression {scheme!r}")


def scratch_bytes(scheme: str) -> int:
    """Bytes of the CPU scratch :func:`dequantize_into` uses for ``scheme`` (float32 block, int4's unpacked nibbles)."""
    return CPU_BLOCK * 4 + (CPU_BLOCK // 2 if scheme == "int4" else 0)


def dequantize_into(out: torch.Tensor, stored: Mapping[str, torch.Tensor], scheme: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Write the weight the parts ``stored`` hold into ``out`` (``(out, in)``, a floating dtype, on their device).

    ``int8``: ``codes * scale``; ``int4``: ``(codes - zero) * scale``, each computed in float32
    and rounded once to ``out``'s dtype. ``scratch``: on the CPU, a uint8 tensor of at least
    :func:`scratch_bytes` (allocated here without one); accelerators need none.

    >>> q = quantize(torch.tensor([[-1.0, 0.0, 2.0, 4.0] * 16]), "int4")
    >>> dequantize_into(torch.empty(1, 64, dtype=torch.bfloat16), q, "int4")[0, :4].tolist()
    [-1.0, 0.0, 2.0, 4.0]
    """
    if out.device.type == "cpu":
        return _on_cpu(out, stored, scheme, scratch)
    return _on_device(out, stored, scheme)


def _on_cpu(out: torch.Tensor, stored: Mapping[str, torch.Tensor], scheme: str, scratch: torch.Tensor | None) -> torch.Tensor:
    rows, width = out.shape
    groups = width // GROUP_SIZE
    if scratch is None:
        scratch = torch.empty(scratch_bytes(scheme), dtype=torch.uint8)
    floats = scratch[: CPU_BLOCK * 4].view(torch.float32)
    nibbles = scratch[CPU_BLOCK * 4 : CPU_BLOCK * 4 + CPU_BLOCK // 2]
    per = max(1, CPU_BLOCK // width)  # rows a block
    if per * width > CPU_BLOCK:  # one row wider than a block: no scratch is big enough, make one
        floats, nibbles = torch.empty(width), torch.empty(width // 2, dtype=torch.uint8)
    codes, scales = stored["codes"], stored["scales"]
    zeros = stored.get("zeros")
    if scheme == "int8" and out.dtype == torch.float32:  # no conversion to stage: the whole weight at once
        out.view(rows, groups, GROUP_SIZE).copy_(codes.view(rows, groups, GROUP_SIZE)).mul_(scales.view(rows, groups, 1))
        return out
    for start in range(0, rows, per):
        stop = min(rows, start + per)
        n = stop - start
        block = out[start:stop] if out.dtype == torch.float32 else floats[: n * width].view(n, width)
        scale = scales[start:stop].view(n, groups, 1)
        if scheme == "int8":
            block.view(n, groups, GROUP_SIZE).copy_(codes[start:stop].view(n, groups, GROUP_SIZE)).mul_(scale)
        else:
            assert zeros is not None
            halves = block.view(n, groups, 2, _HALF)
            packed = codes[start:stop].view(n, groups, 1, _HALF)
            unpacked = nibbles[: n * width // 2].view(n, groups, 1, _HALF)
            torch.bitwise_and(packed, 15, out=unpacked)
            halves[:, :, :1].copy_(unpacked)
            torch.bitwise_right_shift(packed, 4, out=unpacked)
            halves[:, :, 1:].copy_(unpacked)
            halves.sub_(zeros[start:stop].view(n, groups, 1, 1)).mul_(scale.view(n, groups, 1, 1))
        if block.data_ptr() != out[start:stop].data_ptr():
            out[start:stop].copy_(block)
    return out


def _on_device(out: torch.Tensor, stored: Mapping[str, torch.Tensor], scheme: str) -> torch.Tensor:
    rows, width = out.shape
    groups = width // GROUP_SIZE
    scales = stored["scales"].view(rows, groups, 1)
    if scheme == "int8":
        torch.mul(stored["codes"].view(rows, groups, GROUP_SIZE), scales, out=out.view(rows, groups, GROUP_SIZE))
        return out
    halves = out.view(rows, groups, 2, _HALF)
    packed = stored["codes"].view(rows, groups, 1, _HALF)
    zeros = stored["zeros"].view(rows, groups, 1, 1).to(torch.int16)
    for index, nibble in enumerate((packed & 15, packed >> 4)):
        torch.mul(nibble.to(torch.int16).sub_(zeros), scales.view(rows, groups, 1, 1), out=halves[:, :, index : index + 1])
    return out


def dequantize(stored: Mapping[str, torch.Tensor], scheme: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A new tensor of ``shape`` and ``dtype`` holding the weight the parts ``stored`` hold (see :func:`dequantize_into`)."""
    for name, (part_dtype, part_shape) in parts(scheme, shape).items():
        got = stored[name]
        if got.dtype != part_dtype or tuple(got.shape) != part_shape:
            raise ValueError(f"part {name!r} is {got.dtype} {tuple(got.shape)}; a {scheme} weight of {shape} needs {part_dtype} {part_shape}")
    out = torch.empty(shape, dtype=dtype, device=stored["codes"].device)
    return dequantize_into(out, stored, scheme)
