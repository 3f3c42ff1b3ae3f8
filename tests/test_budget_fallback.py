"""Budgets smaller than streaming with prefetch needs (issue 20): prefetch lowered, then streamed over the budget.

Every model here is also run fully in RAM by plain PyTorch (or Transformers) as the reference;
expected sizes come from the models' own parameters, never from literals. Each fallback is
said once by dispatch (INFO for lowered prefetch, a warning for a unit over the budget), and
``strict_budget=True`` keeps the old error.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bigjob.engine.plan.devices import format_size, parse_size
from bigjob.engine.run.dispatch_info import get_dispatch_info
from bigjob.engine.run.entry_points import load_checkpoint_and_dispatch
from bigjob.engine.plan.empty import init_empty_weights
from bigjob.engine.plan.resolution import infer_auto_device_map
from bigjob.engine.checkpoints.safetensors_writer import write_file
from bigjob.errors import BudgetError

sys.path.insert(0, str(Path(__file__).parent))
from _jobkit import TINY_OVERRIDES, compose_config, read_jsonl, reference_model  # noqa: E402

LOGGER = "bigjob.engine.run.dispatch"


def nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(b.numel() * b.element_size() for b in module.buffers())


def fallback_records(caplog: pytest.LogCaptureFixture) -> tuple[list[str], list[str]]:
    """The INFO lines about lowered prefetch and the warnings about streaming over budget that dispatch logged."""
    mine = [r for r in caplog.records if r.name == LOGGER]
    infos = [r.getMessage() for r in mine if r.levelno == logging.INFO and "prefetch lowered" in r.getMessage()]
    warnings = [r.getMessage() for r in mine if r.levelno == logging.WARNING and "one at a time" in r.getMessage()]
    return infos, warnings


def linears(tmp_path: Path, count: int) -> tuple[nn.Module, Path]:
    """``count`` Linear(1024, 1024) (about 4 MB each in float32) as a reference and its checkpoint."""
    torch.manual_seed(0)
    reference = nn.Linear(1024, 1024) if count == 1 else nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(count)])
    path = tmp_path / "model.safetensors"
    write_file(path, reference.state_dict())
    return reference.eval(), path


def dispatched(tmp_path: Path, path: Path, count: int, budget: str, **kwargs: object) -> nn.Module:
    with init_empty_weights():
        model = nn.Linear(1024, 1024) if count == 1 else nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(count)])
    return load_checkpoint_and_dispatch(model, path, max_memory={"cpu": budget}, offload_folder=tmp_path / "offload", **kwargs)


def test_a_linear_larger_than_the_budget_streams_anyway_and_warns_once(tmp_path, caplog):
    reference, path = linears(tmp_path, 1)
    size, budget = nbytes(reference), parse_size("2MB")
    assert budget < size  # the premise: the one unit does not fit the budget even once
    caplog.set_level(logging.INFO, logger="bigjob")
    model = dispatched(tmp_path, path, 1, "2MB")
    x = torch.randn(5, 1024, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for _ in range(3):  # said at dispatch, never per forward
            assert torch.equal(model(x), reference(x))
    infos, warnings = fallback_records(caplog)
    assert infos == [] and len(warnings) == 1, (infos, warnings)
    (warning,) = warnings
    assert f"({format_size(size)})" in warning and f"peaks at about {format_size(size)}" in warning
    assert f"over max_memory['cpu']={format_size(budget)}" in warning and f"max_memory['cpu']>={format_size(size)}" in warning
    assert "strict_budget=True" in warning and "\n" not in warning
    summary = get_dispatch_info(model).device_map.summary
    assert summary.over_budget == {"": size} and summary.streaming_peak == {"cpu": size}

    with pytest.raises(BudgetError) as info:
        dispatched(tmp_path, path, 1, "2MB", strict_budget=True)
    assert str(info.value) == (
        f"bringing offloaded module '' ({format_size(size)}) back needs {format_size(2 * size)} ((1 + prefetch=1) x its size) on cpu "
        f"(the execution device), but max_memory['cpu'] is {format_size(budget)}; raise max_memory['cpu'] or lower prefetch"
    )


def test_a_linear_within_the_budget_needs_no_fallback(tmp_path, caplog):
    reference, path = linears(tmp_path, 1)
    assert nbytes(reference) <= parse_size("6MB")
    caplog.set_level(logging.INFO, logger="bigjob")
    model = dispatched(tmp_path, path, 1, "6MB", strict_budget=True)  # strict or not: nothing to fall back from
    x = torch.randn(5, 1024)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert fallback_records(caplog) == ([], [])
    assert dict(get_dispatch_info(model).device_map) == {"": "cpu"}


def test_linears_that_fit_once_but_not_twice_lower_prefetch_and_say_so_once(tmp_path, caplog):
    reference, path = linears(tmp_path, 2)
    layer, budget = nbytes(reference[0]), parse_size("6MB")
    assert layer <= budget < 2 * layer and 2 * layer > budget  # one fits, two at a time do not; nor does the model
    caplog.set_level(logging.INFO, logger="bigjob")
    model = dispatched(tmp_path, path, 2, "6MB")
    x = torch.randn(4, 1024)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
        assert torch.equal(model(x), reference(x))
    infos, warnings = fallback_records(caplog)
    assert len(infos) == 1 and warnings == [], (infos, warnings)
    assert "'0', '1'" in infos[0] and "from 1 to 0" in infos[0] and f"max_memory['cpu']={format_size(budget)}" in infos[0]
    info = get_dispatch_info(model)
    summary = info.device_map.summary
    assert summary.solo_units == ["0", "1"] and summary.over_budget == {}
    assert summary.reserve["cpu"] == layer <= budget  # one layer in flight, within the budget
    assert info.schedule.solo == {0, 1}

    with pytest.raises(BudgetError, match=r"\(1 \+ prefetch=1\) x its size.*lower prefetch"):
        dispatched(tmp_path, path, 2, "6MB", strict_budget=True)


def test_only_the_units_too_big_for_prefetch_lose_it(tmp_path):
    """Small units keep being fetched ahead; nothing is fetched ahead into or during a unit brought alone."""
    torch.manual_seed(0)
    widths = [(64, 64), (64, 64), (64, 2048), (2048, 64), (64, 64), (64, 64)]  # two large layers between small ones
    make = lambda: nn.Sequential(*[nn.Linear(a, b) for a, b in widths])  # noqa: E731
    reference = make().eval()
    path = tmp_path / "model.safetensors"
    write_file(path, reference.state_dict())
    big, small = max(nbytes(reference[2]), nbytes(reference[3])), nbytes(reference[0])
    budget = big + small // 2  # the big ones fit once, not twice; small ones fit 1 + prefetch at a time
    assert 2 * min(nbytes(reference[2]), nbytes(reference[3])) > budget >= 2 * small
    with init_empty_weights():
        model = make()
    model = load_checkpoint_and_dispatch(model, path, max_memory={"cpu": budget}, offload_folder=tmp_path / "offload")
    info = get_dispatch_info(model)
    assert info.device_map.summary.solo_units == ["2", "3"]
    names = [unit.name for unit in info.schedule.units]
    solo = {names.index("2"), names.index("3")}
    assert info.schedule.solo == solo
    submitted: list[tuple[int, int]] = []  # (unit running, unit fetched ahead)
    running = [-1]
    original = info.schedule.ahead

    def ahead(position: int) -> None:
        running[0] = position
        original(position)

    submit = info.prefetcher.submit
    info.schedule.ahead = ahead  # type: ignore[method-assign]
    info.prefetcher.submit = lambda key, task, inline=False: (submitted.append((running[0], key)), submit(key, task, inline))  # type: ignore[method-assign]
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert all(key not in solo and position not in solo for position, key in submitted), submitted
    assert {key for _, key in submitted} == set(range(len(names))) - solo - {names.index("4")}  # "4" follows a solo unit


def llama(tmp_path: Path):
    """A 4-layer Llama built locally with layers of about 150 KB (float32), saved, and its reference in RAM."""
    import _hfkit as hfkit
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=hfkit.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    config.pad_token_id, config.bos_token_id, config.eos_token_id = hfkit.PAD, hfkit.BOS, hfkit.EOS
    folder = hfkit.write_model(tmp_path / "llama", config)
    return folder, hfkit.reference(folder)


def test_tiny_llama_generates_at_200kb_with_prefetch_lowered_for_its_layers(tmp_path, caplog):
    from bigjob.models.hf import from_pretrained

    folder, reference = llama(tmp_path)
    layer, budget = nbytes(reference.model.layers[0]), parse_size("200KB")
    assert layer <= budget < 2 * layer < nbytes(reference)
    caplog.set_level(logging.INFO, logger="bigjob")
    model = from_pretrained(folder, max_memory={"cpu": "200KB"}, offload_folder=tmp_path / "offload")
    ids = torch.tensor([[1, 5, 7, 9, 11], [1, 20, 21, 22, 23]])
    got = model.generate(ids, max_new_tokens=6, do_sample=False)
    expected = reference.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)
    infos, warnings = fallback_records(caplog)
    assert len(infos) == 1 and warnings == [], (infos, warnings)
    summary = get_dispatch_info(model).device_map.summary
    assert summary.solo_units == [f"model.layers.{i}" for i in range(4)] and summary.over_budget == {}
    assert all(f"'model.layers.{i}'" in infos[0] for i in range(4))
    assert summary.reserve["cpu"] + summary.planned_bytes.get("cpu", 0) <= budget

    with pytest.raises(BudgetError, match=r"model.layers.*\(1 \+ prefetch=1\) x its size.*max_memory\['cpu'\]"):
        from_pretrained(folder, max_memory={"cpu": "200KB"}, offload_folder=tmp_path / "offload", strict_budget=True)


def test_the_planner_records_the_fallback_as_data_and_logs_nothing(caplog):
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    layer = nbytes(model[0])
    caplog.set_level(logging.DEBUG, logger="bigjob")
    dm = infer_auto_device_map(model, {"cpu": layer + 1})
    assert caplog.records == []
    assert dm.summary.solo_units == ["0", "1"] and dm.summary.streaming_peak == {"cpu": layer}
    assert type(dm).from_json(dm.to_json()).summary == dm.summary  # the decisions round-trip with the plan
    with pytest.raises(BudgetError, match=r"lower prefetch"):
        infer_auto_device_map(model, {"cpu": layer + 1}, strict_budget=True)


# --------------------------------------------------------------------------- the job layer


def job(tmp_path: Path, *extra: str):
    from bigjob.job.runner import run_job

    cfg = compose_config(TINY_OVERRIDES + ["quiet=true", f"cache.dir={tmp_path / 'cache'}", "data.num_samples=4", "data.seq_len=10",
                                           "data.batch_size=2", *extra])
    run_dir = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}"
    return cfg, run_job(cfg, run_dir), run_dir


def test_a_job_streams_under_a_small_budget_by_default_and_strict_budget_makes_it_one_line_error(tmp_path, caplog):
    from bigjob.job.data import load_samples

    caplog.set_level(logging.INFO, logger="bigjob")
    # The demo blocks are 8,320 bytes in float32: 12 KiB holds one, not two at a time.
    cfg, report, run_dir = job(tmp_path, "placement.max_memory.cpu=12KiB")
    assert report.status == "completed"
    (checkpoint,) = (tmp_path / "cache" / "checkpoints").glob("demo-*")
    reference = reference_model(checkpoint)
    block = nbytes(reference.blocks[0])
    assert block <= 12 * 1024 < 2 * block
    for record, ids in zip(read_jsonl(run_dir / "predictions.jsonl"), load_samples(cfg.data, 64), strict=True):
        with torch.no_grad():
            top = reference(torch.tensor([ids]))["logits"][0].topk(5, dim=-1)
        assert record["top_ids"] == top.indices.tolist()
    infos, _ = fallback_records(caplog)
    assert len(infos) == 1

    with pytest.raises(BudgetError) as info:
        job(tmp_path, "placement.max_memory.cpu=12KiB", "placement.strict_budget=true")
    message = str(info.value)
    assert "\n" not in message and "placement.max_memory.cpu" in message and "placement.prefetch" in message, message


def test_on_a_gpu_every_streamed_unit_comes_alone_once_one_must(caplog):
    """A GPU's streaming buffers are shared by its units: planned for a GPU this machine need not have."""
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(128, 128))
    layer = nbytes(model[0])
    dm = infer_auto_device_map(model, {"cuda:0": layer + 100, "cpu": 10 * layer, "disk": 0})
    assert dm.summary.main_device == "cuda:0" and set(dm.values()) == {"cpu"}
    assert dm.summary.solo_units == ["0", "1", "2"] and dm.summary.over_budget == {}
    assert dm.summary.reserve == {"cuda:0": layer} and dm.summary.streaming_peak == {"cuda:0": layer}
    with pytest.raises(BudgetError, match=r"on cuda:0 \(the execution device\)"):
        infer_auto_device_map(model, {"cuda:0": layer + 100, "cpu": 10 * layer, "disk": 0}, strict_budget=True)


def test_minilm_at_40mib_streams_its_45mib_embeddings_and_equals_transformers_in_ram(caplog):
    """The issue's own case: all-MiniLM-L6-v2 offloaded with a CPU budget below its embeddings."""
    import _hfkit as hfkit
    import transformers

    from bigjob.models import hf_tokens
    from bigjob.models.hf import from_pretrained

    folder = hfkit.minilm_dir()
    reference = transformers.BertModel.from_pretrained(str(folder), local_files_only=True).eval()
    embeddings, budget = nbytes(reference.embeddings), parse_size("40MiB")  # the unit: its parameters and buffers
    assert budget < embeddings
    caplog.set_level(logging.INFO, logger="bigjob")
    model = from_pretrained(folder, max_memory={"cpu": "40MiB"})
    summary = get_dispatch_info(model).device_map.summary
    assert summary.over_budget.get("embeddings") == embeddings
    tokenizer = hf_tokens.load_tokenizer(folder)
    batch = tokenizer(["the cat sat on the mat", "a budget smaller than one layer"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).last_hidden_state, reference(**batch).last_hidden_state, rtol=0, atol=1e-5)
    _, warnings = fallback_records(caplog)
    assert len(warnings) == 1 and f"'embeddings' ({format_size(embeddings)})" in warnings[0], warnings
    assert f"max_memory['cpu']={format_size(budget)}" in warnings[0]
    with pytest.raises(BudgetError, match=r"'embeddings'.*\(1 \+ prefetch=1\) x its size.*max_memory\['cpu'\] is 40.00 MiB"):
        from_pretrained(folder, max_memory={"cpu": "40MiB"}, strict_budget=True)
