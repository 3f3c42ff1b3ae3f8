"""What a job computes on each batch: top-k logits, sequence scores or pooled embeddings.

A task turns one forward pass into per-sample JSON records (one line each in
``predictions.jsonl``) and, optionally, tensors written as one safetensors file per batch.
Padding never leaks into a result: only positions whose attention mask is 1 count.

New tasks subclass :class:`Task` and register in :mod:`bigjob.job.task_registry`;
generation lives in :mod:`bigjob.job.generate`.

>>> from bigjob.models.demo import DemoTransformer
>>> from bigjob.job.data import make_batches
>>> from bigjob.job.schema import TaskConfig
>>> model = DemoTransformer(vocab_size=32, d_model=8, n_layers=1, n_heads=2, d_ff=16).eval()
>>> batch = make_batches([[1, 2, 3], [4, 5]], batch_size=2, pad_id=0)[0]
>>> result = ScoreTask(TaskConfig(name="score")).run(model, batch, "cpu")
>>> [r["tokens_scored"] for r in result.records]
[2, 1]
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bigjob.errors import JobError
from bigjob.job.data import Batch
from bigjob.job.schema import TaskConfig

__all__ = ["BatchResult", "EmbedTask", "LogitsTask", "ScoreTask", "Task", "model_outputs"]


@dataclass
class BatchResult:
    """Per-sample JSON records and optional per-batch tensors."""

    records: list[dict[str, Any]]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _forward_params(model: nn.Module) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}


def _accepts(model: nn.Module, name: str) -> bool:
    params = _forward_params(model)
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _accepts_attention_mask(model: nn.Module) -> bool:
    return _accepts(model, "attention_mask")


def _has_lm_head(model: nn.Module) -> bool:
    """Whether a Transformers model ends in an output head (``get_output_embeddings``)."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return callable(getter) and getter() is not None
    except (AttributeError, NotImplementedError):
        return False


def _field(output: Any, name: str, position: int) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output if position == 0 else None
    if isinstance(output, dict):
        return output.get(name)
    if hasattr(output, name):
        return getattr(output, name)
    if isinstance(output, (tuple, list)) and 0 <= position < len(output):
        return output[position]
    return None


def forward_inputs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden_states: bool = False
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The ids and keyword arguments :func:`model_outputs` calls ``model`` with."""
    kwargs: dict[str, Any] = {"attention_mask": attention_mask} if _accepts_attention_mask(model) else {}
    if "use_cache" in _forward_params(model):
        kwargs["use_cache"] = False  # one forward pass: a KV cache would only cost memory
    if hidden_states and _has_lm_head(model) and _accepts(model, "output_hidden_states"):
        kwargs["output_hidden_states"] = True  # a causal LM returns logits, not its last hidden state
    return input_ids, kwargs


def model_outputs(model: nn.Module, batch: Batch, device: str, hidden_states: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(logits (B, T, V), last hidden state (B, T, C))`` of a forward pass, on the CPU.

    Models may return a dict, an object with attributes, a tuple ``(logits, hidden)`` or
    a bare logits tensor; what a model does not give is None. With ``hidden_states`` a
    model that takes ``output_hidden_states`` (Transformers) is asked for them, and the
    last one stands in for a missing ``last_hidden_state`` (causal LMs).
    """
    ids, kwargs = forward_inputs(model, batch.input_ids.to(device), batch.attention_mask.to(device), hidden_states)
    with torch.no_grad():
        output = model(ids, **kwargs)
    logits = _field(output, "logits", 0)
    hidden = _field(output, "last_hidden_state", 1)
    if hidden is None and hidden_states:
        states = _field(output, "hidden_states", -1)
        hidden = states[-1] if isinstance(states, (tuple, list)) and states else None
    return (logits.cpu() if logits is not None else None, hidden.cpu() if hidden is not None else None)


class Task:
    """One batch in, records (and tensors) out."""

    name = ""

    def __init__(self, cfg: TaskConfig, tokenizer: Any = None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer  # a bigjob.job.text.TokenizerRef for models that have one

    def check(self, model: nn.Module) -> None:
        """Raise before any work (planning, caching, loading) when this task cannot run on ``model``."""

    def run(self, model: nn.Module, batch: Batch, device: str) -> BatchResult:
        raise NotImplementedError

    def metrics(self) -> dict[str, Any]:
        """Task-specific figures for ``metrics.json`` (``task_metrics``), e.g. generation throughput."""
        return {}

    def forward_for(self, model: nn.Module, batch_shape: tuple[int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` of the largest forward this task makes for a batch of that ``(rows, tokens)`` shape.

        On ``meta`` tensors: what ``placement.working_memory=auto`` estimates the working memory of.
        """
        ids = torch.zeros(batch_shape, dtype=torch.long, device="meta")
        ids, kwargs = forward_inputs(model, ids, torch.ones_like(ids), hidden_states=self.name == "embed")
        return (ids,), kwargs

    def _need(self, value: torch.Tensor | None, what: str) -> torch.Tensor:
        if value is None:
            raise JobError(f"task.name={self.name} needs the model's {what}, but its forward did not return them; choose another task.name")
        return value


class LogitsTask(Task):
    """Top-k logit ids and values at each real position; optionally every logit as a tensor."""

    name = "logits"

    def run(self, model: nn.Module, batch: Batch, device: str) -> BatchResult:
        logits = self._need(model_outputs(model, batch, device)[0], "logits")  # (B, T, V)
        k = min(self.cfg.top_k, logits.shape[-1])
        top = logits.float().topk(k, dim=-1)
        records = []
        for row, sample_id in enumerate(batch.sample_ids):
            valid = batch.attention_mask[row].bool()
            records.append(
                {
                    "id": sample_id,
                    "tokens": int(valid.sum()),
                    "top_ids": top.indices[row][valid].tolist(),
                    "top_values": top.values[row][valid].tolist(),
                }
            )
        tensors = {}
        if self.cfg.full_logits:
            tensors = {"logits": logits.contiguous(), "attention_mask": batch.attention_mask, "sample_ids": torch.tensor(batch.sample_ids)}
        return BatchResult(records, tensors)


class ScoreTask(Task):
    """Log-likelihood of each sequence: sum over t of log p(x[t+1] | x[:t+1]), natural log.

    ``token_logprobs[i]`` is log p of token i+1 given the tokens before it (the first token has none).
    """

    name = "score"

    def run(self, model: nn.Module, batch: Batch, device: str) -> BatchResult:
        logits = self._need(model_outputs(model, batch, device)[0], "logits")  # (B, T, V)
        logprobs = logits[:, :-1].float().log_softmax(-1)  # predicts tokens 1..T-1
        targets = batch.input_ids[:, 1:]
        token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        scored = (batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).bool()
        records = []
        for row, sample_id in enumerate(batch.sample_ids):
            n = int(scored[row].sum())
            per_token = token_lp[row][scored[row]]
            total = float(per_token.sum()) if n else 0.0
            records.append(
                {
                    "id": sample_id,
                    "tokens_scored": n,
                    "log_likelihood": total,
                    "mean_log_likelihood": total / n if n else None,
                    "token_logprobs": per_token.tolist(),
                }
            )
        return BatchResult(records)


class EmbedTask(Task):
    """The last hidden state pooled over real tokens: their mean, the last one or the first (``cls``); optionally unit length."""

    name = "embed"

    def run(self, model: nn.Module, batch: Batch, device: str) -> BatchResult:
        hidden = self._need(model_outputs(model, batch, device, hidden_states=True)[1], "last hidden state").float()  # (B, T, C)
        mask = batch.attention_mask.bool()
        records = []
        for row, sample_id in enumerate(batch.sample_ids):
            real = hidden[row][mask[row]]  # (n, C)
            vector = {"mean": lambda: real.mean(0), "last": lambda: real[-1], "cls": lambda: real[0]}[self.cfg.pooling]()
            if self.cfg.normalize:
                vector = torch.nn.functional.normalize(vector, dim=0)
            records.append({"id": sample_id, "embedding": vector.tolist()})
        return BatchResult(records)
