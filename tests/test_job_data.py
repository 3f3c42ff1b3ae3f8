"""Data sources: JSONL, tensor files and seeded synthetic tokens; batching with padding."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from bigjob.errors import DataError
from bigjob.job.data import load_samples, make_batches
from bigjob.job.schema import DataConfig


def test_jsonl_lists_and_objects(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("[1, 2, 3]\n\n{\"input_ids\": [4, 5]}\n[6]\n")
    assert load_samples(DataConfig(source="jsonl", path=str(path)), vocab_size=10) == [[1, 2, 3], [4, 5], [6]]
    assert load_samples(DataConfig(source="jsonl", path=str(path), limit=2), vocab_size=10) == [[1, 2, 3], [4, 5]]


@pytest.mark.parametrize(
    "line,message",
    [
        ("[1, 2,", "not valid JSON"),
        ("[1, \"a\"]", "list of integer token ids"),
        ("[1, 99]", "token id 99 is outside"),
        ("[]", "empty token sequence"),
        ("{\"text\": \"hello\"}", "needs a tokenizer"),
        ("{\"ids\": [1]}", "input_ids"),
        ("[true]", "list of integer token ids"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("[1, 2]\n[3]\n" + line + "\n")
    with pytest.raises(DataError) as info:
        load_samples(DataConfig(source="jsonl", path=str(path)), vocab_size=10)
    text = str(info.value)
    assert str(path) in text and "line 3" in text and message in text and "\n" not in text


def test_missing_or_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_samples(DataConfig(source="jsonl", path=str(tmp_path / "none.jsonl")), vocab_size=10)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no samples"):
        load_samples(DataConfig(source="jsonl", path=str(tmp_path / "empty.jsonl")), vocab_size=10)


def test_safetensors_file_with_mask(tmp_path):
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    save_file({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}, str(tmp_path / "in.safetensors"))
    samples = load_samples(DataConfig(source="tensor", path=str(tmp_path / "in.safetensors")), vocab_size=10)
    assert samples == [[1, 2, 3], [4, 5]]


def test_pt_file_tensor_or_dict(tmp_path):
    torch.save(torch.tensor([[7, 8], [9, 1]]), tmp_path / "t.pt")
    assert load_samples(DataConfig(source="tensor", path=str(tmp_path / "t.pt")), vocab_size=10) == [[7, 8], [9, 1]]
    torch.save({"tokens": torch.tensor([[3, 4]])}, tmp_path / "d.pt")
    assert load_samples(DataConfig(source="tensor", path=str(tmp_path / "d.pt"), key="tokens"), vocab_size=10) == [[3, 4]]
    with pytest.raises(DataError, match="data.key"):
        load_samples(DataConfig(source="tensor", path=str(tmp_path / "d.pt")), vocab_size=10)
    torch.save(torch.ones(2, 2), tmp_path / "f.pt")
    with pytest.raises(DataError, match="integer tensor"):
        load_samples(DataConfig(source="tensor", path=str(tmp_path / "f.pt")), vocab_size=10)


def test_synthetic_is_seeded_and_in_range():
    cfg = DataConfig(num_samples=5, seq_len=9, min_seq_len=3, seed=7)
    a, b = load_samples(cfg, vocab_size=50), load_samples(cfg, vocab_size=50)
    assert a == b and len(a) == 5
    assert all(3 <= len(s) <= 9 and all(0 <= t < 50 for t in s) for s in a)
    assert len({len(s) for s in a}) > 1
    assert load_samples(DataConfig(num_samples=5, seq_len=9, min_seq_len=3, seed=8), vocab_size=50) != a


def test_batches_pad_right_and_cover_every_sample():
    samples = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10], [11]]
    batches = make_batches(samples, batch_size=2, pad_id=0)
    assert [b.sample_ids for b in batches] == [[0, 1], [2, 3], [4]]
    for batch in batches:
        for row, sid in enumerate(batch.sample_ids):
            n = len(samples[sid])
            assert batch.input_ids[row, :n].tolist() == samples[sid]
            assert batch.attention_mask[row].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
    assert sum(b.num_tokens for b in batches) == sum(map(len, samples))
    assert json.dumps(batches[0].sample_ids)
