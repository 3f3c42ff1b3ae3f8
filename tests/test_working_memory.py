"""Working memory: the estimate against hand-counted bytes, and the planner keeping it free."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bigjob import estimate_working_memory, infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch
from bigjob.engine.plan.planner import plan
from bigjob.engine.checkpoints.safetensors_writer import write_file
from bigjob.engine.plan.inventory import build_inventory
from bigjob.errors import BudgetError, ConfigError
from models_for_planning import random_model, tree_specs

F32 = 4


class Residual(nn.Module):
    """``x + f(x)`` with an in-place ReLU and a reshape round trip: neither makes a new buffer."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.act = nn.ReLU(inplace=True)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.up(x))  # one hidden-sized buffer, activated in place
        h = h.reshape(-1, h.shape[-1]).reshape(h.shape)  # views of it
        return x + self.down(h)  # at its peak: h, down(h), and the sum


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 9), width=st.integers(1, 40), hidden=st.integers(1, 90))
def test_estimate_counts_each_live_buffer_once(batch: int, width: int, hidden: int) -> None:
    with init_empty_weights():
        block = Residual(width, hidden)
    # up(x): b*hidden; down(h): b*width, alive with h; then the sum: b*width, while down(h) is still held.
    expected = batch * (hidden + 2 * width) * F32
    assert estimate_working_memory(block, torch.zeros(batch, width)) == expected


def test_estimate_of_a_loaded_model_leaves_it_untouched_and_equals_the_empty_ones() -> None:
    torch.manual_seed(0)
    loaded = Residual(16, 48)
    before = {name: t.clone() for name, t in loaded.state_dict().items()}
    with init_empty_weights():
        empty = Residual(16, 48)
    x = torch.randn(5, 16)
    assert estimate_working_memory(loaded, x) == estimate_working_memory(empty, x) == 5 * (48 + 32) * F32
    assert all(torch.equal(before[name], t) for name, t in loaded.state_dict().items())
    assert not any(t.is_meta for t in loaded.state_dict().values())


def test_estimate_follows_the_dtype_the_weights_will_have() -> None:
    with init_empty_weights():
        model = nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 300))
    ids = torch.zeros(2, 7, dtype=torch.long)
    fp32 = estimate_working_memory(model, ids)
    assert fp32 == 2 * 7 * (8 + 300) * F32
    assert estimate_working_memory(model, ids, dtype=torch.bfloat16) == fp32 // 2


def test_keyword_inputs_reach_the_forward() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 10)

        def forward(self, x: torch.Tensor, repeat: int = 1) -> torch.Tensor:
            return torch.cat([self.proj(x)] * repeat)

    with init_empty_weights():
        model = Scaled()
    x = torch.zeros(3, 4)
    # proj(x) (3x10) and, with repeat=4, the concatenation (12x10), alive together.
    assert estimate_working_memory(model, x) == (30 + 30) * F32
    assert estimate_working_memory(model, x, repeat=4) == (30 + 120) * F32


def test_a_forward_that_reads_values_is_a_clear_error() -> None:
    class Greedy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(int(self.proj(x).sum().item()))  # a shape that depends on values

    with init_empty_weights():
        model = Greedy()
    with pytest.raises(ConfigError, match=r"Greedy's forward cannot be estimated.*give the working memory in bytes"):
        estimate_working_memory(model, torch.zeros(2, 4))


# --------------------------------------------------------------------------- a Transformers decoder


def test_llama_working_memory_is_its_logits_hidden_state_and_kv_cache() -> None:
    transformers = pytest.importorskip("transformers")
    layers, kv_heads, head_dim, vocab, width = 3, 2, 8, 3000, 32
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=width // head_dim, num_key_value_heads=kv_heads, max_position_embeddings=128,
    )
    with init_empty_weights():
        model = transformers.LlamaForCausalLM(config)
    for batch, tokens in ((1, 5), (4, 32), (3, 100)):
        ids = torch.zeros(batch, tokens, dtype=torch.long)
        # The vocabulary dwarfs every layer's buffers: the peak is at the head, where the final
        # hidden state and the logits are alive (and, with the cache, every layer's keys and values).
        outputs = batch * tokens * (vocab + width) * F32
        cache = layers * 2 * batch * kv_heads * tokens * head_dim * F32
        assert estimate_working_memory(model, ids, use_cache=False) == outputs
        assert estimate_working_memory(model, ids) == outputs + cache
        assert estimate_working_memory(model, ids, dtype=torch.bfloat16) == (outputs + cache) // 2


ARCHITECTURES = [
    ("GPT2LMHeadModel", "GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}),
    ("BertModel", "BertConfig", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}),
    ("MistralForCausalLM", "MistralConfig", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                              "num_attention_heads": 4, "num_key_value_heads": 2}),
    ("T5ForConditionalGeneration", "T5Config", {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}),
]


@pytest.mark.parametrize("model_class, config_class, sizes", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_fake_trace_agrees_with_the_real_forward_across_architectures(model_class: str, config_class: str, sizes: dict) -> None:
    transformers = pytest.importorskip("transformers")
    from bigjob.engine.plan.working_memory import _LiveBytes, _storage_key, _tensors

    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(vocab_size=100, **sizes)).eval()
    ids = torch.randint(0, 100, (3, 11))
    kwargs = {"attention_mask": torch.ones_like(ids)}
    if model_class.startswith("T5"):
        kwargs["decoder_input_ids"] = ids
    estimate = estimate_working_memory(model, ids, **kwargs)
    # The same count over the real forward, on real tensors; and, counted apart, what the forward returns.
    external = {_storage_key(t) for t in (*model.parameters(), *model.buffers(), ids, *kwargs.values())}
    real = _LiveBytes(external)
    with torch.no_grad(), real:
        out = model(ids, **kwargs)
    returned = {_storage_key(t): t.untyped_storage().nbytes() for t in _tensors(out) if _storage_key(t) not in external}
    assert sum(returned.values()) > 0 and estimate >= sum(returned.values())
    # Under fake tensors Transformers takes its tracing path and builds the attention mask from index
    # tensors, where the eager forward looks at the all-ones mask and skips it: a few hundred bytes here.
    assert 0 <= estimate - real.peak <= 1024


# --------------------------------------------------------------------------- the planner keeps it free


def layers(n: int = 6, width: int = 64) -> nn.Sequential:
    with init_empty_weights():
        return nn.Sequential(*[nn.Linear(width, width) for _ in range(n)])


LAYER = (64 * 64 + 64) * F32  # 16,640 bytes


@pytest.mark.parametrize("budgets", [{"cpu": 5 * LAYER, "disk": 10**9}, {"cuda:0": 5 * LAYER, "cpu": 3 * LAYER, "disk": 10**9}])
@pytest.mark.parametrize("working", [1, LAYER, 2 * LAYER + 7])
def test_working_memory_plans_as_a_smaller_budget_on_the_executing_device(budgets: dict[str, int], working: int) -> None:
    inventory = build_inventory(layers())
    main = next(iter(budgets))
    with_it = plan(inventory, budgets, prefetch=1, working_memory=working)
    smaller = plan(inventory, {**budgets, main: budgets[main] - working}, prefetch=1)
    assert dict(with_it) == dict(smaller)
    assert with_it.summary.working_memory == working
    assert with_it.summary.budgets[main] == budgets[main]  # reported as given
    # Weights resident on the executing device, its streaming reserve and the working memory fit its budget.
    used = with_it.summary.planned_bytes.get(main, 0) + with_it.summary.reserve.get(main, 0)
    assert used + working <= budgets[main]


@settings(max_examples=60, deadline=None)
@given(drawn=tree_specs(), data=st.data())
def test_random_plans_with_working_memory_equal_plans_under_the_smaller_budget(drawn: tuple, data: st.DataObject) -> None:
    inventory = build_inventory(random_model(drawn))
    total = max(inventory.total_bytes, 1)
    gpu = data.draw(st.booleans(), label="gpu")
    main_budget = data.draw(st.integers(1, 3 * total), label="main budget")
    budgets = {"cuda:0": main_budget, "cpu": data.draw(st.integers(0, 3 * total)), "disk": 10**9} if gpu else {"cpu": main_budget, "disk": 10**9}
    working = data.draw(st.integers(1, main_budget + 2), label="working memory")
    prefetch = data.draw(st.integers(0, 2), label="prefetch")
    main = "cuda:0" if gpu else "cpu"

    def planned(budgets: dict[str, int], working: int = 0):  # a map, or the error's class
        try:
            return plan(inventory, budgets, prefetch=prefetch, working_memory=working)
        except BudgetError as err:
            return type(err)

    with_it = planned(budgets, working)
    if working >= main_budget:
        assert with_it is BudgetError
        return
    smaller = planned({**budgets, main: main_budget - working})
    assert (with_it if isinstance(with_it, type) else dict(with_it)) == (smaller if isinstance(smaller, type) else dict(smaller))
    if not isinstance(with_it, type):
        summary = with_it.summary
        assert summary.planned_bytes.get(main, 0) + summary.reserve.get(main, 0) + working <= main_budget


def test_working_memory_moves_weights_off_the_cpu_and_survives_the_map_file() -> None:
    from bigjob.engine.plan.device_map import DeviceMap

    without = infer_auto_device_map(layers(), max_memory={"cpu": 6 * LAYER})
    assert set(without.values()) == {"cpu"}
    planned = infer_auto_device_map(layers(), max_memory={"cpu": 6 * LAYER}, working_memory="30KiB")
    assert planned.summary.working_memory == 30 * 1024
    # 6 layers of budget, less 30 KiB (1.85 layers), less two streamed layers: 2 stay in RAM.
    assert list(planned.values()).count("cpu") == 2 and list(planned.values()).count("disk") == 4
    again = DeviceMap.from_json(planned.to_json())
    assert again.summary == planned.summary


def test_working_memory_that_leaves_no_room_is_an_error_naming_both_keys() -> None:
    with pytest.raises(BudgetError, match=r"working memory \(97\.50 KiB, working_memory\) leaves no room.*max_memory\['cpu'\]"):
        infer_auto_device_map(layers(), max_memory={"cpu": 6 * LAYER}, working_memory=6 * LAYER)
    with pytest.raises(BudgetError, match=r"net of the .* kept free on cpu for the forward's working memory"):
        infer_auto_device_map(layers(), max_memory={"cpu": 2 * LAYER, "disk": 0}, working_memory=LAYER)
    with pytest.raises(BudgetError, match="working_memory"):
        infer_auto_device_map(layers(), max_memory={"cpu": 6 * LAYER}, working_memory="lots")
    with pytest.raises(BudgetError, match="negative"):
        infer_auto_device_map(layers(), max_memory={"cpu": 6 * LAYER}, working_memory=-1)


def test_dispatched_model_with_working_memory_matches_the_model_in_ram(tmp_path) -> None:
    torch.manual_seed(3)
    reference = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])
    path = tmp_path / "model.safetensors"
    write_file(path, reference.state_dict())
    x = torch.randn(8, 64)
    model = load_checkpoint_and_dispatch(
        layers(), path, max_memory={"cpu": 6 * LAYER}, working_memory=estimate_working_memory(layers(), x) + LAYER,
        offload_folder=tmp_path / "offload",
    )
    from bigjob import get_dispatch_info

    info = get_dispatch_info(model)
    assert info.device_map.summary.working_memory == 8 * 64 * F32 * 2 + LAYER
    assert "disk" in set(info.device_map.values())
    assert torch.equal(model(x), reference(x))


# --------------------------------------------------------------------------- against CUDA's allocator


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_estimate_equals_the_peak_cuda_allocates_for_the_same_forward() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024)).cuda()
    x = torch.randn(4096, 1024, device="cuda")
    with torch.no_grad():
        model(x)  # kernels and library workspaces made once, outside the measured forward
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = model(x)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    del out
    # The allocator rounds large blocks to 2 MiB: every buffer here is a multiple of it, so the figures agree exactly.
    assert estimate_working_memory(model, x) == peak == 2 * 4096 * 4096 * F32


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}])
def test_working_memory_with_a_map_bigjob_does_not_plan_is_refused(device_map) -> None:
    from bigjob.engine.plan.resolution import resolve_device_map

    with pytest.raises(ConfigError, match=r"working_memory=4096 only shapes a map bigjob plans.*device_map='auto'"):
        resolve_device_map(layers(), device_map, working_memory=4096)
    assert dict(resolve_device_map(layers(), device_map, working_memory=0)) == {"": "cpu"}
