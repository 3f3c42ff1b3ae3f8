"""Load time, forward time and memory of a ~341M-parameter fp32 decoder with ~70% of its weights on disk.

Each system runs in its own fresh process on the same sharded safetensors checkpoint:
``ram`` (the model fully in RAM: the reference), ``bigjob`` (``load_checkpoint_and_dispatch``
under a CPU budget), and ``accelerate`` (its ``init_empty_weights`` +
``load_checkpoint_and_dispatch`` at the same budget, when installed). Forwards are timed
with a warm page cache and with the checkpoint evicted from the page cache before each
forward (``posix_fadvise(DONTNEED)``).

    python benchmarks/offload_forward.py [--disk-share 0.7] [--batch 4] [--tokens 64] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
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

from _common import evict
from _common import proc_status as _status
from llama_like import Config, LlamaLike, write_checkpoint

from bigjob.job.report import MemorySampler


def child(system: str, folder: Path, budget: int, batch: int, tokens: int, repeat: int, out: Path) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, Config().vocab, (batch, tokens))
    files = sorted(folder.glob("*.safetensors"))
    base_rss, base_anon = _status("VmRSS"), _status("RssAnon")
    with MemorySampler(0.002) as peak:
        start = time.perf_counter()
        if system == "ram":
            from safetensors.torch import load_file

            model = LlamaLike()
            state = {}
            for f in files:
                state.update(load_file(f))
            model.load_state_dict(state, strict=False)
            del state
        elif system == "bigjob":
            from bigjob import init_empty_weights, load_checkpoint_and_dispatch

            with init_empty_weights():
                model = LlamaLike()
            model = load_checkpoint_and_dispatch(
                model, folder, device_map="auto", max_memory={"cpu": budget}, no_split_module_classes=["Block"]
            )
        else:
            from accelerate import init_empty_weights, load_checkpoint_and_dispatch

            with init_empty_weights():
                model = LlamaLike()
            model.tie_weights = lambda: None
            model.head.weight = model.embed.weight
            offload = tempfile.mkdtemp(prefix="accelerate-offload-")
            model = load_checkpoint_and_dispatch(
                model, str(folder / "model.safetensors.index.json"), device_map="auto",
                max_memory={"cpu": budget}, no_split_module_classes=["Block"], offload_folder=offload,
            )
        model.eval()
        load_seconds = time.perf_counter() - start
        times: dict[str, list[float]] = {"warm": [], "cold": []}
        with torch.inference_mode():
            logits = model(ids)  # first forward: not in the medians
            first = time.perf_counter() - start - load_seconds
            for condition in ("warm", "cold"):
                for _ in range(repeat):
                    if condition == "cold":
                        evict(files)
                    t = time.perf_counter()
                    model(ids)
                    times[condition].append(time.perf_counter() - t)
    torch.save(logits, out.with_suffix(".pt"))
    out.write_text(json.dumps({
        "load_s": load_seconds, "first_s": first,
        "warm_s": statistics.median(times["warm"]), "cold_s": statistics.median(times["cold"]),
        "rss_growth": peak.peak_rss - base_rss, "anon_growth": (peak.peak_anon or 0) - base_anon,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--disk-share", type=float, default=0.7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "bigjob-bench-llama")
    parser.add_argument("--systems", default="ram,bigjob,accelerate")
    parser.add_argument("--child", nargs=2, metavar=("SYSTEM", "OUT"))
    parser.add_argument("--budget", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.folder, args.budget, args.batch, args.tokens, args.repeat, Path(args.child[1]))
        return

    write_checkpoint(args.folder)
    weights = sum(f.stat().st_size for f in args.folder.glob("*.safetensors"))
    budget = int(weights * (1 - args.disk_share))
    systems = args.systems.split(",")
    if "accelerate" in systems:
        try:
            import accelerate
        except ImportError:
            systems.remove("accelerate")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for system in systems:
            out = Path(scratch) / f"{system}.json"
            cmd = [sys.executable, __file__, "--child", system, str(out), "--folder", str(args.folder),
                   "--budget", str(budget), "--batch", str(args.batch), "--tokens", str(args.tokens),
                   "--repeat", str(args.repeat)]
            subprocess.run(cmd, check=True)
            results[system] = json.loads(out.read_text())
            results[system]["max_abs_diff"] = None
            if system != "ram" and "ram" in results:
                ref = torch.load(Path(scratch) / "ram.pt")
                got = torch.load(out.with_suffix(".pt"))
                results[system]["max_abs_diff"] = float((ref - got).abs().max())
    versions = f"torch {torch.__version__}, python {platform.python_version()}"
    try:
        import accelerate

        versions += f", accelerate {accelerate.__version__}"
    except ImportError:
        pass
    print(f"# {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"# {versions}; {platform.machine()}, {os.cpu_count()} cores, {memory / 2**30:.0f} GiB RAM")
    print(f"# checkpoint {weights / 2**30:.2f} GiB fp32 in 4 shards; CPU budget {budget / 2**20:.0f} MiB "
          f"({1 - args.disk_share:.0%} of the weights); batch {args.batch} x {args.tokens} tokens; medians of {args.repeat}")
    print()
    ram = results.get("ram")
    print("| system | load s | first fwd s | warm fwd s | x RAM | cold fwd s | x RAM | RSS growth MiB | over budget MiB | anon growth MiB | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for system, r in results.items():
        warm_x = f"{r['warm_s'] / ram['warm_s']:.2f}" if ram else "-"
        cold_x = f"{r['cold_s'] / ram['warm_s']:.2f}" if ram else "-"
        over = (r["rss_growth"] - budget) / 2**20 if system != "ram" else float("nan")
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.3g}"
        print(f"| {system} | {r['load_s']:.2f} | {r['first_s']:.2f} | {r['warm_s']:.3f} | {warm_x} | {r['cold_s']:.3f} | "
              f"{cold_x} | {r['rss_growth'] / 2**20:.0f} | {over:.0f} | {r['anon_growth'] / 2**20:.0f} | {diff} |")


if __name__ == "__main__":
    main()
