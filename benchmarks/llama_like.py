"""A Llama-style decoder in plain torch for benchmarks, and its deterministic sharded checkpoint.

Default size: 24 blocks of width 1024 (SwiGLU MLP of 2816), vocabulary 32000, head tied
to the embeddings: about 341M parameters, 1.36 GB in fp32.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from workload import write_seeded_shards


@dataclass(frozen=True)
class Config:
    vocab: int = 32000
    width: int = 1024
    depth: int = 24
    heads: int = 16
    ffn: int = 2816
    context: int = 256


class RMSNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class Block(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.heads = c.heads
        self.attn_norm = RMSNorm(c.width)
        self.q = nn.Linear(c.width, c.width, bias=False)
        self.k = nn.Linear(c.width, c.width, bias=False)
        self.v = nn.Linear(c.width, c.width, bias=False)
        self.o = nn.Linear(c.width, c.width, bias=False)
        self.mlp_norm = RMSNorm(c.width)
        self.gate = nn.Linear(c.width, c.ffn, bias=False)
        self.up = nn.Linear(c.width, c.ffn, bias=False)
        self.down = nn.Linear(c.ffn, c.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(B, T, self.heads, C // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        x = x + self.o(attn.transpose(1, 2).reshape(B, T, C))
        h = self.mlp_norm(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class LlamaLike(nn.Module):
    def __init__(self, c: Config = Config()) -> None:
        super().__init__()
        self.embed = nn.Embedding(c.vocab, c.width)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm = RMSNorm(c.width)
        self.head = nn.Linear(c.width, c.vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def write_checkpoint(folder: Path, c: Config = Config(), seed: int = 0, shards: int = 4) -> Path:
    """Sharded safetensors of a seeded model, written tensor by tensor; returns the index path."""
    folder.mkdir(parents=True, exist_ok=True)
    index = folder / "model.safetensors.index.json"
    marker = folder / "config.json"
    if index.exists() and marker.exists() and json.loads(marker.read_text()) == {**asdict(c), "seed": seed}:
        return index
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaLike(c).state_dict().items() if k != "head.weight"}
    weight_map = write_seeded_shards(folder, shapes, seed, shards)
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    marker.write_text(json.dumps({**asdict(c), "seed": seed}))
    return index
