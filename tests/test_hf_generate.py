"""Generation and scores on Transformers models dispatched by bigjob, against Transformers alone in RAM."""

from __future__ import annotations

import pytest
import torch

from _hfkit import EOS, PAD, hf_greedy, hf_models, left_padded, reference  # noqa: F401  (hf_models is a fixture)
from bigjob import get_dispatch_info
from bigjob.errors import JobError
from bigjob.job.data import make_batches
from bigjob.job.generate import Decoding, filter_logits, generate
from bigjob.job.schema import TaskConfig
from bigjob.job.task_registry import build_task
from bigjob.models.hf import from_pretrained

PROMPTS = [[1, 5, 9, 22, 7], [1, 30, 4, 4, 17, 8, 40, 12, 3], [1, 11], [1, 50, 6, 19, 2, 33, 9]]  # uneven: left padding


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, hf_models):
    """(bigjob's model with most layers on disk, Transformers' own in RAM)."""
    folder = hf_models[request.param]
    model = from_pretrained(folder, max_memory={"cpu": "150KB"})
    assert get_dispatch_info(model).bytes_per_tier.get("disk", 0) > 0  # the test must exercise offload
    return model, reference(folder)


def test_greedy_tokens_equal_transformers_generate(pair):
    model, ref = pair
    ids, mask = left_padded(PROMPTS)
    ours = generate(model, ids, mask, max_new_tokens=12, eos_ids=[EOS], pad_id=PAD)
    assert ours.tokens == hf_greedy(ref, PROMPTS, 12)
    assert ours.prefill_seconds > 0 and ours.decode_seconds > 0


def test_generation_pins_one_execution_decision_for_all_its_forwards(hf_models):
    # With execution="auto" each forward would pick stream or local from its own token count (a
    # long prompt, then one token a row); a generation instead decides once, from the average
    # tokens per forward, so no layer leaves its KV cache on the other device between steps.
    folder = hf_models["llama"]
    model = from_pretrained(folder, max_memory={"cpu": "150KB"}, execution="auto")
    schedule = get_dispatch_info(model).schedule
    seen = []
    probe = model.register_forward_pre_hook(lambda module, args: seen.append(schedule.tokens))  # after the root hook
    try:
        ids, mask = left_padded(PROMPTS)
        steps = 6
        ours = generate(model, ids, mask, max_new_tokens=steps, eos_ids=[], pad_id=PAD)
    finally:
        probe.remove()
    batch, width = ids.shape
    assert seen == [(batch * width + batch * (steps - 1)) // steps] * steps
    assert ours.tokens == hf_greedy(reference(folder), PROMPTS, steps, eos=None)
    model(ids[:, :2])  # outside a generation each forward counts its own tokens again
    assert schedule.tokens == batch * 2 and schedule.pinned is None


def test_greedy_stops_at_eos_like_transformers(pair):
    model, ref = pair
    free = hf_greedy(ref, PROMPTS, 10, eos=None)
    eos = free[1][3]  # a token the second prompt produces: it must stop there, the others go on or stop too
    ids, mask = left_padded(PROMPTS)
    ours = generate(model, ids, mask, max_new_tokens=10, eos_ids=[eos], pad_id=PAD)
    assert ours.tokens == hf_greedy(ref, PROMPTS, 10, eos=eos)
    assert ours.finish_reasons[1] == "eos" and ours.tokens[1][-1] == eos and len(ours.tokens[1]) <= 4


def test_generate_task_records_and_metrics(pair):
    model, ref = pair
    task = build_task(TaskConfig(name="generate", max_new_tokens=6))
    batch = make_batches([p[:] for p in PROMPTS], batch_size=4, pad_id=PAD)[0]  # right-padded, as the runner makes them
    result = task.run(model, batch, "cpu")
    assert [r["token_ids"] for r in result.records] == hf_greedy(ref, PROMPTS, 6)
    assert [r["prompt_tokens"] for r in result.records] == [len(p) for p in PROMPTS]
    assert all(r["text"] is None for r in result.records)  # no tokenizer given: ids only
    metrics = task.metrics()
    assert metrics["prompt_tokens"] == sum(map(len, PROMPTS)) and metrics["prefill_tokens_per_s"] > 0
    assert metrics["decode_tokens_per_s"] is None or metrics["decode_tokens_per_s"] > 0


def test_sampling_is_seeded_and_degenerates_to_greedy(pair):
    model, _ = pair
    ids, mask = left_padded(PROMPTS)

    def sample(seed: int, **kw) -> list[list[int]]:
        gen = torch.Generator().manual_seed(seed)
        return generate(model, ids, mask, 8, Decoding("sample", **kw), eos_ids=[], pad_id=PAD, generator=gen).tokens

    assert sample(3, temperature=1.5) == sample(3, temperature=1.5)
    assert sample(3, temperature=1.5) != sample(4, temperature=1.5)
    greedy = generate(model, ids, mask, 8, Decoding("greedy"), eos_ids=[], pad_id=PAD).tokens
    assert sample(5, top_k=1) == greedy
    assert sample(6, top_p=1e-6) == greedy


def test_scores_equal_transformers_within_1e_5(pair):
    model, ref = pair
    batch = make_batches(PROMPTS, batch_size=4, pad_id=PAD)[0]
    records = build_task(TaskConfig(name="score")).run(model, batch, "cpu").records
    for ids, record in zip(PROMPTS, records):
        with torch.no_grad():
            logits = ref(torch.tensor([ids])).logits[0].double()
        expected = logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert record["tokens_scored"] == len(ids) - 1
        torch.testing.assert_close(torch.tensor(record["token_logprobs"], dtype=torch.float64), expected, rtol=0, atol=1e-5)
        assert abs(record["log_likelihood"] - float(expected.sum())) < 1e-5 * len(ids)


def test_filters_keep_the_most_likely_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    probs = logits.softmax(-1)[0]
    kept = ~torch.isinf(filter_logits(logits, Decoding("sample", top_p=float(probs[0] + probs[1] / 2))))
    assert kept.tolist() == [[True, True, False, False]]  # the smallest set holding top_p
    assert (~torch.isinf(filter_logits(logits, Decoding("sample", top_k=3)))).sum() == 3
    torch.testing.assert_close(filter_logits(logits, Decoding("sample", temperature=2.0)), logits / 2)


def test_generate_refuses_a_model_without_a_kv_cache():
    model = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8))
    with pytest.raises(JobError, match="task.name"):
        generate(model, torch.tensor([[1, 2]]), torch.tensor([[1, 1]]), 2)


def test_embed_of_a_causal_lm_pools_its_last_hidden_state(pair):
    model, ref = pair
    batch = make_batches(PROMPTS, batch_size=4, pad_id=PAD)[0]
    records = build_task(TaskConfig(name="embed", pooling="last")).run(model, batch, "cpu").records
    for ids, record in zip(PROMPTS, records):
        with torch.no_grad():
            expected = ref(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
        torch.testing.assert_close(torch.tensor(record["embedding"]), expected, rtol=0, atol=1e-5)
