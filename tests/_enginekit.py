"""Shared helpers of the engine tests (loading, dispatch, store): checkpoints of the tiny model in
every format, empty models, inputs, and file-mapping probes.

The reference is always the tiny model built and held in RAM by plain PyTorch
(:func:`tiny_transformer.make_reference`); nothing here goes through bigjob's loader.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file, save_model
from tiny_transformer import TinyLM, make_reference

from bigjob import init_empty_weights
from bigjob.engine.checkpoints.safetensors_writer import write_file

#: Every checkpoint layout the loader must read; values are what to pass as ``checkpoint``.
FORMATS = (
    "st_bigjob",  # one .safetensors written by bigjob's writer
    "st_official",  # one .safetensors written by safetensors.torch.save_file
    "st_save_model",  # safetensors.torch.save_model (drops one name of each tie itself)
    "st_sharded",  # three shards + model.safetensors.index.json (the index is passed)
    "st_dir",  # a folder holding one model.safetensors
    "st_sharded_dir",  # a folder holding shards + index
    "bin",  # one pytorch_model.bin (torch.save of the state dict, ties and all)
    "bin_sharded",  # three .bin shards + pytorch_model.bin.index.json
    "bin_dir",  # a folder holding shards + pytorch_model.bin.index.json
)

WIDTH, VOCAB, CONTEXT, DEPTH = 32, 64, 16, 4
BLOCK_NUMEL = 12 * WIDTH * WIDTH + 13 * WIDTH  # ln1, qkv, proj, ln2, up, down (weights + biases)
# A map with both tiers: two blocks and the final norm on disk, the rest in RAM.
MIXED = {
    "embed": "cpu",
    "pos": "cpu",
    "blocks.0": "cpu",
    "blocks.1": "disk",
    "blocks.2": "disk",
    "blocks.3": "cpu",
    "norm": "disk",
    "head": "cpu",
    "positions": "cpu",
    "mask": "cpu",
}


def empty_model(**kwargs: int) -> TinyLM:
    """The tiny model with its weights on ``meta`` (buffers real, as ``init_empty_weights`` leaves them)."""
    with init_empty_weights():
        return TinyLM(**kwargs).eval()


def inputs(batch: int = 3, length: int = 12, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def untied_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with the tied head dropped (as the official writer requires), tensors owned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k != "head.weight"}


def _shards(names: list[str], count: int = 3) -> list[list[str]]:
    size = -(-len(names) // count)
    return [names[i : i + size] for i in range(0, len(names), size)]


def write_sharded_safetensors(folder: Path, state: dict[str, torch.Tensor], count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    parts = _shards(list(state), count)
    weight_map: dict[str, str] = {}
    for number, part in enumerate(parts, start=1):
        name = f"model-{number:05d}-of-{len(parts):05d}.safetensors"
        save_file({k: state[k].contiguous() for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def write_sharded_bin(folder: Path, state: dict[str, torch.Tensor], count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    parts = _shards(list(state), count)
    weight_map: dict[str, str] = {}
    for number, part in enumerate(parts, start=1):
        name = f"pytorch_model-{number:05d}-of-{len(parts):05d}.bin"
        torch.save({k: state[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = folder / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def write_checkpoint(folder: Path, fmt: str, model: torch.nn.Module | None = None) -> Path:
    """Write ``model`` (default: the reference) in layout ``fmt`` under ``folder``; return what to load."""
    model = make_reference() if model is None else model
    folder.mkdir(parents=True, exist_ok=True)
    state = untied_state(model)
    if fmt == "st_bigjob":
        write_file(folder / "model.safetensors", state)
        return folder / "model.safetensors"
    if fmt == "st_official":
        save_file(state, str(folder / "weights.safetensors"))
        return folder / "weights.safetensors"
    if fmt == "st_save_model":
        save_model(model, str(folder / "model.safetensors"))
        return folder / "model.safetensors"
    if fmt == "st_sharded":
        return write_sharded_safetensors(folder, state)
    if fmt == "st_dir":
        save_file(state, str(folder / "model.safetensors"))
        return folder
    if fmt == "st_sharded_dir":
        write_sharded_safetensors(folder, state)
        return folder
    if fmt == "bin":
        torch.save(model.state_dict(), folder / "pytorch_model.bin")  # with the tie, shared storage
        return folder / "pytorch_model.bin"
    if fmt == "bin_sharded":
        return write_sharded_bin(folder, state)
    if fmt == "bin_dir":
        write_sharded_bin(folder, state)
        return folder
    raise ValueError(fmt)


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of ``path`` (from /proc/self/maps)."""
    target = str(Path(path).resolve())
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == target:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((start, end))
    return ranges


def inside_mapping(tensor: torch.Tensor, paths: list[Path]) -> bool:
    """Whether the tensor's bytes lie inside a mapping of one of ``paths`` (a zero-copy view of the file)."""
    ptr = tensor.data_ptr()
    end = ptr + tensor.numel() * tensor.element_size()
    return any(start <= ptr and end <= stop for path in paths for start, stop in mapped_ranges(path))


def _smaps_lines(path: Path) -> Iterator[str]:
    """The /proc/self/smaps lines describing this process's mappings of ``path``."""
    target = str(Path(path).resolve())
    current = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=5)
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                current = len(head) == 6 and head[5].strip() == target
            elif current:
                yield line


def resident_kib(path: Path, field: str = "Rss") -> int:
    """KiB of ``path``'s mappings in this process by an smaps field (``Rss``, ``FilePmdMapped``)."""
    return sum(int(line.split()[1]) for line in _smaps_lines(path) if line.startswith(f"{field}:"))


def mapping_flags(path: Path) -> set[str]:
    """The kernel's VmFlags of this process's mappings of ``path`` (``hg``: MADV_HUGEPAGE)."""
    return {flag for line in _smaps_lines(path) if line.startswith("VmFlags:") for flag in line.split()[1:]}


def on_meta(model: torch.nn.Module) -> list[str]:
    """Names of parameters and buffers still on the meta device."""
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]


def evict(*paths: Path) -> None:
    """Drop ``paths`` from the page cache (written pages are flushed first, or they would stay)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
