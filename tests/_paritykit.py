"""Accelerate's test models and the helpers of the parity tests (tests/test_parity*.py)."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torch import nn

import bigjob
from bigjob import (
    check_device_map,
    compute_module_sizes,
    cpu_offload,
    disk_offload,
    dispatch_model,
    find_tied_parameters,
    get_balanced_memory,
    get_max_layer_size,
    infer_auto_device_map,
    init_empty_weights,
    init_on_device,
    load_checkpoint_and_dispatch,
    load_checkpoint_in_model,
)
from bigjob.errors import BigJobError, BudgetError, CheckpointError, ConfigError, DeviceMapError

# ---------------------------------------------------------------- the test models (Accelerate's shapes)


class ModelForTest(nn.Module):
    """linear1 64 B, batchnorm 72 B (56 float + 8 for num_batches_tracked), linear2 100 B: 236 B."""

    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(3, 4)
        self.batchnorm = nn.BatchNorm1d(4)
        self.linear2 = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.batchnorm(self.linear1(x)))


class LinearWithNonPersistentBuffers(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(out_features, in_features))
        self.register_buffer("bias", torch.ones(out_features), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class ModelForTestNonPersistentBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear1 = LinearWithNonPersistentBuffers(3, 4)
        self.batchnorm = nn.BatchNorm1d(4)
        self.linear2 = LinearWithNonPersistentBuffers(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.batchnorm(self.linear1(x)))


class ModelForTestTiedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(4, 4)
        self.batchnorm = nn.BatchNorm1d(4)
        self.linear2 = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.batchnorm(self.linear1(x)))


class ModuleWithUnusedSubModules(nn.Module):
    """Reads its child's weights in its own forward: the child's forward never runs."""

    def __init__(self, input_dim: int, output_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(input_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.linear.weight.t() + self.linear.bias


class ModelWithUnusedSubModulesForTest(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear1 = ModuleWithUnusedSubModules(3, 4)
        self.linear2 = ModuleWithUnusedSubModules(4, 5)
        self.batchnorm = nn.BatchNorm1d(5)
        self.linear3 = ModuleWithUnusedSubModules(5, 6)
        self.linear4 = ModuleWithUnusedSubModules(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear4(self.linear3(self.batchnorm(self.linear2(self.linear1(x)))))


class ModelSeveralDtypes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("int_param", torch.randint(high=10, size=(15, 30)))
        self.float_param = nn.Parameter(torch.rand(10, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 2


class SubModule(nn.Module):
    def __init__(self, ref_to_parameter: nn.Parameter) -> None:
        super().__init__()
        self.parameter = ref_to_parameter


class LinearModuleAndSubModule(nn.Linear):
    """``compute.weight`` and ``compute.weight_submodule.parameter``: one tensor, names sharing a prefix."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.weight_submodule = SubModule(self.weight)


class ModelWithPrefixTie(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.compute = LinearModuleAndSubModule(3, 8)


def sequential_model(num_layers: int, width: int = 1000) -> nn.Sequential:
    """``linear1`` ... ``linearN``, each ``Linear(width, width)`` (4,004,000 B at width 1000)."""
    return nn.Sequential(OrderedDict((f"linear{i}", nn.Linear(width, width)) for i in range(1, num_layers + 1)))


def with_buffers(model: ModelForTest) -> ModelForTest:
    """Accelerate's buffer-check model: linear1 64 + 80, batchnorm 72 + 160, linear2 100 + 120 bytes."""
    model.linear1.register_buffer("test_buffer1", torch.zeros(10, 2))
    model.batchnorm.register_buffer("test_buffer2", torch.zeros(10, 3))
    model.linear2.register_buffer("test_buffer3", torch.zeros(10, 3))
    return model


def accel(expected: Mapping[str, int | str]) -> dict[str, str]:
    """An expected map written Accelerate's way (GPU as int) in bigjob's canonical device names."""
    return {name: f"cuda:{device}" if isinstance(device, int) else device for name, device in expected.items()}


def gpus(budgets: Mapping[str | int, int]) -> dict[str, int]:
    """The GPU entries of a budget dict, keyed the canonical way."""
    return {k: v for k, v in budgets.items() if isinstance(k, str) and k.startswith("cuda:")}


def outputs_match(make: type[nn.Module], dispatch, train: bool = False) -> None:  # type: ignore[no-untyped-def]
    """``dispatch(model)``'s output equals the same model's output in RAM (same weights, same input)."""
    torch.manual_seed(0)
    model = make()
    reference = make()
    reference.load_state_dict(model.state_dict())
    model.train(train)
    reference.train(train)
    x = torch.randn(2, 3)
    with torch.no_grad():
        expected = reference(x)
        dispatched = dispatch(model).train(train)  # a loader may return a fresh module
        torch.testing.assert_close(dispatched(x), expected, atol=0, rtol=0)


def save_sharded(model: nn.Module, folder: Path) -> Path:
    """Accelerate's sharded test checkpoint: one .bin per top module, a bare ``{name: file}`` index."""
    files = {"linear1": "checkpoint_part1.bin", "batchnorm": "checkpoint_part2.bin", "linear2": "checkpoint_part3.bin"}
    state = model.state_dict()
    index = {name: files[name.split(".")[0]] for name in state}
    (folder / "weight_map.index.json").write_text(json.dumps(index))
    for module, file in files.items():
        torch.save({k: v for k, v in state.items() if k.startswith(module + ".")}, folder / file)
    return folder / "weight_map.index.json"


def assert_same_tensors(model: nn.Module, reference: nn.Module) -> None:
    loaded = dict(model.state_dict())
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(loaded[name], tensor, atol=0, rtol=0, msg=name)
