"""The GPU suite: offloaded forwards on one CUDA GPU, bigjob beside Accelerate, against the copy bound.

Workload: the suite's seeded Llama decoder (``benchmarks/workload.py``: 341M parameters,
1.36 GB fp32, four shards). One device map per setting, planned once by bigjob under a
GPU budget that forces offload and given *as an explicit map* to every system, so all run
the same placement:

* ``cpu``: 25% of the weights on the GPU, the rest in CPU RAM;
* ``disk``: 25% on the GPU, 40% in CPU RAM, the rest on disk (the checkpoint itself).

Systems, each in a fresh process: ``gpu`` (the whole model on the GPU: the reference and
the compute floor), ``bigjob`` (execution ``stream``), ``bigjob-auto`` and ``bigjob-local``
(offloaded layers run on the CPU where that is cheaper / always), and ``accelerate``
(``init_empty_weights`` + ``load_checkpoint_and_dispatch`` with the same map). On request,
``bigjob-switch``: bigjob with Python's GIL switch interval at 0.5 ms instead of 5 ms.

Figures: load seconds; first and median forward at each batch; the copy bound, offloaded
bytes over the measured pinned host-to-device bandwidth (what a streaming forward cannot
beat); median over that bound; Accelerate's median over bigjob's; GPU memory above the
weights placed there; RSS growth over the CPU tier; max abs difference of the last
position's logits from the ``gpu`` reference; greedy decoding at batch 1 (ms a new token, and
whether the tokens equal the reference's), where ``local`` should beat streaming (``--no-decode``
skips it). The machine's own limits come first: pinned
and pageable host-to-device bandwidth, page cache into pinned memory, fp32 matmul rate.

    python benchmarks/gpu.py                      # both maps, all systems (about 3 min on an H100/H200)
    python benchmarks/gpu.py --maps cpu --systems gpu,bigjob,accelerate --batches 1,16 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch
from _common import evict, proc_status, versions_line
from workload import LLAMA, token_batch, write_model_folder

from bigjob.engine.tiers.pinned import pinned_empty

SYSTEMS = ("gpu", "bigjob", "bigjob-auto", "bigjob-local", "accelerate")
MAPS = {"cpu": (0.25, None), "disk": (0.25, 0.40)}  # (GPU share, CPU share: None = all the rest)
MiB = 2**20


# --------------------------------------------------------------------------------------------
# The machine's limits.


def _event_seconds(step: Any, repeat: int) -> float:
    """Median seconds of ``step`` on the current CUDA stream, timed with events after one warm-up."""
    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def h2d_gbps(nbytes: int, pinned: bool, repeat: int = 10) -> float:
    """Host-to-device copy bandwidth (GB/s) of one ``nbytes`` buffer, pinned (page-locked) or pageable."""
    source = pinned_empty(nbytes) if pinned else torch.empty(nbytes, dtype=torch.uint8)
    source.fill_(1)
    target = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    return nbytes / _event_seconds(lambda: target.copy_(source, non_blocking=pinned), repeat) / 1e9


def cache_to_pinned_gbps(path: Path, nbytes: int = 256 * MiB, repeat: int = 5) -> float:
    """Bytes a second copied from a cached file (mapped afresh each time, as a disk-tier unit is) into pinned memory."""
    size = min(nbytes, path.stat().st_size)
    target = pinned_empty(size)
    populate = getattr(mmap, "MADV_POPULATE_READ", 22)
    times = []
    with open(path, "rb") as handle:
        handle.read()  # in the page cache
        for _ in range(repeat + 1):
            start = time.perf_counter()
            with mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY) as mapping:
                mapping.madvise(populate)
                source = torch.frombuffer(mapping, dtype=torch.uint8)
                target.copy_(source)
                del source
            times.append(time.perf_counter() - start)
    return size / statistics.median(times[1:]) / 1e9


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.float32, repeat: int = 10) -> float:
    a = torch.randn(n, n, device="cuda:0", dtype=dtype)
    b = torch.randn(n, n, device="cuda:0", dtype=dtype)
    return 2 * n**3 / _event_seconds(lambda: a @ b, repeat) / 1e12


def machine(shard: Path) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "gpu_memory_gib": props.total_memory / 2**30,
        "h2d_pinned_256MiB": h2d_gbps(256 * MiB, True),
        "h2d_pinned_48MiB": h2d_gbps(48 * MiB, True),
        "h2d_pageable_256MiB": h2d_gbps(256 * MiB, False),
        "cache_to_pinned": cache_to_pinned_gbps(shard),
        "fp32_tflops": matmul_tflops(),
        "cpu_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------
# The map.


def plan_map(folder: Path, weights: int, gpu_share: float, cpu_share: float | None) -> tuple[dict[str, str], dict[str, int]]:
    """bigjob's plan for the workload under the setting's budgets: a plain {module: device} map and the bytes on each device."""
    from bigjob import infer_auto_device_map
    from bigjob.models.hf import empty_model

    cpu = 4 * weights if cpu_share is None else int(cpu_share * weights)
    budgets = {"cuda:0": int(gpu_share * weights), "cpu": cpu}
    plan = infer_auto_device_map(empty_model(folder), max_memory=budgets, no_split_module_classes=["LlamaDecoderLayer"])
    assert plan.summary is not None
    return dict(plan), dict(plan.summary.planned_bytes)


# --------------------------------------------------------------------------------------------
# Worker: one system in one process.


def _load(system: str, folder: Path, device_map: dict[str, str] | None, scratch: Path, prefetch: int = 1) -> Any:
    import transformers

    if system == "gpu":
        return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).to("cuda:0").eval()
    if system.startswith("bigjob"):
        import bigjob

        policy = system.partition("-")[2] or "stream"
        if policy == "switch":  # an experiment: the GIL handed between threads every 0.5 ms instead of 5 ms
            sys.setswitchinterval(5e-4)
            policy = "stream"
        return bigjob.from_pretrained(folder, device_map=device_map, offload_folder=scratch, execution=policy, prefetch=prefetch)
    if system == "accelerate":
        from accelerate import init_empty_weights, load_checkpoint_and_dispatch

        config = transformers.AutoConfig.from_pretrained(folder)
        with init_empty_weights():
            model = transformers.LlamaForCausalLM(config)
        model.tie_weights()
        assert device_map is not None
        accelerate_map = {k: (int(v.split(":")[1]) if v.startswith("cuda:") else v) for k, v in device_map.items()}
        return load_checkpoint_and_dispatch(
            model, str(folder), device_map=accelerate_map, offload_folder=str(scratch), dtype=torch.float32
        ).eval()
    raise SystemExit(f"unknown system {system!r}")


def _timed(model: Any, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    logits = model(input_ids=ids, use_cache=False).logits
    torch.cuda.synchronize()
    return time.perf_counter() - start, logits


def decode(model: Any, device: str, prompt: int = 16, new: int = 32) -> dict[str, Any]:
    """Greedy generation at batch 1: seconds a new token (the prompt's forward included) and the tokens.

    Decoding is where running offloaded layers on the CPU (``local``) can beat copying their
    weights over PCIe for one token. A bigjob model decides its ``auto`` units once for the
    whole generation, at its average tokens a forward (:func:`bigjob.execution_tokens`).
    """
    from contextlib import nullcontext

    import bigjob

    ids = token_batch(1, prompt).to(device)
    per_forward = max(1, round((prompt + new - 1) / new))  # prompt + new tokens over new forwards
    pinned = bigjob.execution_tokens(model, per_forward) if bigjob.get_dispatch_info(model) is not None else nullcontext()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    options: dict[str, Any] = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode(), pinned:
        model.generate(ids, max_new_tokens=4, **options)  # first use: generation config, caches
        sync()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **options)
        sync()
        seconds = time.perf_counter() - start
    return {"s_per_token": seconds / new, "tokens": out[0, prompt:].tolist()}


def trace_forward(model: Any, ids: torch.Tensor, path: Path) -> None:
    """One forward under the torch profiler: ``path``.txt (op tables) and ``path``.json.gz (a Chrome trace)."""
    import gzip
    import shutil

    from torch.profiler import ProfilerActivity, profile

    cuda = ids.is_cuda
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with torch.inference_mode(), profile(activities=activities) as prof:
        model(input_ids=ids, use_cache=False)
        if cuda:
            torch.cuda.synchronize()
    averages = prof.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=30)]
    if cuda:
        for key in ("self_device_time_total", "self_cuda_time_total"):
            try:
                tables.append(averages.table(sort_by=key, row_limit=30))
                break
            except (AttributeError, KeyError, ValueError):
                continue
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".txt").write_text("\n\n".join(tables))
    raw = path.with_suffix(".json")
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as source, gzip.open(path.with_suffix(".json.gz"), "wb") as target:
        shutil.copyfileobj(source, target)
    raw.unlink()


def worker(system: str, folder: Path, map_file: Path | None, scratch: Path, batches: list[int], tokens: int,
           repeat: int, cold: int, out: Path, prefetch: int = 1, trace: Path | None = None, decoding: bool = True) -> None:
    from bigjob.job.report import MemorySampler

    torch.zeros(1, device="cuda:0")  # the CUDA context, outside the load's time
    import transformers  # noqa: F401 - imports too: seconds that are no system's loading
    import bigjob  # noqa: F401
    if system == "accelerate":
        import accelerate  # noqa: F401
    device_map = json.loads(map_file.read_text()) if map_file else None
    files = sorted(folder.glob("*.safetensors"))
    result: dict[str, Any] = {"system": system, "batches": {}}
    base_rss = proc_status("VmRSS")
    with MemorySampler(0.005) as peak:
        start = time.perf_counter()
        model = _load(system, folder, device_map, scratch, prefetch)
        torch.cuda.synchronize()
        result["load_s"] = time.perf_counter() - start
        result["gpu_after_load"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        logits: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            for batch in batches:
                ids = token_batch(batch, tokens).to("cuda:0")
                first, out_logits = _timed(model, ids)
                logits[batch] = out_logits[:, -1].float().cpu()
                del out_logits
                times = [_timed(model, ids)[0] for _ in range(repeat)]
                result["batches"][batch] = {"first_s": first, "median_s": statistics.median(times), "min_s": min(times)}
            if cold and device_map and "disk" in device_map.values():
                batch = 4 if 4 in batches else batches[0]
                ids = token_batch(batch, tokens).to("cuda:0")
                times = []
                for _ in range(cold):
                    evict(files + sorted(p for p in scratch.rglob("*") if p.is_file()))
                    times.append(_timed(model, ids)[0])
                result["cold"] = {"batch": batch, "median_s": statistics.median(times)}
        result["gpu_peak"] = torch.cuda.max_memory_allocated()
    result["rss_growth"] = peak.peak_rss - base_rss
    if decoding:  # after the memory figures: generation's KV cache is not the forward's
        result["decode"] = decode(model, "cuda:0")
    if trace is not None:  # after the figures: the profiler's own cost stays out of them
        trace_forward(model, token_batch(batches[0], tokens).to("cuda:0"), trace)
    torch.save(logits, out.with_suffix(".pt"))
    out.write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------
# Driver.


def run_system(system: str, args: argparse.Namespace, map_file: Path | None, scratch: Path, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", system, "--out", str(out), "--folder", str(args.folder),
           "--scratch", str(scratch), "--batches", args.batches, "--tokens", str(args.tokens),
           "--repeat", str(args.repeat), "--cold", str(args.cold), "--prefetch", str(args.prefetch)]
    if map_file is not None:
        cmd += ["--map-file", str(map_file)]
    if args.no_decode:
        cmd.append("--no-decode")
    if args.trace is not None:
        label = f"{map_file.stem.removeprefix('map-')}-{system}" if map_file is not None else system
        cmd += ["--trace-file", str(args.trace / label)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"system": system, "error": f"timed out after {args.timeout} s"}
    if done.returncode != 0 or not out.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-12:]
        print(f"!! {system} failed (exit {done.returncode}):\n   " + "\n   ".join(tail), flush=True)
        return {"system": system, "error": tail[-1] if tail else f"exit {done.returncode}"}
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "bigjob-bench-hf-llama")
    parser.add_argument("--maps", default="cpu,disk", help="comma-separated: " + ", ".join(MAPS))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--cold", type=int, default=3, help="forwards with the checkpoint evicted before each (disk map)")
    parser.add_argument("--prefetch", type=int, default=1, help="bigjob's prefetch depth (units copied ahead)")
    parser.add_argument("--timeout", type=int, default=240, help="seconds for one system's process")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--trace", type=Path, help="folder for one profiled forward per system (op tables, Chrome traces)")
    parser.add_argument("--trace-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--no-decode", action="store_true", help="skip the greedy decoding at batch 1")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--map-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        worker(args.worker, args.folder, args.map_file, args.scratch, batches, args.tokens, args.repeat, args.cold, args.out,
               args.prefetch, args.trace_file, not args.no_decode)
        return
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    systems = args.systems.split(",")
    try:
        import accelerate  # noqa: F401
    except ImportError:
        systems = [s for s in systems if s != "accelerate"]

    started = time.perf_counter()
    write_model_folder(args.folder, LLAMA)
    files = sorted(args.folder.glob("*.safetensors"))
    weights = sum(f.stat().st_size for f in files)
    facts = machine(files[0])
    print(f"# {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    print(f"# {versions_line()}; CUDA {torch.version.cuda}")
    print(f"# {facts['gpu']} ({facts['gpu_memory_gib']:.0f} GiB), {os.cpu_count()} CPU cores (torch threads {facts['cpu_threads']})")
    print(f"# host-to-device: pinned {facts['h2d_pinned_256MiB']:.1f} GB/s (256 MiB), {facts['h2d_pinned_48MiB']:.1f} GB/s (48 MiB); "
          f"pageable {facts['h2d_pageable_256MiB']:.1f} GB/s; page cache -> pinned {facts['cache_to_pinned']:.1f} GB/s; "
          f"fp32 matmul {facts['fp32_tflops']:.1f} TFLOP/s", flush=True)
    report: dict[str, Any] = {"machine": facts, "argv": sys.argv, "weights": weights, "maps": {}}
    bandwidth = facts["h2d_pinned_48MiB"] * 1e9  # transfers are one decoder layer (48 MiB) at a time

    with tempfile.TemporaryDirectory(prefix="bigjob-gpu-bench-") as tmp:
        scratch = Path(tmp)
        reference: dict[str, Any] | None = None
        if "gpu" in systems:
            reference = run_system("gpu", args, None, scratch / "gpu", scratch / "gpu.json")
        for name in args.maps.split(","):
            device_map, tiers = plan_map(args.folder, weights, *MAPS[name])
            offloaded = tiers.get("cpu", 0) + tiers.get("disk", 0)
            map_file = scratch / f"map-{name}.json"
            map_file.write_text(json.dumps(device_map))
            results: dict[str, Any] = {}
            for system in systems:
                if system == "gpu":
                    continue
                out = scratch / f"{name}-{system}.json"
                results[system] = run_system(system, args, map_file, scratch / f"{name}-{system}", out)
                if reference is not None and "error" not in results[system] and "error" not in reference:
                    ref = torch.load(scratch / "gpu.pt")
                    got = torch.load(out.with_suffix(".pt"))
                    results[system]["max_abs_diff"] = max(float((ref[b] - got[b]).abs().max()) for b in ref)
            report["maps"][name] = {"tiers": tiers, "bound_s": offloaded / bandwidth, "results": results}
            _print_map(name, tiers, offloaded / bandwidth, results, reference, batches)
        report["reference"] = reference
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(f"\n# {time.perf_counter() - started:.0f} s in all")


def _print_map(name: str, tiers: dict[str, int], bound: float, results: dict[str, Any], reference: dict[str, Any] | None,
               batches: list[int]) -> None:
    def mib(n: float) -> str:
        return f"{n / MiB:.0f}"

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a and b else "-"

    def median(r: dict[str, Any] | None, batch: int) -> float | None:
        if not r or "error" in r:
            return None
        return r["batches"][str(batch)]["median_s"]

    print(f"\n## map {name!r}: GPU {mib(tiers.get('cuda:0', 0))} MiB, CPU {mib(tiers.get('cpu', 0))} MiB, "
          f"disk {mib(tiers.get('disk', 0))} MiB; copy bound {bound * 1e3:.1f} ms a forward (offloaded bytes / pinned H2D)")
    print("| system | load s | batch | first s | median ms | x copy bound | x GPU-resident | x max of both | Accelerate / this | "
          "GPU over its weights MiB | RSS over CPU tier MiB | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for system, r in results.items():
        if "error" in r:
            print(f"| {system} | failed: {r['error'][:160]} |")
            continue
        for batch in batches:
            b = r["batches"][str(batch)]
            print(f"| {system} | {r['load_s']:.2f} | {batch} | {b['first_s']:.3f} | {b['median_s'] * 1e3:.1f} | "
                  f"{ratio(b['median_s'], bound)} | {ratio(b['median_s'], median(reference, batch))} | "
                  f"{ratio(b['median_s'], max(bound, median(reference, batch) or 0))} | "
                  f"{ratio(median(results.get('accelerate'), batch), b['median_s'])} | "
                  f"{mib(r['gpu_peak'] - tiers.get('cuda:0', 0))} | {mib(r['rss_growth'] - tiers.get('cpu', 0))} | "
                  f"{r.get('max_abs_diff', float('nan')):.3g} |")
        if "cold" in r:
            c = r["cold"]
            print(f"| {system}, evicted | | {c['batch']} | | {c['median_s'] * 1e3:.1f} | {ratio(c['median_s'], bound)} | | | | | | |")
    if reference and "error" not in reference:
        for batch in batches:
            b = reference["batches"][str(batch)]
            print(f"| gpu (all on the GPU) | {reference['load_s']:.2f} | {batch} | {b['first_s']:.3f} | {b['median_s'] * 1e3:.1f} | "
                  f"| 1.00 | | | | | 0 |")
    decoded = {system: r["decode"] for system, r in results.items() if "error" not in r and "decode" in r}
    if decoded:
        floor = reference.get("decode") if reference and "error" not in reference else None
        accelerate = decoded.get("accelerate")
        print("\nGreedy decoding at batch 1 (16-token prompt, 32 new tokens; the prompt's forward included):")
        print("| system | ms a token | x copy bound | x GPU-resident | Accelerate / this | tokens equal the GPU-resident model's |")
        print("|---|---|---|---|---|---|")
        for system, d in [*decoded.items(), *([("gpu (all on the GPU)", floor)] if floor else [])]:
            same = "-" if floor is None or d is floor else str(d["tokens"] == floor["tokens"])
            print(f"| {system} | {d['s_per_token'] * 1e3:.1f} | {ratio(d['s_per_token'], bound)} | "
                  f"{ratio(d['s_per_token'], floor['s_per_token'] if floor else None)} | "
                  f"{ratio(accelerate['s_per_token'] if accelerate else None, d['s_per_token'])} | {same} |")


if __name__ == "__main__":
    main()
