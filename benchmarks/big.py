"""A model bigger than RAM (issue 21): bigjob, Transformers and Accelerate side by side, and the bounds.

Workload: ``workload.LLAMA_7B40``, Transformers' ``LlamaForCausalLM`` in Llama-7B's shape (width 4096,
SwiGLU 11008, 32 heads) with 40 layers and an untied head: 8.36G parameters, 33.4 GB (31.1 GiB) of fp32
in 41 safetensors shards, written once (``workload.write_model_folder``, tensor by tensor) and reused.

Systems, each in a fresh process (``python big.py --child SYSTEM``), fp32, torch threads 2, the same
CPU budget ``max_memory={"cpu": budget}``, the checkpoint evicted from the page cache before the load:

* ``transformers``: ``LlamaForCausalLM.from_pretrained(device_map="auto", offload_folder=...)`` (the reference);
* ``accelerate``: ``init_empty_weights`` + ``load_checkpoint_and_dispatch(device_map="auto",
  no_split_module_classes=["LlamaDecoderLayer"], offload_folder=...)``;
* ``bigjob``: ``bigjob.from_pretrained(device_map="auto", offload_folder=...)``.

Each system: load s; five forwards at batch 1 x 16 tokens, then five at 8 x 16 (first, and median of
the other four); greedy decoding of 8 new tokens at batch 1; per forward the bytes the process read
(``/proc/self/io`` read_bytes); peak RSS growth over the pre-load RSS during the load and during the
forwards (sampled every 50 ms; VmHWM too); bytes written to the offload folder; the last-token logits
of every forward and the generated tokens (``OUT/SYSTEM.pt``), compared with Transformers'.

Bounds, measured in the same run: compute (two decoder layers, norm and head in RAM, timed, per-layer
time scaled to the full depth), the disk's cold read rate (``O_DIRECT`` and buffered, four shards,
before and after each system), and what the page cache can keep (MemAvailable after the system's load,
less a margin and less the CPU-tier bytes not yet resident). Disk bound = (disk-tier bytes - what the
cache can keep) / O_DIRECT rate.

Results go to ``OUT/results-SYSTEM.json`` as they come in (a killed run keeps what it had);
``--report`` prints the tables from them.

    python benchmarks/big.py --quick                                    # a tiny model in /tmp: seconds
    nohup python benchmarks/big.py --systems transformers,accelerate > /tmp/bb/big.log 2>&1 &
    PYTHONPATH=/work/main python benchmarks/big.py --systems bigjob     # one more row, same OUT
    python benchmarks/big.py --report
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# Last, not first: a bigjob named by PYTHONPATH (or installed) is the one measured, not this tree's.
sys.path.append(str(HERE.parent))

import torch
from _common import (
    cold_read_gbps,
    direct_read_gbps,
    disk_reads,
    evict,
    files_under,
    into_ram,
    load_system,
    machine_line,
    meminfo,
    preload_libraries,
    proc_io,
    proc_status,
    tier_bytes,
    versions_line,
)
from workload import BIG_SHARDS, LLAMA, LLAMA_7B40, shapes, token_batch, write_model_folder

SYSTEMS = ("transformers", "accelerate", "bigjob", "bigjob-p2")  # bigjob-p2: prefetch=2
REFERENCE = "transformers"
THREADS = 2
TOKENS = 16
BATCHES = (1, 8)
REPEAT = 5
NEW_TOKENS = 8
KEEP_LAYERS = 2  # decoder layers the compute bound builds in RAM
RATE_SHARDS = 4  # shards read for the disk's cold rates
SAMPLE_S = 0.05  # RSS sampler interval
DEFAULT_MODEL = Path("/work/bigckpt/llama7b40")
DEFAULT_OUT = Path("/tmp/bb")
# --quick: a 27 MB model with the same structure, for a smoke run in seconds.
QUICK = dict(LLAMA, vocab_size=4000, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
             num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, rms_norm_eps=1e-5)
MiB, GiB, GB = 2**20, 2**30, 1e9


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader (or a killed run) never sees half a file."""
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(data, indent=1))
    os.replace(partial, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def folder_bytes(folder: Path) -> int:
    """Bytes a folder's files take on disk (allocated blocks: sparse files count what was written)."""
    return sum(p.stat().st_blocks * 512 for p in files_under(folder))


def model_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def load_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def weight_bytes(config: dict[str, Any]) -> int:
    return sum(math.prod(s) * 4 for s in shapes(config).values())


def engine_line() -> dict[str, str]:
    """Which bigjob tree this process imports, and its commit (the lead's engine is on main)."""
    import bigjob

    root = Path(bigjob.__file__).resolve().parent.parent
    info = {"bigjob_tree": str(root)}
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "bigjob"], capture_output=True, text=True, timeout=10)
        info["bigjob_commit"] = head.stdout.strip() + (" + uncommitted changes in bigjob/" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        info["bigjob_commit"] = "?"
    return info


def machine_facts() -> dict[str, Any]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    flags = Path("/proc/cpuinfo").read_text()
    return {"cpu": model, "avx512_bf16": " avx512_bf16" in flags, "amx_bf16": " amx_bf16" in flags,
            "machine": machine_line(), "versions": versions_line(), "mem_total": meminfo("MemTotal")}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def other_users(folder: Path) -> list[str]:
    """Other processes that have a file of ``folder`` open or mapped (they share its page cache and the disk):
    ``"PID command"`` each. This process, its parent and its children are not counted."""
    target = str(folder.resolve()) + "/"
    mine = {os.getpid(), os.getppid()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) in mine:
                continue  # a child of ours (the system measured)
            uses = target in (entry / "maps").read_text() or any(
                os.readlink(fd).startswith(target) for fd in (entry / "fd").iterdir())
            if uses:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                found.append(f"{entry.name} {command[:120]}")
        except (OSError, ValueError, IndexError):
            continue
    return found


def wait_for_others(folder: Path, patience: float) -> list[str]:
    """Wait up to ``patience`` seconds for other users of ``folder`` to finish; returns those still there."""
    deadline = time.monotonic() + patience
    others = other_users(folder)
    if others:
        log(f"waiting up to {patience / 60:.0f} min for other users of {folder}: {others}")
    while others and time.monotonic() < deadline:
        time.sleep(10)
        others = other_users(folder)
    if others:
        log(f"going on although other processes use {folder}: {others}")
    return others


# --------------------------------------------------------------------------------------------
# Child: one system in a fresh process.


def system_child(system: str, folder: Path, budget: int, offload: Path, out: Path) -> None:
    torch.set_num_threads(THREADS)
    config = load_config(folder)
    path = out / f"results-{system}.json"
    result: dict[str, Any] = {"system": system, "status": "loading", "budget": budget, "threads": torch.get_num_threads(),
                              "pid": os.getpid(), "started": time.time(), **engine_line()}
    previous = read_json(path) or {}
    for key in ("disk_rates", "loadavg_before", "offload_folder", "other_users_at_start"):  # the parent's figures for this run
        if key in previous:
            result[key] = previous[key]
    write_json(path, result)
    outputs: dict[str, Any] = {}
    try:
        _measure(system, folder, config, budget, offload, out, result, outputs, lambda: write_json(path, result))
    except BaseException as exc:
        result["status"] = f"failed: {type(exc).__name__}: {exc}"[:3000]
        write_json(path, result)
        raise
    result["status"] = "done"
    result["finished"] = time.time()
    write_json(path, result)


def _measure(system: str, folder: Path, config: dict[str, Any], budget: int, offload: Path, out: Path,
             result: dict[str, Any], outputs: dict[str, Any], save: Any) -> None:
    from bigjob.job.report import MemorySampler

    preload_libraries(system.split("-")[0])
    gc.collect()
    base_rss, base_anon = proc_status("VmRSS"), proc_status("RssAnon")
    io0, machine0, available0 = proc_io(), disk_reads(), meminfo("MemAvailable")
    log(f"{system}: loading (MemAvailable {available0 / GiB:.1f} GiB)")
    with MemorySampler(SAMPLE_S) as peak:
        start = time.perf_counter()
        model = load_system("bigjob", folder, budget, offload, prefetch=2) if system == "bigjob-p2" else load_system(system, folder, budget, offload)
        model.eval()
        load_s = time.perf_counter() - start
        peak.sample()
        io1 = proc_io()
        result.update({
            "status": "loaded", "load_s": load_s,
            "load_read": io1["read_bytes"] - io0["read_bytes"], "load_write": io1["write_bytes"] - io0["write_bytes"],
            "load_machine_read": disk_reads() - machine0,
            "load_rss": peak.peak_rss - base_rss, "load_anon": (peak.peak_anon or 0) - base_anon,
            "rss_after_load": proc_status("VmRSS") - base_rss, "anon_after_load": proc_status("RssAnon") - base_anon,
            "tiers": tier_bytes(model, system.split("-")[0], config), "offload_written": folder_bytes(offload),
            "mem_available_before_load": available0, "mem_available_after_load": meminfo("MemAvailable"),
            "cached_after_load": meminfo("Cached"), "forwards": {}, "forward_rss": 0, "forward_anon": 0,
        })
        save()
        tiers = ", ".join(f"{k} {v / GB:.1f} GB" for k, v in sorted(result["tiers"].items()))
        log(f"{system}: loaded in {load_s:.1f} s; {tiers}; read {result['load_read'] / GB:.1f} GB, "
            f"offload folder {result['offload_written'] / GB:.1f} GB")

        def counters() -> tuple[dict[str, int], int, resource.struct_rusage, float]:
            result.setdefault("other_users", []).extend(u for u in other_users(folder) if u not in result["other_users"])
            return proc_io(), disk_reads(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()

        def figures(before: tuple[dict[str, int], int, resource.struct_rusage, float]) -> dict[str, Any]:
            after = counters()
            peak.sample()
            rss, anon = peak.peak_rss - base_rss, (peak.peak_anon or 0) - base_anon
            result["forward_rss"], result["forward_anon"] = max(result["forward_rss"], rss), max(result["forward_anon"], anon)
            return {
                "s": after[3] - before[3], "read": after[0]["read_bytes"] - before[0]["read_bytes"],
                "write": after[0]["write_bytes"] - before[0]["write_bytes"], "machine_read": after[1] - before[1],
                "majflt": after[2].ru_majflt - before[2].ru_majflt, "minflt": after[2].ru_minflt - before[2].ru_minflt,
                "cpu_s": (after[2].ru_utime + after[2].ru_stime) - (before[2].ru_utime + before[2].ru_stime),
                "loadavg": loadavg(),
                "rss": rss, "anon": anon, "cached": meminfo("Cached"), "available": meminfo("MemAvailable"),
            }

        for batch in BATCHES:
            ids = token_batch(batch, TOKENS, vocab=config["vocab_size"])
            rows: list[dict[str, Any]] = result["forwards"].setdefault(str(batch), [])
            last: list[torch.Tensor] = []
            for i in range(REPEAT):
                peak.reset()
                before = counters()
                with torch.inference_mode():
                    logits = model(input_ids=ids, use_cache=False).logits
                rows.append(figures(before))
                last.append(logits[:, -1].float().clone())
                del logits
                outputs[f"b{batch}"] = torch.stack(last)
                torch.save(outputs, out / f"{system}.pt")
                result["status"] = f"forward {batch}x{TOKENS} #{i + 1}"
                save()
                r = rows[-1]
                log(f"{system}: batch {batch} forward {i + 1}: {r['s']:.2f} s (CPU {r['cpu_s']:.1f} s), read {r['read'] / GB:.2f} GB "
                    f"(machine {r['machine_read'] / GB:.2f}), {r['majflt']} major faults, peak RSS growth {r['rss'] / MiB:.0f} MiB, "
                    f"load average {r['loadavg']}")
        ids = token_batch(1, TOKENS, vocab=config["vocab_size"])
        result["status"] = f"decoding {NEW_TOKENS} tokens"
        result["decode_started"] = time.time()  # a decode that times out still says how long it ran
        save()
        peak.reset()
        before = counters()
        with torch.inference_mode():
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                       min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        decode = figures(before)
        decode["tokens"] = generated[0, TOKENS:].tolist()
        result["decode"] = decode
        outputs["tokens"] = decode["tokens"]
        torch.save(outputs, out / f"{system}.pt")
        result["vmhwm"] = proc_status("VmHWM") - base_rss
        save()
        log(f"{system}: decoded {NEW_TOKENS} tokens at {decode['s'] / NEW_TOKENS:.1f} s a token, "
            f"read {decode['read'] / GB:.1f} GB: {decode['tokens']}")


def compute_child(folder: Path, out: Path) -> None:
    """The compute bound: KEEP_LAYERS decoder layers, the norm and the head in RAM (fp32, the checkpoint's
    own weights), timed at each batch; full depth = the small model's forward + the missing layers at
    the measured time a layer (forward hooks)."""
    import transformers

    torch.set_num_threads(THREADS)
    config = load_config(folder)
    depth = config["num_hidden_layers"]
    model = into_ram(transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, num_hidden_layers=KEEP_LAYERS))
    model.eval()
    evict(model_files(folder))
    layer_s: list[float] = []
    marks: dict[int, float] = {}
    for index, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=index: marks.__setitem__(i, time.perf_counter()))
        layer.register_forward_hook(lambda m, a, o, i=index: layer_s.append(time.perf_counter() - marks[i]))
    shapes_ = [(b, TOKENS) for b in BATCHES] + [(1, 1)]  # (1, 1): one decoding step's forward
    result: dict[str, Any] = {"layers_built": KEEP_LAYERS, "depth": depth, "threads": torch.get_num_threads(), "batches": {}}
    with torch.inference_mode():
        for batch, tokens in shapes_:
            ids = token_batch(batch, tokens, vocab=config["vocab_size"])
            model(input_ids=ids, use_cache=False)  # warm-up
            totals, per_layer = [], []
            cpu0 = time.process_time()
            for _ in range(REPEAT):
                layer_s.clear()
                t = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                totals.append(time.perf_counter() - t)
                per_layer.append(statistics.mean(layer_s))
            cpu = (time.process_time() - cpu0) / REPEAT
            small, layer = statistics.median(totals), statistics.median(per_layer)
            full = small + (depth - KEEP_LAYERS) * layer
            result["batches"][f"{batch}x{tokens}"] = {"small_s": small, "layer_s": layer, "full_s": full, "small_cpu_s": cpu,
                                                      "loadavg": loadavg()}
            log(f"compute bound {batch}x{tokens}: {KEEP_LAYERS} layers + head {small:.3f} s (CPU {cpu:.3f} s), a layer {layer:.3f} s, "
                f"{depth} layers {full:.2f} s; load average {loadavg()}")
    write_json(out / "compute.json", result)


# --------------------------------------------------------------------------------------------
# Parent: the bounds, then each system in turn.


def disk_rates(files: list[Path]) -> dict[str, float]:
    """Cold read rates (GB/s) over RATE_SHARDS shards from the middle of the checkpoint, evicted first."""
    middle = len(files) // 2
    chosen = files[max(0, middle - RATE_SHARDS // 2):][:RATE_SHARDS]
    evict(chosen)
    direct = direct_read_gbps(chosen)
    buffered = cold_read_gbps(chosen)  # evicts them itself
    evict(chosen)
    return {"direct": direct, "buffered": buffered, "bytes": sum(p.stat().st_size for p in chosen)}


def spawn(args: list[str], timeout: float, watch: Path | None, min_free: int) -> str:
    """Run ``big.py ARGS`` in a fresh process (its own session, so a timeout kills all of it): "" or why it stopped."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], start_new_session=True,
                            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
                                 "TQDM_DISABLE": "1"})
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                rc = proc.wait(timeout=5)
                return "" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return f"timed out after {timeout / 60:.0f} min"
            if watch is not None and shutil.disk_usage(watch).free < min_free:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return f"stopped: less than {min_free / GiB:.0f} GiB left on the disk"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_system(system: str, folder: Path, budget: int, out: Path, offload_root: Path, args: argparse.Namespace) -> None:
    path = out / f"results-{system}.json"
    offload = offload_root / f"offload-{system}"
    files = model_files(folder)
    shutil.rmtree(offload, ignore_errors=True)
    offload.mkdir(parents=True)
    # Accelerate copies the whole disk tier into its offload folder; the others read the checkpoint.
    need = args.min_free + (weight_bytes(load_config(folder)) - budget if system == "accelerate" else 0)
    free = shutil.disk_usage(offload_root).free
    for stale in (out / f"{system}.pt",):
        stale.unlink(missing_ok=True)
    if free < need:
        write_json(path, {"system": system, "status": f"skipped: {free / GB:.1f} GB free on {offload_root}, needs {need / GB:.1f}"})
        log(f"{system}: skipped, not enough disk")
        return
    others = wait_for_others(folder, args.wait_others)
    rates = {"before": disk_rates(files)}
    log(f"{system}: disk cold read O_DIRECT {rates['before']['direct']:.2f} GB/s, buffered {rates['before']['buffered']:.2f} GB/s")
    write_json(path, {"system": system, "status": "starting", "disk_rates": rates, "loadavg_before": loadavg(),
                      "offload_folder": str(offload), "disk_free_before": free, "other_users_at_start": others})
    evict(files + files_under(offload))
    stopped = spawn(["--child", system, "--model", str(folder), "--budget", str(budget), "--out", str(out), "--offload", str(offload)],
                    args.timeout, offload_root, args.min_free)
    result = read_json(path) or {"system": system}
    result["offload_folder_bytes"] = folder_bytes(offload)
    result["finished_by_parent"] = time.time()
    if not args.keep_offload:
        shutil.rmtree(offload, ignore_errors=True)
    rates["after"] = disk_rates(files)
    result.update({"disk_rates": rates, "loadavg_after": loadavg()})
    if stopped and not str(result.get("status", "")).startswith("failed:"):
        result["status"] = f"{stopped} (at: {result.get('status', '?')})"
    write_json(path, result)
    log(f"{system}: {result['status']}; load average {result.get('loadavg_before')} -> {result['loadavg_after']}")


def ensure_model(folder: Path, quick: bool) -> Path:
    if (folder / "config.json").exists() and model_files(folder):
        return folder  # never regenerated: a run reuses what is there
    config, shards = (QUICK, 2) if quick else (LLAMA_7B40, BIG_SHARDS)
    need = weight_bytes(config) + 2 * GiB
    folder.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(folder.parent).free < need:
        raise SystemExit(f"{folder} is missing and writing it needs {need / GB:.0f} GB free on {folder.parent}")
    log(f"writing {folder} ({weight_bytes(config) / GB:.1f} GB, {shards} shards)")
    return write_model_folder(folder, config, seed=0, shards=shards)


# --------------------------------------------------------------------------------------------
# Report: the tables, from the saved JSONs.


def _median_rest(rows: list[dict[str, Any]], key: str) -> float | None:
    rest = [r[key] for r in rows[1:] if key in r]
    return statistics.median(rest) if rest else None


def _f(value: float | None, fmt: str = ".2f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, fmt)


def _s(value: float | None) -> str:
    """Seconds, to three significant digits or tenths."""
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def cache_keeps(r: dict[str, Any], margin: int) -> int:
    """What the page cache can keep of the disk tier: MemAvailable after the load, less ``margin``, less the
    CPU-tier bytes not yet in the process's anonymous memory (a tier left as views of the mapped checkpoint,
    as Transformers leaves it, needs the cache too)."""
    cpu = r.get("tiers", {}).get("cpu", 0)
    unresident = max(0, cpu - max(0, r.get("anon_after_load", 0)))
    return max(0, r["mem_available_after_load"] - margin - unresident)


def disk_bound(r: dict[str, Any], margin: int) -> float | None:
    if "tiers" not in r or "disk_rates" not in r:
        return None
    rates = [v["direct"] for v in r["disk_rates"].values() if v.get("direct")]
    if not rates:
        return None
    must = max(0, r["tiers"].get("disk", 0) - cache_keeps(r, margin))
    return must / (statistics.mean(rates) * GB)


def report(out: Path, margin: int) -> str:
    meta = read_json(out / "run.json") or {}
    compute = (read_json(out / "compute.json") or {}).get("batches", {})
    results = {s: r for s in SYSTEMS if (r := read_json(out / f"results-{s}.json"))}
    outputs = {s: torch.load(out / f"{s}.pt", weights_only=True) for s in results if (out / f"{s}.pt").exists()}
    lines: list[str] = []
    add = lines.append
    budget = next((r["budget"] for r in results.values() if "budget" in r), meta.get("budget", 0))
    weights = meta.get("weights", 0)
    add(f"# {meta.get('command', 'benchmarks/big.py')}")
    add(f"# model {meta.get('model', '?')}: {meta.get('params', 0) / 1e9:.2f}G parameters, {weights / GB:.1f} GB "
        f"({weights / GiB:.1f} GiB) fp32 in {meta.get('shards', '?')} shards; RAM {meta.get('mem_total', 0) / GiB:.1f} GiB "
        f"(checkpoint {weights / max(1, meta.get('mem_total', 1)):.2f}x RAM); CPU budget {budget / GiB:.2f} GiB; "
        f"torch threads {THREADS}; fp32; batches {', '.join(f'{b} x {TOKENS}' for b in BATCHES)} tokens")
    add(f"# {meta.get('versions', '')}; {meta.get('cpu', '')} (avx512_bf16: {'yes' if meta.get('avx512_bf16') else 'no'}); "
        f"{meta.get('machine', '')}")
    for s, r in results.items():
        add(f"# {s}: started {time.strftime('%Y-%m-%d %H:%M', time.localtime(r['started'])) if 'started' in r else '-'}, "
            f"load average {r.get('loadavg_before', '?')} -> {r.get('loadavg_after', '?')}; bigjob tree {r.get('bigjob_tree', '?')} "
            f"@ {r.get('bigjob_commit', '?')}")
        others = sorted(set(r.get("other_users_at_start", [])) | set(r.get("other_users", [])))
        if others:
            add(f"#   other processes had the checkpoint open or mapped during {s}'s run: {'; '.join(others)}")
    if compute:
        add(f"# compute bound measured at load average {next(iter(compute.values())).get('loadavg', '?')}")
    add("")
    add("Bounds (measured in the run):")
    add("")
    add("| compute bound | " + " | ".join(compute) + " |")
    add("|---|" + "---|" * len(compute))
    add(f"| {KEEP_LAYERS} layers + embedding + norm + head in RAM, s | " + " | ".join(f"{v['small_s']:.3f}" for v in compute.values()) + " |")
    add(f"| the same, process CPU s (2 threads: up to 2x wall when it has both cores) | "
        + " | ".join(_s(v.get("small_cpu_s")) for v in compute.values()) + " |")
    add("| a decoder layer, s | " + " | ".join(f"{v['layer_s']:.3f}" for v in compute.values()) + " |")
    add(f"| scaled to {meta.get('depth', '?')} layers, s | " + " | ".join(f"{v['full_s']:.2f}" for v in compute.values()) + " |")
    add("")
    add(f"| system | cold read O_DIRECT GB/s (before / after) | buffered GB/s | disk tier GB | MemAvailable after load GB | "
        f"CPU tier in the cache, not anonymous GB | cache can keep GB (margin {margin / GiB:.1f} GiB) | from disk GB | disk bound s |")
    add("|---|---|---|---|---|---|---|---|---|")
    for s, r in results.items():
        rates = r.get("disk_rates", {})
        direct = " / ".join(f"{v['direct']:.2f}" for v in rates.values())
        buffered = " / ".join(f"{v['buffered']:.2f}" for v in rates.values())
        if "tiers" not in r:
            add(f"| {s} | {direct or '-'} | {buffered or '-'} | - | - | - | - | - | - |")
            continue
        keep = cache_keeps(r, margin)
        unresident = max(0, r["tiers"].get("cpu", 0) - max(0, r.get("anon_after_load", 0)))
        disk = r["tiers"].get("disk", 0)
        add(f"| {s} | {direct} | {buffered} | {disk / GB:.1f} | {r['mem_available_after_load'] / GB:.1f} | {unresident / GB:.1f} | "
            f"{keep / GB:.1f} | {max(0, disk - keep) / GB:.1f} | {_s(disk_bound(r, margin))} |")
    add("")
    add("| system | status | load s | read at load GB | written at load GB | offload folder GB | tiers GB | "
        "load: peak RSS growth MiB | forwards: peak RSS growth MiB | over budget MiB | forwards: peak anon growth MiB | VmHWM growth MiB |")
    add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s, r in results.items():
        tiers = ", ".join(f"{k} {v / GB:.1f}" for k, v in sorted(r.get("tiers", {}).items())) or "-"
        fwd = r.get("forward_rss") if r.get("forwards") else None
        over = None if fwd is None else fwd - budget
        offload = r.get("offload_folder_bytes", r.get("offload_written"))
        add(f"| {s} | {r.get('status', '?')} | {_s(r.get('load_s'))} | {_f(r.get('load_read'), '.1f', GB)} | "
            f"{_f(r.get('load_write'), '.1f', GB)} | {_f(offload, '.1f', GB)} | {tiers} | {_f(r.get('load_rss'), '.0f', MiB)} | "
            f"{_f(fwd, '.0f', MiB)} | {_f(over, '+.0f', MiB)} | {_f(r.get('forward_anon') if fwd is not None else None, '.0f', MiB)} | "
            f"{_f(r.get('vmhwm'), '.0f', MiB)} |")
    add("")
    add("| system | batch | first s | median s (2nd-5th) | CPU s median | read first GB | read median GB | major faults median | "
        "compute bound s | disk bound s | x max(bounds) | x Transformers | max abs diff vs Transformers |")
    add("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ref = results.get(REFERENCE, {})
    for s, r in results.items():
        bound_disk = disk_bound(r, margin)
        for batch in BATCHES:
            rows = r.get("forwards", {}).get(str(batch), [])
            if not rows:
                add(f"| {s} | {batch} | {r.get('status', '?')} | | | | | | | | | | |")
                continue
            median = _median_rest(rows, "s")
            comp = compute.get(f"{batch}x{TOKENS}", {}).get("full_s")
            bound = max(x for x in (comp, bound_disk, 0.0) if x is not None)
            ref_rows = ref.get("forwards", {}).get(str(batch), [])
            ref_median = _median_rest(ref_rows, "s")
            diff = "-"
            key = f"b{batch}"
            if s != REFERENCE and key in outputs.get(s, {}) and key in outputs.get(REFERENCE, {}):
                a, b = outputs[s][key], outputs[REFERENCE][key]
                n = min(len(a), len(b))
                diff = f"{float((a[:n] - b[:n]).abs().max()):.3g}" if n else "-"
            add(f"| {s} | {batch} | {_s(rows[0]['s'])} | {_s(median)} | {_s(_median_rest(rows, 'cpu_s'))} | {rows[0]['read'] / GB:.2f} | "
                f"{_f(_median_rest(rows, 'read'), '.2f', GB)} | {_f(_median_rest(rows, 'majflt'), '.0f')} | {_s(comp)} | "
                f"{_s(bound_disk)} | {_f(median / bound if median and bound else None)} | "
                f"{_f(median / ref_median if median and ref_median and s != REFERENCE else None)} | {diff} |")
    add("")
    add(f"| system | greedy decoding, {NEW_TOKENS} new tokens at batch 1: s a token | read a token GB | x max(bounds) | "
        "x Transformers | peak RSS growth MiB | tokens | equal Transformers' |")
    add("|---|---|---|---|---|---|---|---|")
    ref_decode = ref.get("decode")
    for s, r in results.items():
        d = r.get("decode")
        if not d:
            ran = ""
            if "decode_started" in r and "timed out" in str(r.get("status")) and "finished_by_parent" in r:
                seconds = r["finished_by_parent"] - r["decode_started"]
                ran = f"> {seconds / NEW_TOKENS:.0f} (stopped after {seconds:.0f} s, under {NEW_TOKENS} tokens)"
            add(f"| {s} | {ran or r.get('status', '?')} | | | | | | |")
            continue
        per = d["s"] / NEW_TOKENS
        comp = compute.get("1x1", {}).get("full_s")
        bound = max(x for x in (comp, disk_bound(r, margin), 0.0) if x is not None)
        equal = "-" if s == REFERENCE or not ref_decode else ("yes" if d["tokens"] == ref_decode["tokens"] else "NO")
        vs_ref = per / (ref_decode["s"] / NEW_TOKENS) if ref_decode and s != REFERENCE else None
        add(f"| {s} | {_s(per)} | {d['read'] / NEW_TOKENS / GB:.2f} | {_f(per / bound if bound else None)} | {_f(vs_ref)} | "
            f"{d['rss'] / MiB:.0f} | {' '.join(map(str, d['tokens']))} | {equal} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help=f"model folder (default {DEFAULT_MODEL}; --quick: OUT/model); written if missing")
    parser.add_argument("--budget", help="CPU budget (default 4GiB; --quick: 10MiB)")
    parser.add_argument("--systems", default="transformers,accelerate,bigjob", help=f"comma list of: {', '.join(SYSTEMS)}")
    parser.add_argument("--quick", action="store_true", help="a tiny model in /tmp/bb/quick: a smoke run in seconds")
    parser.add_argument("--report", action="store_true", help="print the tables from the saved results, run nothing")
    parser.add_argument("--out", type=Path, help=f"results folder (default {DEFAULT_OUT}; --quick: {DEFAULT_OUT}/quick)")
    parser.add_argument("--offload-root", type=Path, help="offload folders go to ROOT/offload-SYSTEM (default: the model's parent)")
    parser.add_argument("--timeout", type=float, default=60 * 60, help="seconds a system may take (default 60 min)")
    parser.add_argument("--min-free", type=float, default=2, help="GiB the disk must keep free; a system is stopped below it")
    parser.add_argument("--cache-margin", type=float, default=1.0, help="GiB of MemAvailable the page cache is not counted on for")
    parser.add_argument("--wait-others", type=float, default=15 * 60,
                        help="seconds to wait, before each system, for other processes using the checkpoint to finish")
    parser.add_argument("--skip-bounds", action="store_true", help="keep the compute bound of an earlier run")
    parser.add_argument("--keep-offload", action="store_true", help="leave offload folders on disk")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--offload", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = args.out or (DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT)
    folder = args.model or (out / "model" if args.quick else DEFAULT_MODEL)
    margin = int(args.cache_margin * GiB)
    args.min_free = int(args.min_free * GiB)
    if args.child == "compute":
        compute_child(folder, out)
        return
    if args.child:
        system_child(args.child, folder, int(args.budget), args.offload, out)
        return
    if args.report:
        print(report(out, margin))
        return
    from bigjob.engine.plan.devices import parse_size

    budget = parse_size(args.budget or ("10MiB" if args.quick else "4GiB"))
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    out.mkdir(parents=True, exist_ok=True)
    folder = ensure_model(folder, args.quick)
    config = load_config(folder)
    offload_root = args.offload_root or folder.resolve().parent
    files = model_files(folder)
    meta = {"command": " ".join(["big.py", *sys.argv[1:]]), "model": str(folder), "budget": budget,
            "weights": weight_bytes(config), "params": weight_bytes(config) // 4, "shards": len(files),
            "depth": config["num_hidden_layers"], "loadavg_start": loadavg(), "started": time.time(), **machine_facts()}
    previous = read_json(out / "run.json") or {}
    if previous.get("model") == meta["model"] and previous.get("budget") == budget:
        meta["earlier_commands"] = [*previous.get("earlier_commands", []), previous.get("command")]
    write_json(out / "run.json", meta)
    log(f"{folder}: {meta['weights'] / GB:.1f} GB, budget {budget / GiB:.2f} GiB, systems {systems}, load average {loadavg()}")
    if not args.skip_bounds or not (out / "compute.json").exists():
        evict(files)
        stopped = spawn(["--child", "compute", "--model", str(folder), "--out", str(out)], args.timeout, None, 0)
        if stopped:
            log(f"compute bound: {stopped}")
    for system in systems:
        run_system(system, folder, budget, out, offload_root, args)
    meta["loadavg_end"], meta["finished"] = loadavg(), time.time()
    write_json(out / "run.json", meta)
    text = report(out, margin)
    (out / "report.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
