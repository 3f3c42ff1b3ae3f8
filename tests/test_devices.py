"""Sizes, device names and budgets."""

from __future__ import annotations

import psutil
import pytest
import torch

from bigjob.engine.plan.devices import UNLIMITED, device_inventory, format_size, get_max_memory, normalize_device, parse_size
from bigjob.errors import BudgetError, ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("17", 17),
        ("17B", 17),
        ("3KB", 3 * 1000),
        ("3kb", 3 * 1000),
        ("800MB", 800 * 1000 * 1000),
        ("1.5GB", 1_500_000_000),
        ("2TB", 2 * 1000**4),
        ("3KiB", 3 * 1024),
        ("512MiB", 512 * 1024 * 1024),
        ("10GiB", 10 * 1024**3),
        ("0.5GiB", 1024**3 // 2),
        ("1TiB", 1024**4),
        (" 10 GiB ", 10 * 1024**3),
        ("1e3MB", 1000 * 1000 * 1000),
        ("0", 0),
    ],
)
def test_parse_size_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_numbers_and_percentages() -> None:
    assert parse_size(4096) == 4096
    assert parse_size(0) == 0
    assert parse_size(1536.9) == 1536  # floats are bytes, truncated
    assert parse_size("90%", capacity=2000) == 1800
    assert parse_size("100%", capacity=2000) == 2000
    assert parse_size("12.5%", capacity=800) == 100
    assert parse_size("0%", capacity=800) == 0


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("ten gigs", "'ten gigs'"),
        ("10 parsecs", "'10 parsecs'"),
        ("10XB", "'10XB'"),
        ("GiB", "'GiB'"),
        ("", "''"),
        ("-1GiB", "'-1GiB'"),
        ("-5", "'-5'"),
        (-1, "-1"),
        (-0.5, "-0.5"),
        (float("inf"), "inf"),
        (float("nan"), "nan"),
        ("1e400", "'1e400'"),
        (True, "True"),
        (False, "False"),
        (None, "None"),
        ([1], "[1]"),
    ],
)
def test_parse_size_rejects_and_quotes_the_value(value: object, fragment: str) -> None:
    with pytest.raises(BudgetError) as info:
        parse_size(value, key="placement.max_memory.cpu")  # type: ignore[arg-type]
    message = str(info.value)
    assert fragment in message
    assert "placement.max_memory.cpu" in message


def test_parse_size_errors_explain_negative_and_unknown_units() -> None:
    with pytest.raises(BudgetError, match="negative"):
        parse_size("-2GB")
    with pytest.raises(BudgetError, match=r"KiB, MiB, GiB"):
        parse_size("2 gigabytes")


def test_parse_size_percentages_need_a_capacity_and_at_most_100() -> None:
    with pytest.raises(BudgetError, match=r"'90%'.*capacity"):
        parse_size("90%")
    with pytest.raises(BudgetError, match=r"'150%'"):
        parse_size("150%", capacity=100)
    with pytest.raises(BudgetError, match=r"'-5%'"):
        parse_size("-5%", capacity=100)


def test_budget_error_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        parse_size("nope")


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        (0, "cuda:0"),
        (3, "cuda:3"),
        ("0", "cuda:0"),
        ("12", "cuda:12"),
        ("cuda", "cuda:0"),
        ("cuda:1", "cuda:1"),
        ("CUDA:2", "cuda:2"),
        ("gpu1", "cuda:1"),
        (" cpu ", "cpu"),
        ("CPU", "cpu"),
        ("disk", "disk"),
        ("mps", "mps"),
        ("meta", "meta"),
        (torch.device("cuda"), "cuda:0"),
        (torch.device("cuda", 2), "cuda:2"),
        (torch.device("cpu"), "cpu"),
        (torch.device("mps"), "mps"),
    ],
)
def test_normalize_device_forms(raw: object, canonical: str) -> None:
    assert normalize_device(raw) == canonical  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", [-1, True, "tpu", "cuda:x", "gpu", "cuda:-1", "1.5", 1.5, None, torch.device("xpu")])
def test_normalize_device_rejects_unknown_names(raw: object) -> None:
    with pytest.raises(BudgetError) as info:
        normalize_device(raw, key="device_map")  # type: ignore[arg-type]
    assert repr(raw) in str(info.value) and "device_map" in str(info.value)


def test_format_size() -> None:
    assert format_size(0) == "0 B"
    assert format_size(1023) == "1023 B"
    assert format_size(2 * 1024 + 512) == "2.50 KiB"
    assert format_size(3 * 1024**3) == "3.00 GiB"
    assert format_size(UNLIMITED) == "unlimited"


def test_get_max_memory_defaults() -> None:
    budgets = get_max_memory()
    assert budgets["disk"] == UNLIMITED
    assert 0 < budgets["cpu"] <= psutil.virtual_memory().total
    assert list(budgets)[-2:] == ["cpu", "disk"]  # fastest first, disk last
    assert any(entry["device"] == "cpu" and entry["total_bytes"] >= entry["free_bytes"] for entry in device_inventory())


def test_get_max_memory_overrides_per_device_and_keeps_declared_gpus() -> None:
    budgets = get_max_memory({1: "2GiB", "cuda:0": 1000, "gpu3": "1.5GB", "cpu": "512MiB"})
    assert budgets["cuda:0"] == 1000
    assert budgets["cuda:1"] == 2 * 1024**3
    assert budgets["cuda:3"] == 1_500_000_000  # declared although this machine has no such GPU
    assert budgets["cpu"] == 512 * 1024**2
    assert budgets["disk"] == UNLIMITED
    assert list(budgets) == ["cuda:0", "cuda:1", "cuda:3", "cpu", "disk"]


def test_get_max_memory_disk_limits_and_zero() -> None:
    assert get_max_memory({"cpu": 100, "disk": "1GB"})["disk"] == 10**9
    budgets = get_max_memory({"cpu": 100, "disk": 0})
    assert budgets["disk"] == 0 and budgets["cpu"] == 100


def test_get_max_memory_percent_of_detected_capacity() -> None:
    total = psutil.virtual_memory().total
    assert abs(get_max_memory({"cpu": "50%"})["cpu"] - total // 2) <= 1
    with pytest.raises(BudgetError, match=r"'50%'.*max_memory.cuda:7"):
        get_max_memory({"cuda:7": "50%"})  # no such GPU here: its capacity is unknown


def test_get_max_memory_rejects_all_zero_budgets() -> None:
    with pytest.raises(BudgetError, match="every budget"):
        get_max_memory({"cpu": 0, "disk": 0})
    with pytest.raises(BudgetError, match="every budget"):
        get_max_memory({"cuda:0": 0, "cpu": "0GB", "disk": 0})


def test_get_max_memory_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(BudgetError, match=r"'tpu0'.*max_memory"):
        get_max_memory({"tpu0": "1GiB"})
    with pytest.raises(BudgetError, match="meta"):
        get_max_memory({"meta": "1GiB"})
    with pytest.raises(BudgetError, match=r"'lots'.*max_memory.cpu"):
        get_max_memory({"cpu": "lots"})
    with pytest.raises(BudgetError, match=r"-3.*max_memory.disk"):
        get_max_memory({"disk": -3})


def test_get_max_memory_rejects_one_device_named_twice() -> None:
    with pytest.raises(BudgetError, match=r"cuda:0 twice.*0.*'cuda:0'"):
        get_max_memory({0: "1GiB", "cuda:0": "2GiB"})
