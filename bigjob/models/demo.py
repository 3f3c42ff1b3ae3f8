"""The built-in demo model: a small decoder-only transformer and its seeded checkpoint.

The code ships in the package; the weights are made deterministically from a seed the
first time a job asks for them, written as sharded safetensors into the cache folder,
and reused afterwards. At the default size the model has about 54M parameters
(217 MB in float32), enough to need disk offload under a modest CPU budget while a
forward pass over a few short sequences takes well under a second on a laptop.

``DemoBlock`` is the unit the planner must never split (``no_split_module_classes``).
The output head is tied to the token embedding, and the rotary table is a
non-persistent buffer, so the checkpoint holds neither.

>>> model = DemoTransformer(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32)
>>> out = model(torch.tensor([[1, 2, 3]]))
>>> tuple(out["logits"].shape), tuple(out["last_hidden_state"].shape)
((1, 3, 64), (1, 3, 16))
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

__all__ = [
    "DEMO_CHECKPOINT_VERSION",
    "DemoBlock",
    "DemoTransformer",
    "demo_checkpoint_folder",
    "demo_checkpoint_spec",
    "demo_tensor",
    "make_demo_checkpoint",
]

# Bump when the way weights are drawn changes: it is part of the checkpoint folder's name.
DEMO_CHECKPOINT_VERSION = 1
MARKER_NAME = "bigjob-demo.json"
INDEX_NAME = "model.safetensors.index.json"


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension, with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 so half-precision runs stay stable, then cast back.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight


class Rotary(nn.Module):
    """Rotary position tables, kept as non-persistent buffers (never in a checkpoint)."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (L, hd/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids (B, T) -> cos, sin (B, T, hd/2)
        position_ids = position_ids.to(self.cos.device)
        return self.cos[position_ids], self.sin[position_ids]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, H, T, hd); cos/sin (B, 1, T, hd/2); rotates interleaved halves.
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


class DemoBlock(nn.Module):
    """One pre-norm transformer block: causal self-attention then a GELU MLP."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm = RMSNorm(d_model, norm_eps)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.mlp_norm = RMSNorm(d_model, norm_eps)
        self.fc_in = nn.Linear(d_model, d_ff, bias=False)
        self.fc_out = nn.Linear(d_ff, d_model, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor
    ) -> torch.Tensor:
        # x (B, T, C); attn_mask (B, 1, T, T) bool, True where a query may attend a key.
        B, T, C = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        cos = cos.to(x.dtype).unsqueeze(1)
        sin = sin.to(x.dtype).unsqueeze(1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, T, hd)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.fc_out(F.gelu(self.fc_in(self.mlp_norm(x))))


class DemoTransformer(nn.Module):
    """A decoder-only language model with a tied output head.

    ``forward(input_ids (B, T), attention_mask (B, T) | None)`` returns
    ``{"logits": (B, T, V), "last_hidden_state": (B, T, C)}``. Padding (mask 0) may sit on
    either side: positions count real tokens only and no real token attends a pad, so a
    padded sequence gets the same outputs at its real positions as when run alone.
    """

    def __init__(
        self,
        vocab_size: int = 8192,
        d_model: int = 512,
        n_layers: int = 16,
        n_heads: int = 8,
        d_ff: int = 2048,
        max_seq_len: int = 1024,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"d_model={d_model} must split into n_heads={n_heads} heads of even size")
        self.max_seq_len = max_seq_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.rotary = Rotary(d_model // n_heads, max_seq_len)
        self.blocks = nn.ModuleList(DemoBlock(d_model, n_heads, d_ff, norm_eps) for _ in range(n_layers))
        self.norm = RMSNorm(d_model, norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied: one tensor, stored once as embed.weight

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        B, T = input_ids.shape
        if T > self.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.max_seq_len}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        valid = attention_mask.to(device=input_ids.device, dtype=torch.bool)  # (B, T)
        position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)  # real tokens count from 0
        causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
        # A pad query keeps its own diagonal so its softmax row is never empty (no NaN).
        eye = torch.eye(T, dtype=torch.bool, device=input_ids.device)
        attn_mask = ((causal & valid[:, None, :]) | eye).unsqueeze(1)  # (B, 1, T, T)

        x = self.embed(input_ids)  # (B, T, C)
        cos, sin = self.rotary(position_ids)
        for block in self.blocks:
            x = block(x, cos, sin, attn_mask)
        hidden = self.norm(x)
        return {"logits": self.lm_head(hidden), "last_hidden_state": hidden}


# --------------------------------------------------------------------------- checkpoint


def demo_checkpoint_spec(config: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the tensors a checkpoint of ``DemoTransformer(**config)`` holds.

    Built on the meta device (no memory); the tied head is listed once, as ``embed.weight``.

    >>> spec = demo_checkpoint_spec(dict(vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ff=32))
    >>> spec[0], len(spec)
    (('embed.weight', (64, 16)), 8)
    """
    with torch.device("meta"):
        model = DemoTransformer(**config)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def demo_tensor(name: str, shape: tuple[int, ...], seed: int, n_layers: int) -> torch.Tensor:
    """The float32 value of one checkpoint tensor: a pure function of (name, shape, seed).

    Each tensor has its own generator, so shards can be written in any order or grouping.

    >>> a = demo_tensor("blocks.0.qkv.weight", (6, 4), seed=0, n_layers=1)
    >>> torch.equal(a, demo_tensor("blocks.0.qkv.weight", (6, 4), seed=0, n_layers=1))
    True
    """
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * noise
    fan_in = shape[-1]  # the embedding's rows are also the tied head's: logits stay O(1)
    std = 1.0 / math.sqrt(fan_in)
    if name.endswith(("proj.weight", "fc_out.weight")):
        std /= math.sqrt(2 * n_layers)  # residual branches: keep the stream's scale steady
    return noise * std


def _shards(
    spec: list[tuple[str, tuple[int, ...]]], num_shards: int
) -> Iterator[list[tuple[str, tuple[int, ...]]]]:
    """Groups tensors in order into about ``num_shards`` shards of similar byte size."""
    total = sum(math.prod(shape) for _, shape in spec)
    target = total / max(1, num_shards)
    shard: list[tuple[str, tuple[int, ...]]] = []
    done = 0  # elements in the shards already yielded
    start = 0  # elements before the current tensor
    for name, shape in spec:
        # Start a new shard once the tensors so far fill a whole number of targets.
        if shard and start >= (done // target + 1) * target - 0.5:
            yield shard
            shard, done = [], start
        shard.append((name, shape))
        start += math.prod(shape)
    if shard:
        yield shard


def _marker(config: Mapping[str, Any], seed: int, num_shards: int) -> dict[str, Any]:
    return {
        "format": "bigjob-demo",
        "version": DEMO_CHECKPOINT_VERSION,
        "config": dict(sorted(config.items())),
        "seed": seed,
        "num_shards": num_shards,
        "dtype": "float32",
    }


def _is_complete(folder: Path, marker: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / MARKER_NAME).read_text()) == marker
    except (OSError, ValueError):
        return False


def demo_checkpoint_folder(
    root: str | os.PathLike[str], config: Mapping[str, Any] | None = None, seed: int = 0, num_shards: int = 4
) -> Path:
    """Where :func:`make_demo_checkpoint` keeps this checkpoint: ``root/demo-<hash of config, seed, shards, generator>``.

    >>> a = demo_checkpoint_folder("/c", {"n_layers": 2})
    >>> a.parent, a == demo_checkpoint_folder("/c", {"n_layers": 2}), a == demo_checkpoint_folder("/c", {"n_layers": 2}, seed=1)
    (PosixPath('/c'), True, False)
    """
    return _folder(root, _marker(dict(config or {}), seed, num_shards))


def _folder(root: str | os.PathLike[str], marker: dict[str, Any]) -> Path:
    return Path(root) / f"demo-{hashlib.sha256(json.dumps(marker, sort_keys=True).encode()).hexdigest()[:16]}"


def make_demo_checkpoint(
    root: str | os.PathLike[str],
    config: Mapping[str, Any] | None = None,
    seed: int = 0,
    num_shards: int = 4,
) -> Path:
    """The folder of a sharded safetensors checkpoint of ``DemoTransformer(**config)``.

    The folder ``root/demo-<hash>`` is named after the config, seed and generator version;
    when it already holds a complete checkpoint (its marker file matches) it is returned
    as is. Otherwise the shards are generated one at a time (never the whole model in
    RAM) into a temporary sibling folder, the marker is written last, and the folder is
    renamed into place, so a reader never sees a half-written checkpoint and two
    processes racing to build it both end up with the same complete folder.

    >>> import tempfile
    >>> small = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     folder = make_demo_checkpoint(tmp, small, seed=1, num_shards=2)
    ...     sorted(p.name for p in folder.iterdir())
    ['bigjob-demo.json', 'model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']
    """
    config = dict(config or {})
    marker = _marker(config, seed, num_shards)
    root = Path(root)
    final = _folder(root, marker)
    if _is_complete(final, marker):
        return final
    root.mkdir(parents=True, exist_ok=True)
    n_layers = int(config.get("n_layers", inspect.signature(DemoTransformer).parameters["n_layers"].default))
    spec = demo_checkpoint_spec(config)
    groups = list(_shards(spec, num_shards))
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        weight_map: dict[str, str] = {}
        total_bytes = 0
        for i, group in enumerate(groups, start=1):
            fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            tensors = {name: demo_tensor(name, shape, seed, n_layers) for name, shape in group}
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update((name, fname) for name in tensors)
            del tensors  # only one shard is ever held in memory
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1, sort_keys=True))
        (tmp / MARKER_NAME).write_text(json.dumps(marker, sort_keys=True))
        if final.exists() and not _is_complete(final, marker):
            shutil.rmtree(final, ignore_errors=True)  # a stale or broken copy: never trusted
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final, marker):  # lost a race to a process that failed
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
