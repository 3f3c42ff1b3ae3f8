"""Accelerate's own CPU test cases for planning, run against bigjob's API: empty models, sizes, device maps.

See tests/test_parity.py for how the cases were taken and how differences are asserted.
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
from _paritykit import (
    ModelForTest,
    ModelWithPrefixTie,
    accel,
    gpus,
    sequential_model,
    with_buffers,
)


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
