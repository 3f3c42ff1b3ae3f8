"""Generation: a batched decode loop over a dispatched causal LM, with its KV cache on the execution device.

The loop calls the model's own forward, so every step runs through bigjob's dispatch hooks
(offloaded weights are brought in just in time, as for any forward pass):

1. **prefill**: the left-padded prompts ``(B, T)`` with their attention mask and position
   ids counted over real tokens only, ``use_cache=True`` (the model makes its KV cache); the logits of the last position
   choose the first new token;
2. **decode**: one token per row per step, the mask grown by one column, the cache passed
   back; a row that produced an end-of-sequence id is finished and gets padding after it;
   the loop ends when every row is finished or has ``max_new_tokens`` new tokens.

Greedy decoding takes the arg-max, as Transformers' ``generate(do_sample=False)`` does, so
its tokens equal those of ``generate`` on the same model in RAM. Sampling divides the
logits by ``temperature``, keeps the ``top_k`` most likely tokens (0: all) and the
smallest set holding ``top_p`` of the probability, and draws with a seeded generator.

>>> logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
>>> choose_next(logits, Decoding("greedy")).tolist()
[1]
>>> filtered = filter_logits(logits, Decoding("sample", top_k=2))
>>> torch.isinf(filtered).tolist()
[[True, False, True, False]]
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bigjob.engine.run.dispatch_info import execution_tokens
from bigjob.errors import JobError
from bigjob.job.data import Batch
from bigjob.job.schema import TaskConfig
from bigjob.job.tasks import BatchResult, Task

__all__ = ["Decoding", "GenerateTask", "Generation", "cache_argument", "choose_next", "filter_logits", "generate", "left_pad"]


@dataclass(frozen=True)
class Decoding:
    """How the next token is chosen: ``greedy`` (arg-max) or ``sample`` (temperature, top-k, top-p)."""

    name: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class Generation:
    """New tokens per row (through the end-of-sequence id when a row stopped there) and timings."""

    tokens: list[list[int]]
    finish_reasons: list[str]  # "eos" | "length"
    prefill_seconds: float  # the prompt's forward pass and the choice of the first new token
    decode_seconds: float  # every later step
    steps: int = 0


def left_pad(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(B, T)`` ids and mask moved to the left: every prompt ends at the last column.

    >>> ids, mask = left_pad(torch.tensor([[5, 6, 7], [8, 0, 0]]), torch.tensor([[1, 1, 1], [1, 0, 0]]), pad_id=9)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [9, 9, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    ids = torch.full_like(input_ids, pad_id)
    mask = torch.zeros_like(attention_mask)
    width = input_ids.shape[1]
    for row in range(input_ids.shape[0]):
        real = input_ids[row][attention_mask[row].bool()]
        ids[row, width - len(real) :] = real
        mask[row, width - len(real) :] = 1
    return ids, mask


def filter_logits(logits: torch.Tensor, decoding: Decoding) -> torch.Tensor:
    """``(B, V)`` logits with the tokens sampling may not draw set to ``-inf`` (after temperature)."""
    logits = logits / decoding.temperature
    if 0 < decoding.top_k < logits.shape[-1]:
        kth = logits.topk(decoding.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if decoding.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        # Drop a token once the ones before it already hold top_p; the most likely always stays.
        drop = probs.cumsum(-1) - probs > decoding.top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def choose_next(logits: torch.Tensor, decoding: Decoding, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row, ``(B,)``, from the last position's ``(B, V)`` logits."""
    if decoding.name == "greedy":
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float(), decoding).softmax(-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _forward_args(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def cache_argument(model: nn.Module) -> str:
    """The name under which the model's forward takes its KV cache; a JobError naming task.name when it has none."""
    accepted = _forward_args(model)
    # Transformers 5 calls the KV cache `cache`; earlier releases `past_key_values`.
    name = next((name for name in ("cache", "past_key_values") if name in accepted), None)
    if name is None or "use_cache" not in accepted:
        raise JobError(
            f"task.name=generate needs a causal LM with a KV cache (a forward taking `cache` or `past_key_values`, as "
            f"Transformers models do: model=hf); {type(model).__name__} has none; choose task.name=logits, score or embed"
        )
    return name


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    decoding: Decoding = Decoding(),
    eos_ids: list[int] | None = None,
    pad_id: int = 0,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
) -> Generation:
    """Continue left-padded prompts ``(B, T)``; the model must take ``past_key_values`` (a Transformers causal LM)."""
    accepted = _forward_args(model)
    cache_arg = cache_argument(model)
    device = torch.device(device)
    ids = input_ids.to(device)
    mask = attention_mask.to(device)
    # Positions count real tokens only, so a left-padded prompt sees the positions it would see alone.
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    eos = torch.tensor(sorted(set(eos_ids or ())), dtype=torch.long, device=device)
    batch = ids.shape[0]
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    new_tokens: list[torch.Tensor] = []
    extra: dict[str, Any] = {"use_cache": True}
    if "logits_to_keep" in accepted:
        extra["logits_to_keep"] = 1  # only the last position's logits are needed (as generate does)
    with_positions = "position_ids" in accepted

    started = time.perf_counter()
    prefill_seconds = 0.0
    cache = None
    step_ids = ids
    step_positions = positions
    # One execution decision for the whole generation (prompt and every step), from the average
    # tokens per forward: a layer that switched device between steps would leave its KV cache behind.
    per_forward = (ids.numel() + batch * max(max_new_tokens - 1, 0)) // max(max_new_tokens, 1)
    with torch.no_grad(), execution_tokens(model, per_forward):
        for step in range(max_new_tokens):
            kwargs = dict(extra, attention_mask=mask)
            kwargs[cache_arg] = cache
            if with_positions:
                kwargs["position_ids"] = step_positions
            output = model(input_ids=step_ids, **kwargs)
            cache = getattr(output, cache_arg)  # stays where the attention layers computed it
            if step == 0:
                extra.pop("logits_to_keep", None)  # later steps feed one token: nothing to trim
            chosen = choose_next(output.logits[:, -1, :].float(), decoding, generator)
            chosen = torch.where(unfinished, chosen, torch.full_like(chosen, pad_id))
            new_tokens.append(chosen)
            if eos.numel():
                unfinished &= ~torch.isin(chosen, eos)
            done = not bool(unfinished.any())  # also waits for the device: the timings below are honest
            if step == 0:
                prefill_seconds = time.perf_counter() - started
            if done:
                break
            step_ids = chosen[:, None]
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=-1)
            step_positions = step_positions[:, -1:] + 1
    decode_seconds = time.perf_counter() - started - prefill_seconds

    table = torch.stack(new_tokens, dim=1).tolist()  # (B, steps)
    eos_set = set(eos.tolist())
    tokens, reasons = [], []
    for row in table:
        end = next((i for i, token in enumerate(row) if token in eos_set), None)
        tokens.append(row if end is None else row[: end + 1])
        reasons.append("length" if end is None else "eos")
    return Generation(tokens, reasons, prefill_seconds, decode_seconds, len(new_tokens))


@dataclass
class _Counters:
    prompt_tokens: int = 0
    new_tokens: int = 0
    first_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stops: dict[str, int] = field(default_factory=dict)


class GenerateTask(Task):
    """Text and token ids generated for each prompt of a batch; prefill and decode throughput in ``metrics()``."""

    name = "generate"

    def __init__(self, cfg: TaskConfig, tokenizer: Any = None) -> None:
        super().__init__(cfg, tokenizer)  # a TokenizerRef, or None: records then carry token ids only
        self.decoding = Decoding(cfg.decoding, cfg.temperature, cfg.top_k, cfg.top_p)
        self.counters = _Counters()

    def check(self, model: nn.Module) -> None:
        cache_argument(model)

    def forward_for(self, model: nn.Module, batch_shape: tuple[int, int]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """A prefill as long as prompt and new tokens together: the KV cache at its largest, plus a prefill's activations."""
        rows, tokens = batch_shape
        ids = torch.zeros(rows, tokens + self.cfg.max_new_tokens, dtype=torch.long, device="meta")
        kwargs: dict[str, Any] = {"attention_mask": torch.ones_like(ids), "use_cache": True}
        if "logits_to_keep" in _forward_args(model):
            kwargs["logits_to_keep"] = 1
        return (), {"input_ids": ids, **kwargs}

    def run(self, model: nn.Module, batch: Batch, device: str) -> BatchResult:
        from bigjob.models.hf_tokens import generation_ids

        tokenizer = self.tokenizer.maybe() if self.tokenizer is not None else None
        eos_ids, pad_id = generation_ids(model, tokenizer)
        pad_id = pad_id if pad_id is not None else (eos_ids[0] if eos_ids else 0)
        ids, mask = left_pad(batch.input_ids, batch.attention_mask, pad_id)
        generator = None
        if self.decoding.name == "sample":
            # Seeded per batch: a resumed job draws exactly what an uninterrupted one would.
            generator = torch.Generator(device=device).manual_seed(self.cfg.seed + batch.index)
        result = generate(model, ids, mask, self.cfg.max_new_tokens, self.decoding, eos_ids, pad_id, device, generator)
        records = []
        for row, sample_id in enumerate(batch.sample_ids):
            tokens = result.tokens[row]
            text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None
            records.append(
                {
                    "id": sample_id,
                    "prompt_tokens": int(batch.attention_mask[row].sum()),
                    "token_ids": tokens,
                    "text": text,
                    "finish_reason": result.finish_reasons[row],
                }
            )
        counters = self.counters
        counters.prompt_tokens += batch.num_tokens
        counters.new_tokens += sum(len(t) for t in result.tokens)
        counters.first_tokens += len(result.tokens)
        counters.prefill_seconds += result.prefill_seconds
        counters.decode_seconds += result.decode_seconds
        for reason in result.finish_reasons:
            counters.stops[reason] = counters.stops.get(reason, 0) + 1
        return BatchResult(records)

    def metrics(self) -> dict[str, Any]:
        """Prefill: prompt tokens per second of the prompts' forward passes (first new token included).
        Decode: new tokens after the first per second of the later steps. Counts this session only."""
        c = self.counters

        def rate(tokens: int, seconds: float) -> float | None:
            return tokens / seconds if seconds > 0 else None

        return {
            "prompt_tokens": c.prompt_tokens,
            "new_tokens": c.new_tokens,
            "prefill_seconds": c.prefill_seconds,
            "decode_seconds": c.decode_seconds,
            "prefill_tokens_per_s": rate(c.prompt_tokens, c.prefill_seconds),
            "decode_tokens_per_s": rate(c.new_tokens - c.first_tokens, c.decode_seconds),
            "finish_reasons": dict(c.stops),
        }
