"""Every config group option composes into the typed schema and validates; bad values are named."""

from __future__ import annotations

import json

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from _jobkit import TINY_OVERRIDES, compose_config
from bigjob.cli import config_dir
from bigjob.errors import ConfigError
from bigjob.job import schema
from bigjob.job.budgets import resolve_budgets
from bigjob.job.empty_model import build_empty_model

CONF = config_dir()
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
# Options that need a value the YAML cannot know (a user's file), supplied here.
REQUIRED = {
    ("checkpoint", "path"): ["checkpoint.path=/tmp/x.safetensors"],
    ("data", "jsonl"): ["data.path=/tmp/x.jsonl"],
    ("data", "tensor"): ["data.path=/tmp/x.safetensors"],
    ("data", "prompts"): ["data.path=/tmp/x.txt"],
    ("checkpoint", "model"): ["model.path=/tmp/x"],
    ("placement", "explicit"): ["placement.device_map={embed:cpu,rotary:cpu,blocks:disk,norm:cpu,lm_head:cpu}"],
}
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def test_the_groups_the_issue_asks_for_exist():
    assert {"model", "checkpoint", "dtype", "placement", "data", "task", "cache", "experiment"} <= set(GROUPS)
    assert ("task", "logits") in OPTIONS and ("dtype", "checkpoint") in OPTIONS


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_validates_and_builds(group, option, tmp_path):
    overrides = [f"{group}={option}"] + REQUIRED.get((group, option), [])
    if (group, option) == ("model", "hf"):  # a Transformers folder: config.json is all an empty model needs
        pytest.importorskip("transformers")
        config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 16}
        (tmp_path / "config.json").write_text(json.dumps(config))
        overrides.append(f"model.path={tmp_path}")
    cfg = compose_config(overrides)
    assert isinstance(cfg, schema.JobConfig)
    schema.validate(cfg)
    if group in ("model", "experiment"):
        model = build_empty_model(cfg)  # instantiates _target_ on the meta device
        assert all(p.is_meta for p in model.parameters())
    resolve_budgets(cfg)


def test_default_config_is_the_demo_with_part_of_it_on_disk():
    cfg = compose_config()
    assert cfg.model._target_ == "bigjob.models.demo.DemoTransformer"
    assert cfg.model.no_split_module_classes == ["DemoBlock"]
    assert cfg.checkpoint.path is None and cfg.mode == "run"
    assert resolve_budgets(cfg)["cpu"] < 217e6  # below the model's size


def test_budgets_are_named_keys_that_work_from_the_command_line():
    cfg = compose_config(["placement.max_memory.cpu=200MiB", "placement.max_memory.gpu1=1GiB", "placement.max_memory.disk=1000000"])
    budgets = resolve_budgets(cfg)
    assert budgets["cpu"] == 200 * 2**20 and budgets["cuda:1"] == 2**30 and budgets["disk"] == 10**6


def test_unset_budgets_are_rounded_so_plans_stay_reusable():
    budgets = resolve_budgets(compose_config(["placement=auto"]))
    assert budgets["cpu"] % (256 * 2**20) == 0 and budgets["disk"] >= 2**60


def test_experiments_only_override():
    for path in (CONF / "experiment").glob("*.yaml"):
        assert path.read_text().startswith("# @package _global_"), path.name
    cfg = compose_config(["experiment=tiny"])
    assert cfg.model.kwargs["d_model"] == 32 and cfg.data.seq_len == 16


def test_unknown_keys_and_wrong_types_are_refused_by_hydra():
    with pytest.raises(ConfigCompositionException):
        compose_config(["data.batchsize=3"])
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_config(["data.batch_size=many"])
    with pytest.raises(ConfigCompositionException):
        compose_config(["placement.max_memory.gpu99=1GiB"])
    with pytest.raises(ConfigCompositionException):
        compose_config(["task=nonesuch"])


@pytest.mark.parametrize(
    "override,key",
    [
        ("data.batch_size=0", "data.batch_size"),
        ("placement.max_memory.cpu=lots", "placement.max_memory.cpu"),
        ("placement.max_memory.disk=-1GiB", "placement.max_memory.disk"),
        ("placement.strategy=greedy", "placement.strategy"),
        ("dtype.name=float8", "dtype.name"),
        ("task.top_k=0", "task.top_k"),
        ("data.min_seq_len=500", "data.min_seq_len"),
        ("task.name=summarize", "task.name"),
        ("task.pooling=max", "task.pooling"),
        ("placement.execution=turbo", "placement.execution"),
        ("placement.rates.cpu_flops=250G", "placement.rates"),
        ("placement.disk_reads=fast", "placement.disk_reads"),
    ],
)
def test_invalid_values_name_their_key(override, key):
    cfg = compose_config([override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        schema.validate(cfg)


def test_a_bad_offload_compression_is_one_line_naming_the_key_the_choices_and_the_nearest():
    cfg = compose_config(["placement.offload_compression=init8"])
    with pytest.raises(ConfigError) as info:
        schema.validate(cfg)
    assert str(info.value) == "placement.offload_compression must be one of none, int8, int4, got 'init8'; did you mean 'int8'?"
    for good in ("none", "int8", "int4"):
        schema.validate(compose_config([f"placement.offload_compression={good}"]))


def test_several_problems_are_reported_together():
    cfg = compose_config(["data.batch_size=0", "placement.max_memory.cpu=lots"])
    with pytest.raises(ConfigError) as info:
        schema.validate(cfg)
    assert "data.batch_size" in str(info.value) and "placement.max_memory.cpu" in str(info.value)


@pytest.mark.parametrize("option,key", [("data=jsonl", "data.path"), ("checkpoint=path", "checkpoint.path"), ("placement=explicit", "placement.device_map")])
def test_options_that_need_a_value_name_the_key(option, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        schema.validate(compose_config([option]))


def test_tiny_overrides_shrink_the_model():
    model = build_empty_model(compose_config(TINY_OVERRIDES))
    assert sum(p.numel() for p in model.parameters()) < 50_000


def test_unimportable_target_names_the_key():
    with pytest.raises(ConfigError, match=r"model\._target_"):
        build_empty_model(compose_config(["model._target_=no.such.Model"]))
    with pytest.raises(ConfigError, match=r"model\.kwargs"):
        build_empty_model(compose_config(["+model.kwargs.colour=blue"]))
