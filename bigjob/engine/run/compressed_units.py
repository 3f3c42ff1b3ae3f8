"""Compressed weights of a dispatched model: their parts travel like weights, and are dequantized right before use.

A weight stored compressed (``offload_compression``; see :mod:`bigjob.engine.plan.compression`)
is no tensor of the model between forwards: its parameter is a meta tensor, and its parts
(``codes``, ``scales``, ``zeros``) are buffers of a small *holder* module outside the model,
found under the weight's name (``blocks.0.fc.weight`` -> the holder, ``blocks.0.fc.weight.codes``
-> a part). The dispatcher builds its units over the parts instead of the weight
(:meth:`CompressedWeights.expand`), so every way a unit brings bytes in works unchanged and
moves only compressed bytes: pages mapped in, a direct read into a reused buffer, a pinned
staging copy, one host-to-device copy. :class:`CompressedUnit` wraps the unit's hook: once the
unit has brought its parts in, it dequantizes each weight, on the device the parts are on (the
CPU, or the GPU they were copied to), into one buffer reused by every unit
(:class:`DequantBuffers`), and puts the meta tensor back after the forward.

A compressed weight exists only during its unit's forward: code that reads ``module.weight``
outside it sees a meta tensor, and a model whose hooks are removed (``remove_dispatch``) keeps
meta tensors there: load it again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bigjob.engine.plan.compression import compressed_nbytes, parts
from bigjob.engine.tiers.compressed_store import part_name
from bigjob.engine.tiers.quantize import dequantize_into, quantize, scratch_bytes

__all__ = ["CompressedUnit", "CompressedWeight", "CompressedWeights", "DequantBuffers"]

_ALIGN = 256  # bytes: every weight in the dequantization buffer starts at a multiple of this


@dataclass
class CompressedWeight:
    """One compressed weight: where it sits in the model, what it is, and the holder of its parts."""

    name: str
    module: nn.Module
    local: str
    scheme: str
    shape: tuple[int, int]
    dtype: torch.dtype
    holder: nn.Module
    resting: nn.Parameter  # the meta parameter the module holds between forwards

    @property
    def nbytes(self) -> int:
        """Bytes of the weight dequantized."""
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def stored(self) -> dict[str, torch.Tensor]:
        """The parts as the unit brought them in (file views, a read buffer, or device memory)."""
        return {part: self.holder._buffers[part] for part in parts(self.scheme, self.shape)}  # type: ignore[misc]

    def install(self, value: torch.Tensor) -> None:
        self.module._parameters[self.local] = nn.Parameter(value, requires_grad=False)

    def restore(self) -> None:
        self.module._parameters[self.local] = self.resting


@dataclass
class CompressedWeights:
    """The compressed weights of a loaded model (none with ``scheme="none"``), by weight name."""

    scheme: str = "none"
    weights: dict[str, CompressedWeight] = field(default_factory=dict)
    _by_unit: dict[str, list[CompressedWeight]] = field(default_factory=dict, repr=False)
    _buffers: DequantBuffers | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes the weights take compressed."""
        return sum(compressed_nbytes(self.scheme, w.shape) for w in self.weights.values())

    def add(self, modules: Mapping[str, nn.Module], name: str, dtype: torch.dtype, shape: tuple[int, ...], stored: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Record weight ``name`` as compressed, its parts ``stored`` (views or RAM); return the meta tensor it rests as."""
        owner, _, local = name.rpartition(".")
        holder = nn.Module()
        for part, value in stored.items():
            holder._buffers[part] = value
        resting = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)
        self.weights[name] = CompressedWeight(name, modules[owner], local, self.scheme, (shape[0], shape[1]), dtype, holder, resting)
        return resting

    def quantized(self, modules: Mapping[str, nn.Module], name: str, value: torch.Tensor) -> torch.Tensor:
        """Compress ``value`` (weight ``name`` in its target dtype) into parts in RAM, and :meth:`add` it."""
        stored = {part: tensor.cpu() for part, tensor in quantize(value, self.scheme).items()}
        return self.add(modules, name, value.dtype, tuple(value.shape), stored)

    def holders(self) -> dict[str, nn.Module]:
        """Each weight's holder under the weight's name: a module index where part names resolve (``get_tensor``)."""
        return {name: weight.holder for name, weight in self.weights.items()}

    def tiers(self, placement: Mapping[str, str]) -> dict[str, str]:
        """``placement`` (tensor name -> tier) with every part where its weight is."""
        if not self.weights:
            return dict(placement)
        return {**placement, **{part_name(w.name, p): placement[w.name] for w in self.weights.values() for p in parts(w.scheme, w.shape)}}

    def expand(self, unit: str, names: Iterable[str]) -> list[str]:
        """Unit ``unit``'s tensor ``names`` with each compressed weight replaced by its parts (remembered for :meth:`wrap`)."""
        out: list[str] = []
        found: list[CompressedWeight] = []
        for name in names:
            weight = self.weights.get(name)
            if weight is None:
                out.append(name)
            else:
                found.append(weight)
                out.extend(part_name(name, p) for p in parts(weight.scheme, weight.shape))
        if found:
            self._by_unit[unit] = found
        return out

    def wrap(self, unit: str, hook: Any) -> Any:
        """``hook``, wrapped in a :class:`CompressedUnit` where unit ``unit`` holds compressed weights."""
        found = self._by_unit.get(unit)
        if not found:
            return hook
        if self._buffers is None:
            self._buffers = DequantBuffers(self.scheme)
        return CompressedUnit(hook, found, self._buffers)


class DequantBuffers:
    """One buffer per device that units dequantize their weights into, shared and reused forward after forward.

    Its size is the largest unit's weights dequantized: units run one at a time (forwards are
    serialized) and a unit's weights are dropped when its forward ends. On a GPU the kernels
    that fill it for a unit are queued on the stream after those of the unit before, so reusing
    it needs no wait. The CPU also gets the dequantization kernel's scratch block.
    """

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme
        self.size = 0
        self._buffers: dict[torch.device, torch.Tensor] = {}
        self._scratch: torch.Tensor | None = None
        self._lock = threading.Lock()

    def need(self, nbytes: int) -> None:
        """Make the buffers hold at least ``nbytes`` (called as units are wrapped, before any forward)."""
        self.size = max(self.size, nbytes)

    def get(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The buffer on ``device`` (uint8, :attr:`size` bytes, made at first use) and the CPU scratch (``None`` elsewhere)."""
        with self._lock:
            buffer = self._buffers.get(device)
            if buffer is None or buffer.numel() < self.size:
                buffer = self._buffers[device] = torch.empty(self.size, dtype=torch.uint8, device=device)
            if device.type != "cpu":
                return buffer, None
            if self._scratch is None:
                self._scratch = torch.empty(scratch_bytes(self.scheme), dtype=torch.uint8)
            return buffer, self._scratch


class CompressedUnit:
    """A unit's hook, with its compressed weights dequantized after its bytes came in and dropped after its forward."""

    def __init__(self, inner: Any, weights: list[CompressedWeight], buffers: DequantBuffers) -> None:
        self.inner = inner
        self.name = inner.name
        self.weights = weights
        self.buffers = buffers
        self.offsets: list[int] = []
        offset = 0
        for weight in weights:
            offset += -offset % _ALIGN
            self.offsets.append(offset)
            offset += weight.nbytes
        buffers.need(offset)

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, kwargs = self.inner.pre_forward(module, args, kwargs)
        try:
            self._dequantize()
        except BaseException:
            self.inner.post_forward(module, None)  # the unit's buffers and pages go back as after a forward
            raise
        return args, kwargs

    def _dequantize(self) -> None:
        device = self.weights[0].holder._buffers["codes"].device  # type: ignore[union-attr]
        buffer, scratch = self.buffers.get(device)
        for weight, offset in zip(self.weights, self.offsets):
            out = buffer[offset : offset + weight.nbytes].view(weight.dtype).view(weight.shape)
            weight.install(dequantize_into(out, weight.stored(), weight.scheme, scratch))

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        for weight in self.weights:
            weight.restore()
        return self.inner.post_forward(module, output)
