"""Did-you-mean for unknown config keys, config group options and choice values (bigjob/job/suggest.py)."""

from __future__ import annotations

import dataclasses

import pytest
from _jobkit import REPO, compose_config, run_cli

from bigjob.errors import ConfigError
from bigjob.job import schema
from bigjob.job.nearest import did_you_mean, nearest
from bigjob.job.suggest import check_command_line, check_overrides, group_options, schema_keys

CONF = REPO / "conf"


def test_schema_keys_are_every_field_of_the_dataclasses():
    keys = schema_keys()
    for section in dataclasses.fields(schema.JobConfig):
        assert section.name in keys
    for budget in dataclasses.fields(schema.MaxMemoryConfig):
        assert f"placement.max_memory.{budget.name}" in keys
    assert "placement.max_memoryy" not in keys


def test_group_options_are_the_yaml_files_of_conf():
    groups = group_options(CONF)
    assert "hydra" not in groups
    for group, options in groups.items():
        assert options == sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("placement.max_memroy.cpu=1GB", "unknown config key 'placement.max_memroy.cpu'; did you mean 'placement.max_memory.cpu'?"),
        ("data.batchsize=3", "unknown config key 'data.batchsize'; did you mean 'data.batch_size'?"),
        ("quite=true", "unknown config key 'quite'; did you mean 'quiet'?"),
        ("dtype=bf61", "unknown option 'bf61' of config group 'dtype'; did you mean 'bfloat16'?"),
        ("placement=demo,balancd", "unknown option 'balancd' of config group 'placement'; did you mean 'balanced'?"),
    ],
)
def test_an_unknown_key_or_option_names_the_nearest_known_one(override, message):
    with pytest.raises(ConfigError) as err:
        check_overrides([override], CONF)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_far_names_get_no_suggestion_but_still_fail():
    with pytest.raises(ConfigError, match=r"^unknown config key 'zzz'$"):
        check_overrides(["zzz=1"], CONF)
    assert nearest("qqqq", ["float32", "bfloat16"]) == [] and did_you_mean("qqqq", ["float32"]) == ""


def test_valid_command_lines_pass():
    good = ["-m", "placement.max_memory.cpu=1GB,2GB", "model.kwargs.depth=2", "placement.execution.cpu=local",
            "+whatever=1", "~experiment", "hydra.run.dir=x", "hydra/launcher=slurm", "experiment=null", "dtype=glob(*)",
            "data.batch_size=range(1,3)", "task=embed"]
    check_command_line(good, CONF)
    check_command_line(["--help", "nonsense=1"], CONF)  # help is Hydra's
    check_command_line(["--config-dir", "/elsewhere", "dtype=mine"], CONF)  # options of other config folders are not known here


@pytest.mark.parametrize("override, key, suggestion", [
    ("placement.strategy=balancd", "placement.strategy", "balanced"),
    ("dtype.name=bf61", "dtype.name", "bfloat16"),
    ("task.name=scroe", "task.name", "score"),
])
def test_a_bad_choice_value_names_the_nearest_choice(override, key, suggestion):
    cfg = compose_config([override])
    with pytest.raises(ConfigError) as err:
        schema.validate(cfg)
    assert f"{key} must be one of" in str(err.value) and f"did you mean {suggestion!r}?" in str(err.value)


def test_the_command_prints_one_line_and_exits_1(tmp_path):
    out = run_cli(["placement.max_memroy.cpu=1GB", "mode=plan"], tmp_path, {"BIGJOB_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode == 1
    assert out.stderr.strip() == "error: unknown config key 'placement.max_memroy.cpu'; did you mean 'placement.max_memory.cpu'?"
    assert not (tmp_path / "outputs").exists()  # nothing ran
