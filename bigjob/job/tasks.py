"""What a job computes on each batch: top-k logits, sequence scores or pooled embeddings.

A task turns one forward pass into per-sample JSON records (one line each in
``predictions.jsonl``) and, optionally, tensors written as one safetensors file per batch.
Padding never leaks into a result: only positions whose attention mask is 1 count.

New tasks (generation arrives with the Hugging Face adapter) subclass :class:`Task` and
register in :data:`TASKS`.

>>> from bigjob.models.demo import DemoTransformer
>>> from bigjob.job.data import make_batches
>>> from bigjob.job.schema import TaskConfig
>>> model = DemoTransformer(vocab_size=32, d_model=8, n_layers=1, n_heads=2, d_ff=16).eval()
>>> batch = make_batches([[1, 2, 3], [4, 5]], batch_size=2, pad_id=0)[0]
>>> result = build_task(TaskConfig(name="score")).run(model, batch, "cpu")
>>> [r["tokens_scored"] for r in result.records]
[2, 1]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bigjob.errors import ConfigError, JobError
from bigjob.job.data import Batch
from bigjob.job.schema import TaskConfig

__all__ = ["BatchResult", "EmbedTask", "LogitsTask", "ScoreTask", "TASKS", "Task", "build_task", "model_outputs"]


@dataclass
class BatchResult:
    """Per-sample JSON records and optional per-batch tensors."""

    records: list[dict[str, Any]]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _accepts_attention_mask(model: nn.Module) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "attention_mask" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _field(output: Any, name: str, position: int) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output if position == 0 else None
    if isinstance(output, dict):
        return output.get(name)
    if hasattr(output, name):
        return getattr(output, name)
    if isinstance(output, (tuple, list)) and len(output) > position:
        return output[position]
    return None


def model_outputs(model: nn.Module, batch: Batch, device: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(logits (B, T, V), last hidden state (B, T, C))`` of a forward pass, on the CPU.

    Models may return a dict, an object with attributes, a tuple ``(logits, hidden)`` or
    a bare logits tensor; what a model does not give is None.
    """
    ids = batch.input_ids.to(device)
    kwargs = {"attention_mask": batch.attention_mask.to(device)} if _accepts_attention_mask(model) else {}
    with torch.no_grad():
        output = model(ids, **kwargs)
    logits = _field(output, "logits", 0)
    hidden = _field(output, "last_hidden_state", 1)
    return (logits.cpu() if logits is not None else None, hidden.cpu() if hidden is not None else None)


class Task:
    """One batch in, records (and tensors) out."""

    name = ""

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg

    def run(self, model: nn.Module, batch: Batch, device: str) -> BatchResult:
        raise NotImplementedError

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
    """Log-likelihood of each sequence: sum over t of log p(x[t+1] | x[:t+1]), natural log."""

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
            total = float(token_lp[row][scored[row]].sum()) if n else 0.0
            records.append({"id": sample_id, "tokens_scored": n, "log_likelihood": total, "mean_log_likelihood": total / n if n else None})
        return BatchResult(records)


class EmbedTask(Task):
    """The last hidden state pooled over real tokens: their mean, or the last one."""

    name = "embed"

    def run(self, model: nn.Module, batch: Batch, device: str) -> BatchResult:
        hidden = self._need(model_outputs(model, batch, device)[1], "last hidden state").float()  # (B, T, C)
        mask = batch.attention_mask.bool()
        records = []
        for row, sample_id in enumerate(batch.sample_ids):
            real = hidden[row][mask[row]]  # (n, C)
            vector = real.mean(0) if self.cfg.pooling == "mean" else real[-1]
            records.append({"id": sample_id, "embedding": vector.tolist()})
        return BatchResult(records)


TASKS: dict[str, Callable[[TaskConfig], Task]] = {"logits": LogitsTask, "score": ScoreTask, "embed": EmbedTask}


def build_task(cfg: TaskConfig) -> Task:
    """The task named by ``task.name``."""
    if cfg.name not in TASKS:
        raise ConfigError(f"task.name={cfg.name!r} is not available; choose one of {', '.join(TASKS)}")
    return TASKS[cfg.name](cfg)
