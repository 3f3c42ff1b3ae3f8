"""A small transformer-style model for engine tests: embeddings, a stack of blocks (the
no-split class), LayerNorm, an output head tied to the embeddings, a non-persistent float
buffer and a persistent integer buffer."""

from __future__ import annotations

import math

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        shape = (B, T, self.heads, C // self.heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(C // self.heads) + mask[:T, :T]
        attn = scores.softmax(dim=-1) @ v
        x = x + self.proj(attn.transpose(1, 2).reshape(B, T, C))
        return x + self.down(torch.nn.functional.gelu(self.up(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 64, width: int = 32, depth: int = 4, heads: int = 4, context: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(context, width))  # a direct parameter of the root
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        mask = torch.full((context, context), float("-inf")).triu(1)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("positions", torch.arange(context), persistent=True)  # int64 buffer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        x = self.embed(ids) + self.pos[self.positions[:T]]
        for block in self.blocks:
            x = block(x, self.mask)
        return self.head(self.norm(x))


def make_reference(seed: int = 0, **kwargs: int) -> TinyLM:
    """The model with deterministic, non-trivial weights, in eval mode."""
    torch.manual_seed(seed)
    model = TinyLM(**kwargs).eval()
    with torch.no_grad():
        model.pos.normal_(0, 0.1)
        for block in model.blocks:
            block.ln1.weight.uniform_(0.5, 1.5)
            block.ln2.bias.normal_(0, 0.1)
    return model
