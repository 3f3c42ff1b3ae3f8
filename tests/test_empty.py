"""Empty init: parameters on meta (or a chosen device), buffers real, thread-local, exception-safe."""

from __future__ import annotations

import gc
import math
import threading
import time

import psutil
import pytest
import torch
from torch import nn

from bigjob.engine.plan.empty import init_empty_weights, init_on_device


class TaggedParameter(nn.Parameter):
    """A Parameter subclass that carries an attribute."""


class StrictParameter(nn.Parameter):
    """A Parameter subclass whose constructor needs an extra argument."""

    def __new__(cls, data: torch.Tensor, requires_grad: bool = True, *, role: str) -> StrictParameter:
        made = super().__new__(cls, data, requires_grad)
        made.role = role
        return made


class Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trainable = nn.Parameter(torch.ones(3))
        self.frozen = nn.Parameter(torch.ones(5), requires_grad=False)
        tagged = TaggedParameter(torch.ones(2, 2))
        tagged.tag = "lora"
        self.tagged = tagged
        self.strict = StrictParameter(torch.ones(4), requires_grad=False, role="scale")
        self.register_buffer("count", torch.tensor(7))


def test_parameters_go_to_meta_keeping_class_and_requires_grad() -> None:
    with init_empty_weights():
        model = Frozen()
        linear = nn.Linear(6, 4)
    for param in (model.trainable, model.frozen, model.tagged, model.strict, linear.weight, linear.bias):
        assert param.is_meta
    assert type(model.trainable) is nn.Parameter and model.trainable.requires_grad
    assert type(model.frozen) is nn.Parameter and not model.frozen.requires_grad
    assert type(model.tagged) is TaggedParameter and model.tagged.tag == "lora"
    assert type(model.strict) is StrictParameter and model.strict.role == "scale" and not model.strict.requires_grad
    assert tuple(linear.weight.shape) == (4, 6) and linear.weight.dtype == torch.float32
    assert linear.weight.requires_grad


def test_buffers_real_by_default_and_meta_with_include_buffers() -> None:
    with init_empty_weights():
        real = Frozen()
        norm = nn.BatchNorm1d(3)
    assert real.count.device.type == "cpu" and real.count.item() == 7
    assert norm.running_var.device.type == "cpu" and torch.equal(norm.running_var, torch.ones(3))
    assert norm.weight.is_meta
    with init_empty_weights(include_buffers=True):
        empty = Frozen()
        norm = nn.BatchNorm1d(3)
    assert empty.count.is_meta and norm.running_var.is_meta and norm.num_batches_tracked.is_meta
    assert empty.count.dtype == torch.int64


class EmptyThenFilled(nn.Module):
    """Buffers made with ``torch.empty`` and given values in ``__init__`` in every common way."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("after", torch.empty(4))
        self.after.fill_(1.5)  # filled once registered
        before = torch.empty(3)
        before.fill_(2.0)  # filled before registration
        self.register_buffer("before", before)
        table = torch.empty(2, 3)
        for row in range(2):
            table[row] = torch.arange(3) + 10 * row  # item assignment
        self.register_buffer("table", table)
        self.register_buffer("derived", torch.empty(2).fill_(3.0) * 2)  # computed from an empty tensor
        self.register_buffer("initialised", nn.init.constant_(torch.empty(3), 0.25))  # nn.init before registration
        self.register_buffer("ones", nn.init.ones_(torch.empty(2)))
        self.register_buffer("uniform", nn.init.uniform_(torch.empty(1000), 2.0, 3.0))
        chained = torch.empty(3).fill_(2.0).mul_(3)  # in-place calls chained before any read
        chained[0] = -1.0
        self.register_buffer("chained", chained)
        self.proj = nn.Linear(3, 3)


def test_buffer_created_with_empty_and_filled_in_init_stays_real_and_correct() -> None:
    with init_empty_weights():
        module = EmptyThenFilled()
    assert module.proj.weight.is_meta
    expected = {
        "after": torch.full((4,), 1.5),
        "before": torch.full((3,), 2.0),
        "table": torch.tensor([[0.0, 1.0, 2.0], [10.0, 11.0, 12.0]]),
        "derived": torch.full((2,), 6.0),
        "initialised": torch.full((3,), 0.25),
        "ones": torch.ones(2),
        "chained": torch.tensor([-1.0, 6.0, 6.0]),
    }
    for name, value in expected.items():
        buffer = getattr(module, name)
        assert buffer.device.type == "cpu", name
        assert torch.equal(buffer, value), (name, buffer)
    assert module.uniform.device.type == "cpu"
    assert module.uniform.min() >= 2.0 and module.uniform.max() <= 3.0 and module.uniform.std() > 0.1


def test_parameter_initialised_before_wrapping_costs_nothing() -> None:
    # nn.init on an empty tensor that only becomes a parameter must not materialise it (1.6 GB each here).
    class Prewrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            shape = (20_000, 20_000)
            self.xavier = nn.Parameter(nn.init.xavier_uniform_(torch.empty(shape)))
            self.normal = nn.Parameter(nn.init.normal_(torch.empty(shape), std=0.02))
            self.trunc = nn.Parameter(nn.init.trunc_normal_(torch.empty(shape), std=0.02))
            self.kaiming = nn.Parameter(nn.init.kaiming_normal_(torch.empty(shape)))
            self.zeros = nn.Parameter(torch.empty(shape).zero_())

    gc.collect()
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    with init_empty_weights():
        module = Prewrapped()
    elapsed = time.perf_counter() - start
    grown = psutil.Process().memory_info().rss - before
    assert all(param.is_meta for param in module.parameters())
    assert grown < 50 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB"
    assert elapsed < 1.0, f"took {elapsed:.2f}s: the weights were initialised for real"  # real: ~3 s each


def test_explicit_devices_and_other_factories_are_left_alone() -> None:
    with init_empty_weights():
        explicit = torch.empty(3, device="cpu")
        zeros = torch.zeros(3)
        plain = torch.empty(2)
    assert explicit.device.type == "cpu" and zeros.device.type == "cpu"
    assert plain.is_meta  # an empty tensor whose values were never used costs nothing


def test_init_on_device_cpu_makes_real_parameters() -> None:
    with init_on_device("cpu"):
        model = Frozen()
        linear = nn.Linear(3, 2)
    assert linear.weight.device.type == "cpu" and type(linear.weight) is nn.Parameter
    assert type(model.tagged) is TaggedParameter and model.tagged.tag == "lora"
    assert not model.frozen.requires_grad and torch.equal(model.frozen, torch.ones(5))
    # Real values: reset_parameters ran on real storage.
    bound = 1 / math.sqrt(3)
    assert linear.weight.abs().max() <= bound and linear.weight.abs().sum() > 0


def test_nesting_restores_the_outer_context() -> None:
    with init_on_device("cpu"):
        outer_before = nn.Linear(2, 2)
        with init_empty_weights():
            inner = nn.Linear(2, 2)
            with init_empty_weights(include_buffers=True):
                innermost = nn.BatchNorm1d(2)
            inner_after = nn.BatchNorm1d(2)
        outer_after = nn.Linear(2, 2)
    normal = nn.Linear(2, 2)
    assert not outer_before.weight.is_meta and not outer_after.weight.is_meta
    assert inner.weight.is_meta
    assert innermost.weight.is_meta and innermost.running_mean.is_meta
    assert inner_after.weight.is_meta and inner_after.running_mean.device.type == "cpu"
    assert normal.weight.device.type == "cpu"


def test_exception_inside_the_block_leaves_nothing_behind() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with init_empty_weights(include_buffers=True):
            nn.Linear(2, 2)
            raise RuntimeError("boom")
    with pytest.raises(ValueError, match="bang"):
        with init_empty_weights():
            with init_on_device("cpu"):
                raise ValueError("bang")
    after = nn.BatchNorm1d(3)
    assert after.weight.device.type == "cpu" and after.running_mean.device.type == "cpu"
    assert torch.empty(2).device.type == "cpu" and torch.zeros(2).device.type == "cpu"
    assert torch.equal(after.weight, torch.ones(3))


def test_other_threads_are_untouched_while_one_builds_empty_models() -> None:
    inside = threading.Barrier(2, timeout=30)
    normal_done = threading.Event()
    results: dict[str, object] = {}

    def empty_builder() -> None:
        built = []
        with init_empty_weights(include_buffers=True):
            inside.wait()  # both threads are now running, this one inside the context
            while not normal_done.is_set() or len(built) < 50:
                built.append(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)))
        results["empty"] = built

    def normal_builder() -> None:
        inside.wait()
        built = []
        for _ in range(300):
            built.append((nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)), torch.empty(4), torch.zeros(2)))
        normal_done.set()
        results["normal"] = built

    threads = [threading.Thread(target=empty_builder), threading.Thread(target=normal_builder)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert "empty" in results and "normal" in results
    for model, empty, zeros in results["normal"]:  # type: ignore[union-attr]
        assert model[0].weight.device.type == "cpu" and model[1].running_mean.device.type == "cpu"
        assert empty.device.type == "cpu" and zeros.device.type == "cpu"
        assert model[0].weight.abs().sum() > 0  # really initialised
    for model in results["empty"]:  # type: ignore[union-attr]
        assert model[0].weight.is_meta and model[1].running_mean.is_meta


def test_huge_layer_costs_no_memory() -> None:
    gc.collect()
    before = psutil.Process().memory_info().rss
    with init_empty_weights():
        layer = nn.Linear(100_000, 100_000)  # 40 GB in float32 if it were real
    grown = psutil.Process().memory_info().rss - before
    assert layer.weight.is_meta and tuple(layer.weight.shape) == (100_000, 100_000)
    assert grown < 50 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB"


def test_initialising_meta_parameters_costs_neither_memory_nor_imports() -> None:
    # reset_parameters on meta tensors would dispatch torch's Python meta kernels, importing
    # dynamo and sympy (~70 MB, ~1 s) in a fresh process; under init_empty_weights it is skipped.
    script = """
import sys, torch
from torch import nn
def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1]) * 1024
from bigjob.engine.plan.empty import init_empty_weights
before = anon()
with init_empty_weights():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(1024, 4096), nn.LayerNorm(4096), nn.Embedding(1000, 64)) for _ in range(8)])
assert all(p.is_meta for p in model.parameters())
print(anon() - before, 'torch._dynamo' in sys.modules)
"""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    ).stdout.split()
    growth, dynamo = int(out[0]), out[1]
    assert dynamo == "False"
    assert growth < 16 * 2**20, growth
