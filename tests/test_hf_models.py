"""bigjob.models.hf: Transformers folders loaded by bigjob's engine equal Transformers' own loading; bad folders fail clearly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from _hfkit import REPO_ROOT, gpt2_config, hf_models, llama_config, minilm_dir, reference, transformers, write_model  # noqa: F401
from bigjob import get_dispatch_info
from bigjob.errors import CheckpointError, ConfigError, DataError
from bigjob.models import hf, hf_tokens
from bigjob.models.hf import from_pretrained

SENTENCES = ["A man is eating food.", "The new movie is awesome", "bigjob runs models that do not fit in memory, on CPU and disk."]


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask[..., None].to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


def test_minilm_embeddings_with_disk_offload_equal_transformers_in_ram():
    folder = minilm_dir()
    model = from_pretrained(folder, max_memory={"cpu": "70MB"})  # 87 MiB of weights: most layers stay on disk
    info = get_dispatch_info(model)
    assert info.bytes_per_tier["disk"] > 20e6 and not model.training
    assert model.hf_device_map == dict(info.device_map) and "disk" in model.hf_device_map.values()
    assert model.embeddings.position_ids.dtype == torch.int64
    tokenizer = hf_tokens.load_tokenizer(folder)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    ref = transformers.BertModel.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.no_grad():
        ours = model(**batch).last_hidden_state
        theirs = ref(**batch).last_hidden_state
    torch.testing.assert_close(mean_pooled(ours, batch["attention_mask"]), mean_pooled(theirs, batch["attention_mask"]), rtol=0, atol=1e-5)


def tiny_bert(tmp_path, prefix: str, with_position_ids: bool):
    """A random BertModel saved by hand: keys with ``prefix`` (as BertFor* models save them) or not."""
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    config.architectures = ["BertModel"]
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    state = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    if with_position_ids:
        state[prefix + "embeddings.position_ids"] = torch.arange(32)[None]
    folder = tmp_path / f"bert{prefix.strip('.')}{int(with_position_ids)}"
    folder.mkdir()
    config.save_pretrained(str(folder))
    save_file(state, str(folder / "model.safetensors"))
    return folder, model


@pytest.mark.parametrize("prefix,with_position_ids", [("bert.", True), ("bert.", False), ("", True)])
def test_checkpoint_prefixes_and_position_ids_buffers(tmp_path, prefix, with_position_ids):
    folder, expected = tiny_bert(tmp_path, prefix, with_position_ids)
    model = from_pretrained(folder, device_map={"": "disk"})
    ids = torch.tensor([[2, 7, 11, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state, expected(ids, attention_mask=mask).last_hidden_state, rtol=0, atol=1e-6)
    assert model.embeddings.position_ids.dtype == torch.int64 and model.embeddings.position_ids.device.type == "cpu"


def test_tied_head_stays_tied_when_the_checkpoint_omits_it(hf_models):
    index = json.loads((hf_models["gpt2"] / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    model = from_pretrained(hf_models["gpt2"], max_memory={"cpu": "150KB"})
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.tensor([[1, 5, 9, 22]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(hf_models["gpt2"])(ids).logits, rtol=0, atol=1e-6)


def test_dtypes_auto_explicit_and_torch_state_dict_files(tmp_path, hf_models):
    model = from_pretrained(hf_models["llama"], torch_dtype="bfloat16", device_map="cpu")
    assert model.lm_head.weight.dtype == torch.bfloat16
    inv_freq = next(buffer for name, buffer in model.named_buffers() if name.endswith("inv_freq"))
    assert inv_freq.dtype == torch.float32  # a non-persistent buffer keeps the model's own
    half = write_model(tmp_path / "half", gpt2_config(dtype="float16"), tokenizer=False)
    assert json.loads((half / "config.json").read_text()).get("dtype") == "float16"
    assert from_pretrained(half, torch_dtype="auto", device_map="cpu").lm_head.weight.dtype == torch.float16
    # A pytorch_model.bin folder loads as well (read with weights_only=True).
    folder = tmp_path / "bin"
    folder.mkdir()
    ref = reference(hf_models["gpt2"])
    (folder / "config.json").write_text((hf_models["gpt2"] / "config.json").read_text())
    torch.save({k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}, folder / "pytorch_model.bin")
    model = from_pretrained(folder, max_memory={"cpu": "150KB"}, offload_folder=tmp_path / "offload")
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-6)


def test_dtype_is_taken_under_transformers_5_name_as_under_its_old_one(hf_models):
    # dtype= once went into the config overrides: the config said bfloat16, the weights stayed float32.
    old = from_pretrained(hf_models["llama"], torch_dtype=torch.bfloat16, device_map="cpu")
    new = from_pretrained(hf_models["llama"], dtype="bfloat16", device_map="cpu")
    ref = transformers.LlamaForCausalLM.from_pretrained(str(hf_models["llama"]), dtype=torch.bfloat16).eval()
    assert {p.dtype for p in new.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[1, 5, 9, 22]])
    with torch.no_grad():
        torch.testing.assert_close(new(ids).logits, ref(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(new(ids).logits, old(ids).logits, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="dtype=.*and torch_dtype=.*both given"):
        from_pretrained(hf_models["llama"], dtype="bfloat16", torch_dtype="float16")
    with pytest.raises(ConfigError, match="dtype='bf17' is not a floating dtype"):
        from_pretrained(hf_models["llama"], dtype="bf17")


def test_a_config_override_the_config_does_not_have_is_an_error_not_ignored(hf_models):
    with pytest.raises(ConfigError, match=r"'attn_implmentation' \(did you mean 'attn_implementation'\?\): not an attribute of LlamaConfig"):
        from_pretrained(hf_models["llama"], device_map="cpu", attn_implmentation="eager")
    with pytest.raises(ConfigError, match="the weights' dtype is set by"):
        hf.empty_model(hf_models["llama"], dtype="bfloat16")
    # A real attribute still overrides: two layers instead of the folder's own count.
    layers = len(hf.empty_model(hf_models["llama"]).model.layers)
    assert len(hf.empty_model(hf_models["llama"], num_hidden_layers=layers - 1).model.layers) == layers - 1


def test_a_bfloat16_checkpoint_computes_like_transformers_in_bfloat16(tmp_path):
    config = llama_config()
    config.architectures = ["LlamaForCausalLM"]
    folder = write_model(tmp_path / "bf16", config, tokenizer=False, dtype=torch.bfloat16)
    model = from_pretrained(folder, max_memory={"cpu": "50KB"})  # None: the checkpoint's own dtype
    assert model.lm_head.weight.dtype == torch.bfloat16 and get_dispatch_info(model).bytes_per_tier["disk"] > 0
    inv_freq = next(buffer for name, buffer in model.named_buffers() if name.endswith("inv_freq"))
    assert inv_freq.dtype == torch.float32  # as Transformers keeps it: positions unchanged
    ref = transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    ids = torch.tensor([[1, 5, 9, 22, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_unexpected_tensors_are_an_error_unless_strict_is_off(tmp_path):
    folder, _ = tiny_bert(tmp_path, "", True)
    save_file({"stray.weight": torch.ones(2)}, str(folder / "extra.safetensors"))
    index = {"metadata": {}, "weight_map": {"stray.weight": "extra.safetensors"}}
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        index["weight_map"].update({key: "model.safetensors" for key in handle.keys()})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="stray.weight.*strict=False"):
        from_pretrained(folder, device_map="cpu")
    assert from_pretrained(folder, device_map="cpu", strict=False) is not None


def test_folder_without_config_names_the_argument(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"path '.*' holds no config\.json"):
        from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        from_pretrained(tmp_path / "nonesuch")


def test_unknown_model_type_names_it_and_the_installed_version(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nonesuch-arch", "architectures": ["NonesuchModel"]}))
    with pytest.raises(ConfigError, match=f"model type 'nonesuch-arch' is not known to the installed Transformers {transformers.__version__}"):
        from_pretrained(tmp_path)


def test_class_without_no_split_modules_says_which_option_to_set(monkeypatch, hf_models):
    for cls in (transformers.GPT2LMHeadModel, transformers.GPT2Model):
        monkeypatch.setattr(cls, "_no_split_modules", None)
    with pytest.raises(ConfigError, match=r"no_split_module_classes=\[GPT2Block\]"):
        from_pretrained(hf_models["gpt2"], max_memory={"cpu": "150KB"})
    model = from_pretrained(hf_models["gpt2"], max_memory={"cpu": "150KB"}, no_split_module_classes=["GPT2Block"])
    assert get_dispatch_info(model).bytes_per_tier["disk"] > 0
    assert from_pretrained(hf_models["gpt2"], device_map="cpu") is not None  # nothing to plan: nothing needed


def test_missing_tokenizer_is_a_data_error(tmp_path):
    folder = write_model(tmp_path / "bare", gpt2_config(), tokenizer=False)
    with pytest.raises(DataError, match="model.path '.*' has no usable tokenizer"):
        hf_tokens.load_tokenizer(folder, key="model.path")


def test_without_transformers_the_core_imports_and_the_adapter_says_what_to_install():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import bigjob, bigjob.cli, bigjob.job.runner, bigjob.job.generate, bigjob.models.hf as hf\n"
        "from bigjob.errors import ConfigError\n"
        "try:\n    hf.from_pretrained(sys.argv[1])\nexcept ConfigError as err:\n    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(REPO_ROOT)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'pip install ".[hf]"' in out.stdout and "bigjob[" not in out.stdout  # BigJob on PyPI is another project


def test_working_memory_for_a_batch_shape_is_kept_free_of_weights(hf_models):
    folder = hf_models["llama"]
    plain = from_pretrained(folder, max_memory={"cpu": "200KB"})
    kept = from_pretrained(folder, max_memory={"cpu": "200KB"}, working_memory=(4, 16))
    # The plumbing: the estimate for input ids of that shape (its bytes are checked in test_working_memory.py).
    from bigjob import estimate_working_memory

    expected = estimate_working_memory(hf.empty_model(folder), torch.zeros(4, 16, dtype=torch.long))
    cache = 4 * 2 * 4 * 2 * 16 * 8 * 4  # layers x (keys, values) x batch x KV heads x tokens x head size, fp32
    assert expected > cache
    summary = get_dispatch_info(kept).device_map.summary
    assert summary.working_memory == expected
    cpu_bytes = summary.planned_bytes.get("cpu", 0)
    assert cpu_bytes + summary.reserve.get("cpu", 0) + expected <= 200_000
    assert cpu_bytes < get_dispatch_info(plain).device_map.summary.planned_bytes.get("cpu", 0)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(kept(ids).logits, reference(folder)(ids).logits, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match=r"working_memory=\(4,\).*\(batch, tokens\)"):
        from_pretrained(folder, max_memory={"cpu": "200KB"}, working_memory=(4,))
