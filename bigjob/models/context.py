"""How many positions a model takes: the longest sample (plus new tokens) a job may give it.

A Transformers model says so in its config (``max_position_embeddings`` and its kin); other
models may carry a ``max_seq_len`` of their own, as bigjob's demo transformer does. A model
that says neither has no known limit.

>>> from bigjob.models.demo import DemoTransformer
>>> model_context_length(DemoTransformer(vocab_size=32, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_seq_len=128))
128
>>> import torch
>>> model_context_length(torch.nn.Linear(2, 2)) is None
True
"""

from __future__ import annotations

from torch import nn

__all__ = ["model_context_length"]


def model_context_length(model: nn.Module) -> int | None:
    """The most positions ``model`` takes, or None when it does not say."""
    config = getattr(model, "config", None)
    if config is not None:
        from bigjob.models.hf_tokens import context_length

        length = context_length(config)
        if length is not None:
            return length
    own = getattr(model, "max_seq_len", None)
    return own if isinstance(own, int) and not isinstance(own, bool) and own > 0 else None
