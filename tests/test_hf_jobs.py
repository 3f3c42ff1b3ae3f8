"""`model=hf` jobs: in-process through run_job, and the command line as a user runs it (subprocesses)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from _hfkit import EOS, gpt2_config, hf_greedy, hf_models, minilm_dir, reference, transformers, write_model  # noqa: F401
from _jobkit import compose_config, read_jsonl, run_cli
from bigjob.errors import ConfigError, DataError
from bigjob.job.runner import run_job
from bigjob.models import hf, hf_tokens

PROMPTS = ["the cat sat on the", "a big red dog ran to the small blue house and", "is", "w3 w7 the mat"]


def job(tmp_path, folder, *extra):
    return compose_config(
        ["model=hf", f"model.path={folder}", f"cache.dir={tmp_path / 'cache'}", "quiet=true", *extra]
    )


def write_prompts(tmp_path, lines, name="prompts.jsonl"):
    path = tmp_path / name
    path.write_text("".join((json.dumps(line) if name.endswith(".jsonl") else line) + "\n" for line in lines))
    return path


def test_minilm_embed_job_equals_transformers_in_ram(tmp_path):
    folder = minilm_dir()
    sentences = ["A man is eating food.", "A man is riding a horse on a beach at sunset.", "Offloaded layers, same numbers."]
    prompts = write_prompts(tmp_path, sentences, "sentences.txt")
    cfg = job(tmp_path, folder, "task=embed", "task.normalize=true", "data=prompts", f"data.path={prompts}", "data.batch_size=2",
              "placement.max_memory.cpu=70MB")
    report = run_job(cfg, tmp_path / "run")
    assert report.status == "completed" and report.bytes_per_tier["disk"] > 20e6
    tokenizer = hf_tokens.load_tokenizer(folder)
    ref = transformers.BertModel.from_pretrained(str(folder), local_files_only=True).eval()
    for record, sentence in zip(read_jsonl(tmp_path / "run" / "predictions.jsonl"), sentences):
        encoded = tokenizer(sentence, return_tensors="pt")
        with torch.no_grad():
            expected = torch.nn.functional.normalize(ref(**encoded).last_hidden_state[0].mean(0), dim=0)
        torch.testing.assert_close(torch.tensor(record["embedding"]), expected, rtol=0, atol=1e-5)


def test_generate_job_equals_transformers_and_its_plan_key_follows_config_json(tmp_path, hf_models):
    folder = hf_models["llama"]
    prompts = write_prompts(tmp_path, PROMPTS)
    cfg = job(tmp_path, folder, "task=generate", "task.max_new_tokens=5", "data=prompts", f"data.path={prompts}", "data.batch_size=3",
              "placement.max_memory.cpu=150KB")
    report = run_job(cfg, tmp_path / "run")
    assert report.status == "completed" and report.bytes_per_tier["disk"] > 0
    assert report.task_metrics["prefill_tokens_per_s"] > 0 and report.task_metrics["new_tokens"] >= len(PROMPTS)
    assert cfg.checkpoint.path == str(folder) and cfg.placement.max_memory.cpu == "150KB"
    tokenizer = hf_tokens.load_tokenizer(folder)
    ids = [tokenizer.encode(p) for p in PROMPTS]
    records = read_jsonl(tmp_path / "run" / "predictions.jsonl")
    assert [r["token_ids"] for r in records] == hf_greedy(reference(folder), ids, 5, eos=EOS)
    assert records[0]["text"] == tokenizer.decode(records[0]["token_ids"], skip_special_tokens=True)

    # The plan key follows config.json: same folder, same key; an edited config, another key.
    plan = lambda name: run_job(job(tmp_path, folder, "mode=plan", "placement.max_memory.cpu=150KB"), tmp_path / name)  # noqa: E731
    first, again = plan("p1"), plan("p2")
    assert first.plan_key == again.plan_key and again.plan_cache_hit is True
    config = json.loads((folder / "config.json").read_text())
    try:
        (folder / "config.json").write_text(json.dumps({**config, "rope_theta": 500000.0}))
        assert plan("p3").plan_key != first.plan_key
    finally:
        (folder / "config.json").write_text(json.dumps(config))


def test_sampled_generation_is_reproducible_from_the_seed(tmp_path, hf_models):
    prompts = write_prompts(tmp_path, [[1, 5, 9], [1, 7], [1, 30, 4, 4]], "ids.jsonl")

    def run(name: str, seed: int) -> list[list[int]]:
        cfg = job(tmp_path, hf_models["gpt2"], "task=generate", "task.decoding=sample", "task.temperature=2.0", "task.top_p=0.95",
                  f"task.seed={seed}", "task.max_new_tokens=6", "data=prompts", f"data.path={prompts}", "data.batch_size=2")
        run_job(cfg, tmp_path / name)
        return [r["token_ids"] for r in read_jsonl(tmp_path / name / "predictions.jsonl")]

    first = run("a", 0)
    assert run("b", 0) == first and run("c", 1) != first


def test_generate_on_a_model_without_kv_cache_fails_before_the_cache(tmp_path):
    from bigjob.errors import JobError

    cfg = compose_config(["experiment=tiny", "task=generate", f"cache.dir={tmp_path / 'cache'}", "quiet=true"])
    with pytest.raises(JobError, match="task.name=generate needs a causal LM"):
        run_job(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()


def test_bad_hf_input_names_the_key(tmp_path, hf_models, monkeypatch):
    too_long = write_prompts(tmp_path, [" ".join(["the"] * 60)], "long.jsonl")
    with pytest.raises(DataError, match=r"task\.max_new_tokens=8 .* context of 64"):
        run_job(job(tmp_path, hf_models["gpt2"], "task=generate", "task.max_new_tokens=8", "data=prompts", f"data.path={too_long}"), tmp_path / "r1")
    bare = write_model(tmp_path / "bare", gpt2_config(), tokenizer=False)
    text = write_prompts(tmp_path, ["the cat"], "text.jsonl")
    with pytest.raises(DataError, match=r"model\.path '.*' has no usable tokenizer"):
        run_job(job(tmp_path, bare, "task=score", "data=prompts", f"data.path={text}"), tmp_path / "r2")
    ids = write_prompts(tmp_path, [[1, 5, 9]], "ids.jsonl")  # token ids need no tokenizer
    assert run_job(job(tmp_path, bare, "task=generate", "task.max_new_tokens=2", "data=prompts", f"data.path={ids}"), tmp_path / "r3").status == "completed"
    for cls in (transformers.GPT2LMHeadModel, transformers.GPT2Model):
        monkeypatch.setattr(cls, "_no_split_modules", None)
    with pytest.raises(ConfigError, match=r"model\.no_split_module_classes=\[GPT2Block\]"):
        run_job(job(tmp_path, hf_models["gpt2"], "mode=plan"), tmp_path / "r4")
    with pytest.raises(ConfigError, match=r"model=hf needs model\.path"):
        run_job(compose_config(["model=hf", f"cache.dir={tmp_path / 'cache'}"]), tmp_path / "r6")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "nonesuch-arch"}))
    with pytest.raises(ConfigError, match=r"model type 'nonesuch-arch' .*model\.path"):
        run_job(job(tmp_path, tmp_path / "odd", "mode=plan"), tmp_path / "r5")
    # A misspelt config attribute would be dropped by Transformers and the job would run another model than asked.
    cached = sorted((tmp_path / "cache").rglob("*"))
    with pytest.raises(ConfigError, match=r"'n_embed' \(did you mean 'n_embd'\?\).*model\.kwargs"):
        run_job(job(tmp_path, hf_models["gpt2"], "mode=plan", "+model.kwargs.n_embed=32"), tmp_path / "r7")
    assert sorted((tmp_path / "cache").rglob("*")) == cached  # nothing planned, nothing cached


@pytest.mark.slow
def test_cli_generate_end_to_end(tmp_path, hf_models):
    folder = hf_models["llama"]
    prompts = write_prompts(tmp_path, PROMPTS)
    env = {"BIGJOB_CACHE_DIR": str(tmp_path / "cache")}
    args = ["model=hf", f"model.path={folder}", "task=generate", "data=prompts", f"data.path={prompts}", "placement.max_memory.cpu=150KB",
            "task.max_new_tokens=6", "hydra.run.dir=out"]
    out = run_cli(args, tmp_path, env)
    assert out.returncode == 0, out.stderr
    assert "prefill" in out.stdout and "decode" in out.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["bytes_per_tier"]["disk"] > 0
    assert metrics["task_metrics"]["decode_tokens_per_s"] > 0 and metrics["task_metrics"]["prefill_tokens_per_s"] > 0
    tokenizer = hf_tokens.load_tokenizer(folder)
    expected = hf_greedy(reference(folder), [tokenizer.encode(p) for p in PROMPTS], 6, eos=EOS)
    assert [r["token_ids"] for r in read_jsonl(tmp_path / "out" / "predictions.jsonl")] == expected


@pytest.mark.slow
def test_cli_sweep_over_budgets_with_a_plain_text_prompt_file(tmp_path, hf_models):
    prompts = write_prompts(tmp_path, PROMPTS, "prompts.txt")
    env = {"BIGJOB_CACHE_DIR": str(tmp_path / "cache")}
    args = ["-m", "model=hf", f"model.path={hf_models['gpt2']}", "task=score", "data=prompts", f"data.path={prompts}",
            "placement.max_memory.cpu=150KB,10MB", "hydra.sweep.dir=sweep"]
    out = run_cli(args, tmp_path, env)
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader((tmp_path / "sweep" / "summary.csv").open()))
    assert [row["status"] for row in rows] == ["completed", "completed"]
    first, second = (read_jsonl(tmp_path / "sweep" / str(i) / "predictions.jsonl") for i in (0, 1))
    assert [r["tokens_scored"] for r in first] == [r["tokens_scored"] for r in second]
    for a, b in zip(first, second):
        assert abs(a["log_likelihood"] - b["log_likelihood"]) < 1e-4


def test_cli_folder_without_config_is_one_line_and_exit_1(tmp_path):
    (tmp_path / "empty").mkdir()
    out = run_cli(["model=hf", f"model.path={tmp_path / 'empty'}", "mode=plan"], tmp_path, {"BIGJOB_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.path") and "config.json" in lines[0]


def test_generate_job_keeps_room_for_its_longest_kv_cache(tmp_path, hf_models):
    from bigjob import estimate_working_memory

    folder = hf_models["llama"]
    prompts = write_prompts(tmp_path, PROMPTS)
    common = ["task=generate", "task.max_new_tokens=5", "data=prompts", f"data.path={prompts}", "data.batch_size=3",
              "placement.max_memory.cpu=300KB"]
    report = run_job(job(tmp_path, folder, *common, "placement.working_memory=auto"), tmp_path / "run")
    assert report.status == "completed"
    # The largest batch: 3 prompts padded to the longest; the generation grows it by 5 tokens.
    tokenizer = hf_tokens.load_tokenizer(folder)
    lengths = [len(tokenizer.encode(p)) for p in PROMPTS]
    rows, longest = max((len(lengths[i:i + 3]), max(lengths[i:i + 3])) for i in range(0, len(lengths), 3))
    ids = torch.zeros(rows, longest + 5, dtype=torch.long)
    prefill = estimate_working_memory(hf.empty_model(folder), input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                                      logits_to_keep=1)
    config = reference(folder).config
    cache = config.num_hidden_layers * 2 * rows * config.num_key_value_heads * (longest + 5) * (config.hidden_size // config.num_attention_heads) * 4
    assert report.working_memory_bytes == prefill > cache
    records = read_jsonl(tmp_path / "run" / "predictions.jsonl")
    assert [r["token_ids"] for r in records] == hf_greedy(reference(folder), [tokenizer.encode(p) for p in PROMPTS], 5, eos=EOS)


def test_generate_with_a_disk_tier_the_cache_cannot_hold_records_the_compute_bound_batch(tmp_path, hf_models, monkeypatch, caplog):
    folder = hf_models["llama"]
    prompts = write_prompts(tmp_path, PROMPTS)
    args = ("task=generate", "task.max_new_tokens=5", "data=prompts", f"data.path={prompts}", "data.batch_size=2",
            "placement.max_memory.cpu=150KB", "placement.prefetch=2")
    tokenizer = hf_tokens.load_tokenizer(folder)
    expected = hf_greedy(reference(folder), [tokenizer.encode(p) for p in PROMPTS], 5, eos=EOS)
    # Room for the tier: mapped, never read directly, so decoding is not bound by the disk.
    fits = run_job(job(tmp_path, folder, *args), tmp_path / "fits")
    assert fits.disk_unit_reads["direct"] == 0 and "compute_bound_batch" not in fits.task_metrics
    # No room: every disk-tier layer is read directly at every step; the tokens stay Transformers'.
    monkeypatch.setenv("BIGJOB_PAGE_CACHE_BYTES", "0")
    with caplog.at_level("INFO", logger="bigjob.job.run_record"):
        report = run_job(job(tmp_path, folder, *args), tmp_path / "read")
    assert report.disk_unit_reads["mapped"] == 0 and report.disk_unit_reads["direct"] > 0
    assert [r["token_ids"] for r in read_jsonl(tmp_path / "read" / "predictions.jsonl")] == expected
    rows = report.task_metrics["compute_bound_batch"]
    assert isinstance(rows, int) and rows >= 1
    assert json.loads((tmp_path / "read" / "metrics.json").read_text())["task_metrics"]["compute_bound_batch"] == rows
    hinted = [r.getMessage() for r in caplog.records if "compute" not in r.getMessage() and "data.batch_size=" in r.getMessage()]
    assert bool(hinted) == (rows > 2), hinted
