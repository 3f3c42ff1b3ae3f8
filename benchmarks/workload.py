"""The benchmark workload: a Llama-style decoder in Transformers' own format, made from a seed.

``write_model_folder`` writes ``config.json`` and sharded safetensors (an index plus
shards, tensor by tensor, never the whole model in memory) that
``transformers.LlamaForCausalLM.from_pretrained`` and ``bigjob.from_pretrained`` both read.
Default size: 24 layers of width 1024 (SwiGLU 2816), vocabulary 32000, head tied to the
embeddings: 341M parameters, 1.36 GB in fp32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from bigjob.engine.checkpoints.safetensors_writer import SafetensorsWriter

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# benchmarks/big.py's model, bigger than this machine's RAM: Llama-7B's shape (width 4096, SwiGLU 11008,
# 32 heads) at 40 layers with an untied head: 8.35G parameters, 33.4 GB (31.1 GiB) in fp32, BIG_SHARDS shards.
LLAMA_7B40 = dict(
    LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=40, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-5,
)
BIG_SHARDS = 41


def shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes, in Transformers' naming (the tied head is not stored)."""
    width, ffn = config["hidden_size"], config["intermediate_size"]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], width)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{name}.weight"] = (width, width)
        out[p + "mlp.gate_proj.weight"] = (ffn, width)
        out[p + "mlp.up_proj.weight"] = (ffn, width)
        out[p + "mlp.down_proj.weight"] = (width, ffn)
        out[p + "input_layernorm.weight"] = (width,)
        out[p + "post_attention_layernorm.weight"] = (width,)
    out["model.norm.weight"] = (width,)
    if not config.get("tie_word_embeddings"):
        out["lm_head.weight"] = (config["vocab_size"], width)
    return out


def write_model_folder(folder: Path, config: dict[str, Any] = LLAMA, seed: int = 0, shards: int = 4) -> Path:
    """Write (once: an existing folder with the same config and seed is kept) the seeded model folder."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "bench.json"
    wanted = {"config": config, "seed": seed, "shards": shards}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return folder
    for old in folder.glob("*.safetensors"):
        old.unlink()
    table = shapes(config)
    weight_map = write_seeded_shards(folder, table, seed, shards)
    total = sum(math.prod(s) * 4 for s in table.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    stamp.write_text(json.dumps(wanted))
    return folder


def write_seeded_shards(folder: Path, table: dict[str, tuple[int, ...]], seed: int, shards: int) -> dict[str, str]:
    """fp32 safetensors shards of seeded tensors (norm weights near 1, others scaled by 1/sqrt(fan-in)),
    written tensor by tensor; returns the weight map (tensor name -> shard file)."""
    names = list(table)
    per = math.ceil(len(names) / shards)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for number in range(shards):
        part = names[number * per : (number + 1) * per]
        file = f"model-{number + 1:05d}-of-{shards:05d}.safetensors"
        # data_align=8: laid out as the safetensors library (save_pretrained) lays out the checkpoints
        # users bring, where a weight may start mid cache line; bigjob's own files start them on one.
        with SafetensorsWriter(folder / file, [(n, torch.float32, table[n]) for n in part], data_align=8) as writer:
            for name in part:
                shape = table[name]
                if name.endswith("norm.weight"):
                    tensor = 1 + 0.1 * torch.randn(shape, generator=generator)
                else:
                    tensor = torch.randn(shape, generator=generator) * (1 / math.sqrt(shape[-1]))
                writer.write(name, tensor)
                weight_map[name] = file
    return weight_map


def token_batch(batch: int, tokens: int, vocab: int = LLAMA["vocab_size"], seed: int = 0) -> torch.Tensor:
    """Fixed token ids: the same for every system and run."""
    return torch.randint(3, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed + 1000 * batch + tokens))
