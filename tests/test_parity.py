"""Accelerate's own CPU test cases for big modeling, run against bigjob's API.

The models, budgets and expected maps are facts taken from Accelerate's
``tests/test_big_modeling.py`` and ``tests/test_modeling_utils.py``; the tests are written
here. Where bigjob deliberately differs, the test asserts the difference documented in
docs/from-accelerate.md (section named in the test), with the value bigjob gives worked out
by hand in a comment. Accelerate writes GPUs as ints; bigjob's canonical names are
``"cuda:N"`` (:func:`accel` translates an expected map). Outputs are compared with the same
model held in RAM.

The cases whose budget is below ``(1 + prefetch)`` x the largest offloaded unit are grouped in
:class:`TestTinyBudgets` at the end.
"""

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


# ---------------------------------------------------------------- empty models


class TestEmptyWeights:
    def test_parameters_on_meta_buffers_untouched(self) -> None:
        with init_empty_weights():
            linear = nn.Linear(4, 5)
            norm = nn.BatchNorm1d(4)
        assert linear.weight.device == torch.device("meta")
        assert norm.weight.device == torch.device("meta")
        assert norm.running_mean.device == torch.device("cpu")

    def test_include_buffers_and_no_patching(self) -> None:
        register_parameter = nn.Module.register_parameter
        register_buffer = nn.Module.register_buffer
        with init_empty_weights(include_buffers=True):
            norm = nn.BatchNorm1d(4)
            assert nn.Module.register_parameter is register_parameter
            assert nn.Module.register_buffer is register_buffer
        assert norm.weight.device == torch.device("meta")
        assert norm.running_mean.device == torch.device("meta")
        after = nn.BatchNorm1d(4)  # PyTorch is left as it was
        assert after.weight.device == torch.device("cpu") and after.running_mean.device == torch.device("cpu")

    def test_very_large_model(self) -> None:
        with init_empty_weights():  # 100 billion parameters
            model = nn.Sequential(*[nn.Linear(10000, 10000) for _ in range(1000)])
        assert sum(p.numel() for p in model.parameters()) == 1000 * (10000 * 10000 + 10000)

    @pytest.mark.parametrize("device", ["meta", "cpu"])
    def test_init_on_device(self, device: str) -> None:
        with init_on_device(torch.device(device)):
            model = nn.Linear(10, 10)
        assert model.weight.device == torch.device(device)
        assert isinstance(model.weight, nn.Parameter)


# ---------------------------------------------------------------- sizes and structure


class TestSizes:
    def test_compute_module_sizes(self) -> None:
        # Accelerate's expected sizes, module entries; bigjob gives module prefixes only, not one entry per
        # tensor (docs/from-accelerate.md, "Sizes").
        model = ModelForTest()
        assert compute_module_sizes(model) == {"": 236, "linear1": 64, "batchnorm": 72, "linear2": 100}
        model.half()  # floats halve; num_batches_tracked (int64, 8 B) does not
        assert compute_module_sizes(model) == {"": 118 + 4, "linear1": 32, "batchnorm": 36 + 4, "linear2": 50}

    def test_compute_module_sizes_dtype_argument(self) -> None:
        assert compute_module_sizes(ModelForTest(), dtype=torch.float16) == compute_module_sizes(ModelForTest().half())

    def test_find_tied_parameters(self) -> None:
        model = sequential_model(4, width=10)
        assert find_tied_parameters(model) == []
        model.linear2.weight = model.linear1.weight
        assert find_tied_parameters(model) == [["linear1.weight", "linear2.weight"]]
        model.linear4.weight = model.linear1.weight
        assert find_tied_parameters(model) == [["linear1.weight", "linear2.weight", "linear4.weight"]]

        model = sequential_model(5, width=10)
        model.linear1.weight = model.linear4.weight
        model.linear2.weight = model.linear3.weight
        model.linear5.weight = model.linear2.weight
        assert sorted(find_tied_parameters(model), key=len) == [
            ["linear1.weight", "linear4.weight"],
            ["linear2.weight", "linear3.weight", "linear5.weight"],
        ]

        model = nn.Sequential(OrderedDict([("block1", sequential_model(4, 10)), ("block2", sequential_model(4, 10))]))
        model.block1.linear1.weight = model.block2.linear1.weight
        assert find_tied_parameters(model) == [["block1.linear1.weight", "block2.linear1.weight"]]

        layer = nn.Linear(10, 10)
        assert sorted(find_tied_parameters(nn.Sequential(layer, layer))) == [["0.bias", "1.bias"], ["0.weight", "1.weight"]]

    def test_get_max_layer_size(self) -> None:
        model = ModelForTest()
        sizes = compute_module_sizes(model)
        assert get_max_layer_size(list(model.named_children()), sizes, []) == (100, ["linear2"])
        nested = nn.Sequential(ModelForTest(), ModelForTest(), ModelForTest())
        sizes = compute_module_sizes(nested)
        assert get_max_layer_size(list(nested.named_children()), sizes, []) == (100, ["0.linear2", "1.linear2", "2.linear2"])
        assert get_max_layer_size(list(nested.named_children()), sizes, ["ModelForTest"]) == (236, ["0", "1", "2"])

    def test_get_max_layer_size_of_empty_model(self) -> None:
        with init_empty_weights():
            model = sequential_model(3)
        assert get_max_layer_size(list(model.named_children()), compute_module_sizes(model), []) == (
            4_004_000,
            ["linear1", "linear2", "linear3"],
        )


# ---------------------------------------------------------------- planning


class TestInferAutoDeviceMap:
    """Accelerate's ``infer_auto_device_map`` fills devices in order: bigjob's ``strategy="sequential"``.

    bigjob keeps a streaming reserve on the execution device only when something is offloaded
    to CPU or disk; Accelerate keeps one largest layer free on every GPU but the last
    (docs/from-accelerate.md, "Planning differences").
    """

    def test_two_gpus_no_reserve_without_offload(self) -> None:
        # Accelerate: {"linear1": 0, "batchnorm": 1, "linear2": 1} (100 B kept free on GPU 0).
        # bigjob: nothing is offloaded, so no reserve: 64 + 72 = 136 <= 200 on cuda:0; + 100 = 236 > 200.
        expected = {"linear1": "cuda:0", "batchnorm": "cuda:0", "linear2": "cuda:1"}
        assert dict(infer_auto_device_map(ModelForTest(), {0: 200, 1: 200}, strategy="sequential")) == expected
        # Accelerate gives the same map as above for {0: 200, 1: 172, 2: 200}; so does bigjob (100 <= 172).
        assert dict(infer_auto_device_map(ModelForTest(), {0: 200, 1: 172, 2: 200}, strategy="sequential")) == expected

    def test_tied_weights_make_the_model_fit(self) -> None:
        model = ModelForTest()
        model.linear1.weight = model.linear2.weight  # Accelerate's tie (planning only): the 80 B weight counts once
        assert dict(infer_auto_device_map(model, {0: 200, 1: 200}, strategy="sequential")) == accel({"": 0})

    def test_split_at_layer_level(self) -> None:
        # Accelerate: {"0": 0, "1.linear1": 0, "1.batchnorm": 0, "1.linear2": 1, "2": 1}.
        # bigjob: 236 + 236 = 472 <= 500 on cuda:0, the third 236 B block on cuda:1.
        model = nn.Sequential(ModelForTest(), ModelForTest(), ModelForTest())
        assert dict(infer_auto_device_map(model, {0: 500, 1: 500}, strategy="sequential")) == accel({"0": 0, "1": 0, "2": 1})

    def test_no_split_module_classes(self) -> None:
        # Accelerate: {"0": 0, "1": 1, "2": 1} (236 B kept free on GPU 0); bigjob: 472 <= 500 as above.
        model = nn.Sequential(ModelForTest(), ModelForTest(), ModelForTest())
        dm = infer_auto_device_map(model, {0: 500, 1: 500}, ["ModelForTest"], strategy="sequential")
        assert dict(dm) == accel({"0": 0, "1": 0, "2": 1})
        # A module kept whole is never split: one entry per block.
        dm = infer_auto_device_map(model, {0: 300, 1: 300, 2: 300}, ["ModelForTest"], strategy="sequential")
        assert dict(dm) == accel({"0": 0, "1": 1, "2": 2})

    def test_tied_weights_across_blocks(self) -> None:
        model = nn.Sequential(OrderedDict([("layer1", ModelForTest()), ("layer2", ModelForTest()), ("layer3", ModelForTest())]))
        model.layer3.linear2.weight = model.layer1.linear2.weight
        # Accelerate: {"layer1": 0, "layer3.linear2": 0, "layer2": 1, "layer3.linear1": 1, "layer3.batchnorm": 1}.
        # bigjob: layer1 236 + layer3.linear2's own bias 20 = 256; + layer2.linear1 64 = 320; + layer2.batchnorm
        # 72 = 392 <= 400; layer2.linear2 (100) no longer fits; the rest goes to cuda:1.
        dm = infer_auto_device_map(model, {0: 400, 1: 500}, strategy="sequential")
        assert dict(dm) == accel(
            {"layer1": 0, "layer2.linear1": 0, "layer2.batchnorm": 0, "layer2.linear2": 1,
             "layer3.linear1": 1, "layer3.batchnorm": 1, "layer3.linear2": 0}
        )
        # As in Accelerate, the tied modules share a device.
        assert dm.device_of("layer3.linear2.weight") == dm.device_of("layer1.linear2.weight")

        model.layer2.linear2.weight = model.layer1.linear2.weight  # three tied together
        # bigjob: 236 + 20 + 20 (two more biases) = 276; + layer2.linear1 64 = 340; layer2.batchnorm 72 -> 412 > 400.
        dm = infer_auto_device_map(model, {0: 400, 1: 500}, strategy="sequential")
        assert dict(dm) == accel(
            {"layer1": 0, "layer2.linear1": 0, "layer2.batchnorm": 1, "layer2.linear2": 0,
             "layer3.linear1": 1, "layer3.batchnorm": 1, "layer3.linear2": 0}
        )

        model.layer2.linear1.weight = model.layer1.linear1.weight  # and a second group
        # bigjob: 276 + layer2.linear1's own bias 16 = 292; + layer2.batchnorm 72 = 364; layer3.linear1 64 -> 428.
        dm = infer_auto_device_map(model, {0: 400, 1: 500}, strategy="sequential")
        assert dict(dm) == accel({"layer1": 0, "layer2": 0, "layer3.linear1": 1, "layer3.batchnorm": 1, "layer3.linear2": 0})

    def test_ties_inside_one_module_list(self) -> None:
        model = nn.Sequential(
            OrderedDict(
                [("linear1", nn.Linear(4, 4)), ("linear2", nn.Linear(6, 6)), ("linear3", nn.Linear(4, 4)), ("linear4", nn.Linear(6, 6))]
            )
        )
        model.linear3.weight = model.linear1.weight
        model.linear3.bias = model.linear1.bias
        # Accelerate: {"linear1": 0, "linear2": 1, "linear3": 0, "linear4": 1}.
        # bigjob: linear1 = linear3 = 80 B counted once; + linear2 168 = 248 <= 250; linear4 168 -> cuda:1.
        dm = infer_auto_device_map(model, {0: 250, 1: 400}, strategy="sequential")
        assert dict(dm) == accel({"linear1": 0, "linear2": 0, "linear3": 0, "linear4": 1})

    def test_tie_sharing_a_name_prefix(self) -> None:
        # Accelerate only checks that planning does not fail; bigjob also keeps the two names together.
        dm = infer_auto_device_map(ModelWithPrefixTie(), {0: 1000, "cpu": 96000})
        assert dm.device_of("compute.weight") == dm.device_of("compute.weight_submodule.parameter")

    def test_t5_tied_embeddings_with_dtypes(self) -> None:
        from transformers import AutoModelForSeq2SeqLM, T5Config

        config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2)
        with init_empty_weights():
            model = AutoModelForSeq2SeqLM.from_config(config)
        special = {n: torch.float32 for n, _ in model.named_parameters() if "wo" in n}
        dm = infer_auto_device_map(
            model, {0: 10**10, 1: 10**10, "cpu": 10**10}, ["T5Block"], dtype=torch.float16, special_dtypes=special
        )
        # As in Accelerate's T0pp case: the three tied embeddings all on GPU 0.
        for name in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            assert dm.device_of(name) == "cuda:0"

    def test_buffers_count_in_units(self) -> None:
        model = with_buffers(ModelForTest())
        model.linear3 = nn.Linear(4, 5)
        model.linear3.register_buffer("test_buffer4", torch.zeros(10, 2))  # 100 + 80 B
        # Accelerate: {"linear1": 0, "batchnorm": 1, "linear2": "cpu", "linear3": "cpu"}.
        # bigjob (nothing offloaded, no reserve): 144 + 232 = 376 <= 400 on cuda:0; 220 + 180 = 400 <= 400 on cuda:1.
        dm = infer_auto_device_map(model, {0: 400, 1: 400, "cpu": "1GB"}, strategy="sequential")
        assert dict(dm) == accel({"linear1": 0, "batchnorm": 0, "linear2": 1, "linear3": 1})

    def test_reserve_is_one_plus_prefetch_units(self) -> None:
        class CustomModule(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.submodule1 = nn.Linear(20, 20)  # 1680 B
                self.submodule2 = nn.Linear(20, 20)

        model = nn.Sequential(OrderedDict([("module1", CustomModule()), ("module2", CustomModule()), ("module3", CustomModule())]))
        # Accelerate (fallback_allocation) puts some of it on GPU 0 under 5000 B, keeping one 1680 B layer free.
        # bigjob keeps (1 + prefetch) x 1680 = 3360 B for streaming: 5000 - 3360 = 1640 < 1680, nothing fits.
        assert "cuda:0" not in infer_auto_device_map(model, {0: 5000}).values()
        # With prefetch=0 the reserve is Accelerate's one layer, and a layer goes to the GPU as it does there.
        assert "cuda:0" in infer_auto_device_map(model, {0: 5000}, prefetch=0).values()

    def test_tied_fallback_fits(self) -> None:
        class TiedWeightsModel(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.linear1 = nn.Linear(10, 10)
                self.linear2 = nn.Linear(10, 10)
                self.linear2.weight = self.linear1.weight

        assert dict(infer_auto_device_map(TiedWeightsModel(), {0: 600})) == accel({"": 0})

    def test_clean_result_and_verbose(self) -> None:
        # Accelerate's clean_result=True merges entries whose children share a device; bigjob always does.
        model = nn.Sequential(ModelForTest(), ModelForTest())
        assert dict(infer_auto_device_map(model, {"cpu": 10**6})) == {"": "cpu"}
        # verbose=True: bigjob's map describes itself instead (bytes and units per device).
        table = infer_auto_device_map(model, {0: 300, "cpu": 10**6}, strategy="sequential").describe()
        assert "cuda:0" in table and "cpu" in table

    def test_dtype_halves_sizes(self) -> None:
        # float16: 122 B (num_batches_tracked stays 8 B) fits in 200 B on GPU 0.
        dm = infer_auto_device_map(ModelForTest(), {0: 200, 1: 200}, dtype=torch.float16, strategy="sequential")
        assert dict(dm) == accel({"": 0})


class TestBalancedMemory:
    """bigjob's balanced GPU budget is an even share plus one largest unit (docs/from-accelerate.md, "Planning differences")."""

    def test_too_small_to_balance(self) -> None:
        # Share 236 / 2 = 118, + largest unit 100 = 218 > 200: each keeps its 200, as in Accelerate.
        assert gpus(get_balanced_memory(ModelForTest(), {0: 200, 1: 200})) == {"cuda:0": 200, "cuda:1": 200}
        assert gpus(get_balanced_memory(ModelForTest(), {0: 200, 2: 200})) == {"cuda:0": 200, "cuda:2": 200}

    def test_balanced(self) -> None:
        # Accelerate: {0: 215, 1: 300} and {0: 215, 1: 500} (the last GPU keeps all it has).
        # bigjob: every GPU gets 118 + 100 = 218.
        assert gpus(get_balanced_memory(ModelForTest(), {0: 300, 1: 300})) == {"cuda:0": 218, "cuda:1": 218}
        assert gpus(get_balanced_memory(ModelForTest(), {0: 300, 1: 500})) == {"cuda:0": 218, "cuda:1": 218}
        # Accelerate: {0: 0, 1: 215, 2: 300}; a GPU at 0 is not counted in either.
        assert gpus(get_balanced_memory(ModelForTest(), {0: 0, 1: 300, 2: 300})) == {"cuda:0": 0, "cuda:1": 218, "cuda:2": 218}

    def test_one_gpu_and_cpu_unchanged(self) -> None:
        budgets = get_balanced_memory(ModelForTest(), {0: 300, "cpu": 1000})
        assert (budgets["cuda:0"], budgets["cpu"]) == (300, 1000)
        budgets = get_balanced_memory(ModelForTest(), {0: 0, "cpu": 100})
        assert (budgets["cuda:0"], budgets["cpu"]) == (0, 100)

    def test_low_zero(self) -> None:
        budgets = get_balanced_memory(ModelForTest(), {0: 300, 1: 300, 2: 300}, low_zero=True)
        assert budgets["cuda:0"] < budgets["cuda:1"]


class TestCheckDeviceMap:
    def test_complete_maps_pass(self) -> None:
        check_device_map(ModelForTest(), {"": 0})
        check_device_map(ModelForTest(), {"linear1": 0, "linear2": 1, "batchnorm": 1})

    def test_uncovered_module_is_a_value_error(self) -> None:
        with pytest.raises(ValueError, match="batchnorm"):
            check_device_map(ModelForTest(), {"linear1": 0, "linear2": 1})

    def test_unknown_keys_are_an_error(self) -> None:
        # Accelerate warns ("device_map keys do not match any submodules"); bigjob refuses the map, naming them
        # (docs/from-accelerate.md, "Errors").
        device_map = {"linear1": "cpu", "batchnorm": "cpu", "linear2": "cpu", "invalid_module": 0, "another_invalid": 1}
        with pytest.raises(DeviceMapError, match="invalid_module.*another_invalid"):
            check_device_map(ModelForTest(), device_map)


# ---------------------------------------------------------------- loading


class TestLoadCheckpointInModel:
    def test_whole_file(self, tmp_path: Path) -> None:
        source = ModelForTest()
        torch.save(source.state_dict(), tmp_path / "pt_model.bin")
        model = ModelForTest()
        load_checkpoint_in_model(model, tmp_path / "pt_model.bin")
        assert_same_tensors(model, source)

    def test_sharded_index_and_folder(self, tmp_path: Path) -> None:
        source = ModelForTest()
        index = save_sharded(source, tmp_path)
        for checkpoint in (index, tmp_path):
            model = ModelForTest()
            load_checkpoint_in_model(model, checkpoint)
            assert_same_tensors(model, source)

    def test_empty_model(self, tmp_path: Path) -> None:
        source = ModelForTest()
        torch.save(source.state_dict(), tmp_path / "pt_model.bin")
        with init_empty_weights():
            model = ModelForTest()
        load_checkpoint_in_model(model, tmp_path / "pt_model.bin", device_map={"": "cpu"})
        assert_same_tensors(model, source)

    def test_disk_offload(self, tmp_path: Path) -> None:
        # Accelerate leaves disk-tier weights on meta; bigjob serves them as views of the offload folder
        # (device "cpu", values equal; docs/from-accelerate.md, "Loading"). Buffers stay in RAM unless
        # offload_buffers, as in Accelerate.
        source = ModelForTest()
        torch.save(source.state_dict(), tmp_path / "pt_model.bin")
        device_map = {"linear1": "cpu", "batchnorm": "disk", "linear2": "cpu"}
        for offload_buffers in (False, True):
            model = ModelForTest()
            result = load_checkpoint_in_model(
                model, tmp_path / "pt_model.bin", device_map=device_map, offload_folder=tmp_path / "off",
                offload_buffers=offload_buffers,
            )
            assert result.placement["linear1.weight"] == "cpu" and result.placement["linear2.weight"] == "cpu"
            assert result.placement["batchnorm.weight"] == "disk"
            assert result.placement["batchnorm.running_mean"] == ("disk" if offload_buffers else "cpu")
            assert_same_tensors(model, source)

    def test_dtype(self, tmp_path: Path) -> None:
        source = ModelSeveralDtypes()
        torch.save(source.state_dict(), tmp_path / "model.pt")
        model = ModelSeveralDtypes()
        load_checkpoint_in_model(model, tmp_path / "model.pt", dtype=torch.float16, device_map={"": "cpu"})
        assert model.int_param.dtype == torch.int64
        assert model.float_param.dtype == torch.float16
        assert torch.equal(model.int_param, source.int_param)
        assert torch.equal(model.float_param, source.float_param.half())

    @pytest.mark.parametrize("device_map", [None, {"": "cpu"}])
    def test_unexpected_keys(self, tmp_path: Path, caplog: pytest.LogCaptureFixture, device_map: dict | None) -> None:
        state = ModelForTest().state_dict()
        state["foo"] = torch.rand(4, 5)
        torch.save(state, tmp_path / "model.pt")
        with caplog.at_level(logging.WARNING):
            load_checkpoint_in_model(ModelForTest(), tmp_path / "model.pt", device_map=device_map)
        assert any("foo" in record.getMessage() for record in caplog.records)
        # Accelerate raises ValueError or RuntimeError; bigjob's CheckpointError (docs/from-accelerate.md, "Errors").
        with pytest.raises(CheckpointError, match="foo"):
            load_checkpoint_in_model(ModelForTest(), tmp_path / "model.pt", device_map=device_map, strict=True)


# ---------------------------------------------------------------- dispatch and offload


class TestDispatch:
    @pytest.mark.parametrize("train", [False, True])
    def test_cpu_offload(self, train: bool) -> None:
        outputs_match(ModelForTest, lambda m: cpu_offload(m, execution_device=torch.device("cpu")), train)

    @pytest.mark.parametrize("offload_buffers", [False, True])
    def test_disk_offload(self, tmp_path: Path, offload_buffers: bool) -> None:
        outputs_match(
            ModelForTest, lambda m: disk_offload(m, tmp_path, execution_device="cpu", offload_buffers=offload_buffers)
        )

    def test_disk_offload_buffers_go_to_the_folder(self, tmp_path: Path) -> None:
        model = disk_offload(ModelForTest(), tmp_path, execution_device="cpu", offload_buffers=True)
        assert bigjob.get_dispatch_info(model).bytes_per_tier == {"disk": 236}

    def test_unused_submodules(self, tmp_path: Path) -> None:
        # Accelerate needs preload_module_classes here; bigjob brings a unit's weights for whichever module runs.
        outputs_match(ModelWithUnusedSubModulesForTest, lambda m: cpu_offload(m, "cpu"))
        outputs_match(ModelWithUnusedSubModulesForTest, lambda m: disk_offload(m, tmp_path / "a", "cpu"))
        device_map = {"linear1": "cpu", "linear2": "disk", "batchnorm": "cpu", "linear3": "cpu", "linear4": "cpu"}
        outputs_match(ModelWithUnusedSubModulesForTest, lambda m: dispatch_model(m, device_map, offload_folder=tmp_path / "b"))

    @pytest.mark.parametrize("train", [False, True])
    def test_dispatch_model_with_disk(self, tmp_path: Path, train: bool) -> None:
        # Accelerate's map with GPU 0 as the CPU (no GPU here).
        device_map = {"linear1": "disk", "batchnorm": "cpu", "linear2": "cpu"}
        outputs_match(ModelForTest, lambda m: dispatch_model(m, device_map, offload_folder=tmp_path), train)

    def test_dispatch_model_disk_only(self, tmp_path: Path) -> None:
        device_map = {"linear1": "disk", "batchnorm": "disk", "linear2": "disk"}
        outputs_match(ModelForTest, lambda m: dispatch_model(m, device_map, offload_folder=tmp_path))

    def test_dispatch_model_non_persistent_buffers(self, tmp_path: Path) -> None:
        device_map = {"linear1": "cpu", "batchnorm": "cpu", "linear2": "disk"}
        outputs_match(
            ModelForTestNonPersistentBuffers,
            lambda m: dispatch_model(m, device_map, offload_folder=tmp_path, offload_buffers=True),
        )

    def test_dispatch_model_tied_weights(self) -> None:
        model = ModelForTestTiedWeights()
        model.linear1.weight = model.linear2.weight
        dispatch_model(model, {"linear1": "cpu", "batchnorm": "cpu", "linear2": "cpu"})
        assert model.linear2.weight is model.linear1.weight

    def test_disk_needs_an_offload_folder(self) -> None:
        with pytest.raises(BigJobError, match="offload_folder"):
            dispatch_model(ModelForTest(), {"linear1": "disk", "batchnorm": "cpu", "linear2": "cpu"})


class TestLoadCheckpointAndDispatch:
    def test_explicit_map(self, tmp_path: Path) -> None:
        def load(model: nn.Module) -> nn.Module:
            torch.save(model.state_dict(), tmp_path / "pt_model.bin")
            with init_empty_weights():
                empty = type(model)()
            device_map = {"linear1": "cpu", "batchnorm": "disk", "linear2": "cpu"}
            return load_checkpoint_and_dispatch(empty, tmp_path / "pt_model.bin", device_map, offload_folder=tmp_path / "off")

        outputs_match(ModelForTest, load)

    def test_device_map_none_loads_in_place(self, tmp_path: Path) -> None:
        source = ModelForTest()
        torch.save(source.state_dict(), tmp_path / "pt_model.bin")
        model = load_checkpoint_and_dispatch(ModelForTest(), tmp_path / "pt_model.bin", device_map=None)
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in source.named_parameters()]
        assert_same_tensors(model, source)

    def test_default_is_auto(self, tmp_path: Path) -> None:
        # Accelerate's default device_map is None (no dispatch); bigjob's is "auto" (docs/from-accelerate.md).
        source = ModelForTest()
        torch.save(source.state_dict(), tmp_path / "pt_model.bin")
        with init_empty_weights():
            model = ModelForTest()
        model = load_checkpoint_and_dispatch(model, tmp_path / "pt_model.bin", max_memory={"cpu": 10**6})
        assert bigjob.get_dispatch_info(model).device_map.summary.strategy == "auto"
        assert_same_tensors(model, source)


class TestFromPretrained:
    """Transformers' ``from_pretrained(device_map=..., max_memory=..., offload_folder=...)`` as ``bigjob.from_pretrained``."""

    @pytest.fixture
    def llama(self, tmp_path: Path) -> Path:
        from _hfkit import llama_config, write_model

        config = llama_config()
        config.architectures = ["LlamaForCausalLM"]
        return write_model(tmp_path / "llama", config, tokenizer=False)

    def test_offloaded_logits_equal_transformers_in_ram(self, llama: Path, tmp_path: Path) -> None:
        from _hfkit import reference

        expected_model = reference(llama)
        total = sum(t.numel() * t.element_size() for t in expected_model.state_dict().values())
        model = bigjob.from_pretrained(
            llama, device_map="auto", max_memory={"cpu": int(total * 0.8)}, offload_folder=tmp_path / "off", torch_dtype=torch.float32
        )
        assert "disk" in bigjob.get_dispatch_info(model).bytes_per_tier  # part of it really is offloaded
        ids = torch.tensor([[1, 5, 9, 12, 3]])
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected_model(ids).logits, atol=0, rtol=0)

    @pytest.mark.parametrize("argument", ["low_cpu_mem_usage", "offload_state_dict"])
    def test_loading_switches_are_refused(self, llama: Path, argument: str) -> None:
        # Always streamed tensor by tensor: the switches have no meaning, and are never silently ignored.
        with pytest.raises(ConfigError, match=argument):
            bigjob.from_pretrained(llama, device_map="cpu", **{argument: True})


# ---------------------------------------------------------------- budgets below one unit (after the fallback)


class TestTinyBudgets:
    """Budgets below ``(1 + prefetch)`` x the largest offloaded unit.

    Today's branch refuses them with BudgetError; after the budget fallback lands they are
    accepted (prefetch lowered, or the unit streamed over budget with a warning) and only
    ``strict_budget=True`` refuses them. Expected maps are Accelerate's; outputs equal the
    model in RAM.
    """

    def test_buffer_check_one_gpu(self) -> None:
        # 400 B on GPU 0; the largest offloaded unit (linear2, 220 B) twice is 440 B.
        dm = infer_auto_device_map(with_buffers(ModelForTest()), {0: 400, "cpu": "1GB"}, strategy="sequential")
        assert dict(dm) == accel({"linear1": 0, "batchnorm": "cpu", "linear2": "cpu"})

    def test_buffer_check_two_gpus(self) -> None:
        model = with_buffers(ModelForTest())
        model.linear3 = nn.Linear(4, 5)
        model.linear3.register_buffer("test_buffer4", torch.zeros(10, 2))
        dm = infer_auto_device_map(model, {0: 400, 1: 200, "cpu": "1GB"}, strategy="sequential")
        assert dict(dm) == accel({"linear1": 0, "batchnorm": 1, "linear2": "cpu", "linear3": "cpu"})

    def test_fallback_allocation(self) -> None:
        inner = nn.Sequential(OrderedDict([("linear1", nn.Linear(10, 4)), ("linear2", nn.Linear(4, 4)), ("linear3", nn.Linear(4, 8))]))
        model = nn.Sequential(OrderedDict([("module", inner)]))
        # Accelerate gives no CPU budget when max_memory names none; bigjob detects one, so it is set to 0 here.
        dm = infer_auto_device_map(model, {0: 256, "cpu": 0}, strategy="sequential")
        assert dict(dm) == accel({"module.linear1": "disk", "module.linear2": 0, "module.linear3": "disk"})

    def test_fallback_allocation_no_fit(self) -> None:
        inner = nn.Sequential(OrderedDict([(f"linear{i}", nn.Linear(10, 10)) for i in (1, 2, 3)]))
        dm = infer_auto_device_map(nn.Sequential(OrderedDict([("module", inner)])), {0: 30})
        assert "cuda:0" not in dm.values()

    def test_fallback_allocation_with_buffers(self) -> None:
        model = nn.Sequential(OrderedDict([("linear1", nn.Linear(10, 10)), ("batchnorm", nn.BatchNorm1d(10)), ("linear2", nn.Linear(10, 10))]))
        for name in ("linear1", "batchnorm", "linear2"):
            getattr(model, name).register_buffer("extra", torch.zeros(5))
        dm = infer_auto_device_map(model, {0: 678, "cpu": 0}, strategy="sequential")
        assert dict(dm) == accel({"linear1": "disk", "batchnorm": 0, "linear2": "disk"})

    def test_tie_sharing_a_name_prefix_tiny_gpu(self) -> None:
        dm = infer_auto_device_map(ModelWithPrefixTie(), {0: 4, "cpu": 96000})
        assert dm.device_of("compute.weight") == dm.device_of("compute.weight_submodule.parameter")

    def test_strict_budget_refuses(self) -> None:
        with pytest.raises(BudgetError):
            infer_auto_device_map(with_buffers(ModelForTest()), {0: 400, "cpu": "1GB"}, strict_budget=True)

    def test_layer_bigger_than_cpu_budget_runs(self, tmp_path: Path) -> None:
        # Four 4,004,000 B layers (Accelerate's sequential_model) under a 2 MB CPU budget: all on disk,
        # each layer streamed over the budget.
        torch.manual_seed(0)
        source = sequential_model(4)
        torch.save(source.state_dict(), tmp_path / "model.bin")
        with init_empty_weights():
            model = sequential_model(4)
        model = load_checkpoint_and_dispatch(
            model, tmp_path / "model.bin", max_memory={"cpu": "2MB"}, offload_folder=tmp_path / "off"
        )
        x = torch.randn(2, 1000)
        with torch.no_grad():
            torch.testing.assert_close(model(x), source(x), atol=0, rtol=0)

    def test_buffer_model_below_one_unit_runs(self, tmp_path: Path) -> None:
        def load(model: nn.Module) -> nn.Module:
            torch.save(model.state_dict(), tmp_path / "pt_model.bin")
            with init_empty_weights():
                empty = type(model)()
            # 150 B of CPU, below (1 + prefetch) x linear2's 100 B and the whole model's 236 B.
            return load_checkpoint_and_dispatch(empty, tmp_path / "pt_model.bin", max_memory={"cpu": 150}, offload_folder=tmp_path / "off")

        outputs_match(ModelForTest, load)
