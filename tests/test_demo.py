"""The demo model and its seeded, sharded checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import pytest
import torch
from safetensors import safe_open

from _jobkit import TINY, reference_model
from bigjob.models.demo import (
    INDEX_NAME,
    MARKER_NAME,
    DemoTransformer,
    demo_checkpoint_spec,
    demo_tensor,
    make_demo_checkpoint,
)


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_default_size_is_50_to_100m_parameters_and_blocks_are_the_unit():
    with torch.device("meta"):
        model = DemoTransformer()
    n = sum(p.numel() for p in model.parameters())  # the tied head counts once
    assert 50e6 <= n <= 100e6
    assert model.lm_head.weight is model.embed.weight
    assert sum(isinstance(m, type(model.blocks[0])) for m in model.modules()) == 16
    # The rotary table is a buffer but never part of a checkpoint.
    assert "rotary.cos" in dict(model.named_buffers()) and "rotary.cos" not in model.state_dict()


def test_forward_returns_logits_and_hidden_state():
    model = DemoTransformer(**TINY).eval()
    out = model(torch.randint(0, 64, (3, 7)))
    assert out["logits"].shape == (3, 7, 64) and out["last_hidden_state"].shape == (3, 7, 16)
    # Tied head: logits are the final hidden state times the embedding table.
    torch.testing.assert_close(out["logits"], out["last_hidden_state"] @ model.embed.weight.T)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_mask_gives_the_same_outputs_as_the_sequence_alone(side):
    torch.manual_seed(0)
    model = DemoTransformer(**TINY).eval()
    short, long = torch.randint(1, 64, (5,)), torch.randint(1, 64, (9,))
    pad = torch.zeros(4, dtype=torch.long)
    if side == "right":
        ids = torch.stack([torch.cat([short, pad]), long])
        mask = torch.tensor([[1] * 5 + [0] * 4, [1] * 9])
        real = slice(0, 5)
    else:
        ids = torch.stack([torch.cat([pad, short]), long])
        mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
        real = slice(4, 9)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        alone = model(short[None])
        alone_long = model(long[None])
    torch.testing.assert_close(batched["logits"][0, real], alone["logits"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched["logits"][1], alone_long["logits"][0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(batched["logits"]).all()  # pad rows never have an empty softmax


def test_checkpoint_is_deterministic_sharded_and_matches_the_spec(tmp_path):
    a = make_demo_checkpoint(tmp_path / "a", TINY, seed=3, num_shards=3)
    b = make_demo_checkpoint(tmp_path / "b", TINY, seed=3, num_shards=3)
    assert a.name == b.name and _digests(a) == _digests(b)
    c = make_demo_checkpoint(tmp_path / "c", TINY, seed=4, num_shards=3)
    assert c.name != a.name and _digests(c) != _digests(a)

    index = json.loads((a / INDEX_NAME).read_text())
    shards = sorted({f for f in index["weight_map"].values()})
    assert len(shards) == 3 and shards == sorted(p.name for p in a.glob("*.safetensors"))
    spec = dict(demo_checkpoint_spec(TINY))
    assert set(index["weight_map"]) == set(spec)  # every parameter exactly once, the tied head as embed.weight
    total = 0
    for shard in shards:
        with safe_open(str(a / shard), "pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                assert index["weight_map"][name] == shard
                assert tuple(tensor.shape) == spec[name]
                assert torch.equal(tensor, demo_tensor(name, spec[name], seed=3, n_layers=TINY["n_layers"]))
                total += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == total


def test_checkpoint_is_reused_when_complete_and_rebuilt_when_not(tmp_path):
    folder = make_demo_checkpoint(tmp_path, TINY, seed=0, num_shards=2)
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert make_demo_checkpoint(tmp_path, TINY, seed=0, num_shards=2) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp  # not rewritten

    (folder / MARKER_NAME).write_text("{}")  # a marker that does not match: never trusted
    shard = next(folder.glob("*.safetensors"))
    shard.write_bytes(b"garbage")
    again = make_demo_checkpoint(tmp_path, TINY, seed=0, num_shards=2)
    assert again == folder and shard.read_bytes() != b"garbage"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_checkpoint_loads_into_the_model_and_runs(tmp_path):
    folder = make_demo_checkpoint(tmp_path, TINY, seed=0)
    model = reference_model(folder)
    out = model(torch.tensor([[1, 2, 3, 4]]))["logits"]
    assert torch.isfinite(out).all() and 0.1 < out.std() < 10  # sane scale, not saturated


def test_concurrent_builders_agree(tmp_path):
    results, errors = [], []

    def build():
        try:
            results.append(make_demo_checkpoint(tmp_path, TINY, seed=5, num_shards=2))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert _digests(results[0]) == _digests(make_demo_checkpoint(tmp_path / "solo", TINY, seed=5, num_shards=2))


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_default_checkpoint_is_written_shard_by_shard_quickly(tmp_path):
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.005):
            peak[0] = max(peak[0], _rss_anon())

    base = _rss_anon()
    thread = threading.Thread(target=sample)
    thread.start()
    start = time.perf_counter()
    folder = make_demo_checkpoint(tmp_path)  # the default 217 MB model, 4 shards
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    total = json.loads((folder / INDEX_NAME).read_text())["metadata"]["total_size"]
    assert total > 200e6 and len(list(folder.glob("*.safetensors"))) == 4
    assert peak[0] - base < 0.6 * total  # about one shard (a quarter) in RAM, never the whole model
    assert seconds < 20
