"""Tasks against direct computations on each sample alone (no padding, no job machinery)."""

from __future__ import annotations

import pytest
import torch

from _jobkit import TINY
from bigjob.job.data import make_batches
from bigjob.job.schema import TaskConfig
from bigjob.job.task_registry import build_task
from bigjob.errors import ConfigError, JobError
from bigjob.models.demo import DemoTransformer

SAMPLES = [[5, 9, 2, 7, 1], [3, 3], [8, 1, 4]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DemoTransformer(**TINY).eval()


def alone(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))


def test_logits_top_k_matches_each_sample_alone(model):
    batch = make_batches(SAMPLES, batch_size=3, pad_id=0)[0]
    result = build_task(TaskConfig(name="logits", top_k=3)).run(model, batch, "cpu")
    assert [r["id"] for r in result.records] == [0, 1, 2]
    for record, ids in zip(result.records, SAMPLES):
        logits = alone(model, ids)["logits"][0]
        top = logits.topk(3, dim=-1)
        assert record["tokens"] == len(ids)
        assert record["top_ids"] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(record["top_values"]), top.values, rtol=1e-5, atol=1e-5)
    assert result.tensors == {}


def test_full_logits_are_returned_as_tensors(model):
    batch = make_batches(SAMPLES, batch_size=2, pad_id=0)[0]
    result = build_task(TaskConfig(name="logits", full_logits=True)).run(model, batch, "cpu")
    assert result.tensors["logits"].shape == (2, 5, TINY["vocab_size"])
    torch.testing.assert_close(result.tensors["logits"][1, :2], alone(model, SAMPLES[1])["logits"][0], rtol=1e-5, atol=1e-5)
    assert result.tensors["sample_ids"].tolist() == [0, 1]


def test_score_is_the_sum_of_next_token_log_probabilities(model):
    batch = make_batches(SAMPLES, batch_size=3, pad_id=0)[0]
    records = build_task(TaskConfig(name="score")).run(model, batch, "cpu").records
    for record, ids in zip(records, SAMPLES):
        logp = alone(model, ids)["logits"][0].log_softmax(-1)
        expected = sum(float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1))
        assert record["tokens_scored"] == len(ids) - 1
        assert record["log_likelihood"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert record["mean_log_likelihood"] == pytest.approx(expected / (len(ids) - 1), rel=1e-5, abs=1e-5)


def test_a_one_token_sequence_scores_nothing(model):
    batch = make_batches([[4]], batch_size=1, pad_id=0)[0]
    (record,) = build_task(TaskConfig(name="score")).run(model, batch, "cpu").records
    assert record["tokens_scored"] == 0 and record["log_likelihood"] == 0.0 and record["mean_log_likelihood"] is None


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embed_pools_real_tokens_only(model, pooling):
    batch = make_batches(SAMPLES, batch_size=3, pad_id=0)[0]
    records = build_task(TaskConfig(name="embed", pooling=pooling)).run(model, batch, "cpu").records
    for record, ids in zip(records, SAMPLES):
        hidden = alone(model, ids)["last_hidden_state"][0]
        expected = hidden.mean(0) if pooling == "mean" else hidden[-1]
        torch.testing.assert_close(torch.tensor(record["embedding"]), expected, rtol=1e-5, atol=1e-5)


def test_models_returning_a_bare_tensor_work_for_logits_but_not_embed():
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)

        def forward(self, input_ids):
            return self.emb(input_ids) @ self.emb.weight.T

    batch = make_batches([[1, 2]], batch_size=1, pad_id=0)[0]
    assert build_task(TaskConfig(name="logits", top_k=2)).run(Bare(), batch, "cpu").records[0]["tokens"] == 2
    with pytest.raises(JobError, match="task.name"):
        build_task(TaskConfig(name="embed")).run(Bare(), batch, "cpu")
    with pytest.raises(JobError, match="task.name"):  # no KV cache: not a Transformers causal LM
        build_task(TaskConfig(name="generate")).run(Bare(), batch, "cpu")
    with pytest.raises(ConfigError, match="task.name"):
        build_task(TaskConfig(name="summarize"))
