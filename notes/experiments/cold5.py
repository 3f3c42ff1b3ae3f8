import sys, time, torch, os, threading
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/benchmarks")
from pathlib import Path
from _common import evict, warm
from workload import token_batch
import bigjob, bigjob.models.hf
import bigjob.engine.hooks as H
folder = Path("/tmp/bigjob-bench-hf-llama"); files = sorted(folder.glob("*.safetensors"))
budget = int(1364236288 * 0.3)
stats = {"pop": 0.0, "popn": 0, "popbytes": 0, "take": 0.0, "rel": 0.0, "popcpu": 0.0}
orig_pop = H.populate
def pop(ranges, readahead=True):
    ranges = list(ranges)
    t = time.perf_counter(); c = time.thread_time(); orig_pop(ranges, readahead); stats["pop"] += time.perf_counter() - t; stats["popn"] += 1; stats["popcpu"] += time.thread_time() - c
    stats["popbytes"] += sum(r.length for r in ranges)
H.populate = pop
orig_take = H.Prefetcher.take
def take(self, key):
    t = time.perf_counter(); r = orig_take(self, key); stats["take"] += time.perf_counter() - t; return r
H.Prefetcher.take = take
orig_rel = H.release
def rel(ranges):
    t = time.perf_counter(); orig_rel(ranges); stats["rel"] += time.perf_counter() - t
H.release = rel
m = bigjob.from_pretrained(folder, max_memory={"cpu": budget})
ids = token_batch(int(sys.argv[1]), 64)
def run(label):
    for k in stats: stats[k] = 0
    t = time.perf_counter(); m(input_ids=ids, use_cache=False); s = time.perf_counter() - t
    print(f"{label} {s:.3f} populate {stats['pop']:.3f}s in {stats['popn']} ({stats['popbytes']/2**20:.0f} MiB) cpu {stats['popcpu']:.3f} wait {stats['take']:.3f} release {stats['rel']:.3f}", flush=True)
from bigjob.job.report import MemorySampler
import contextlib
mode = sys.argv[2]
ctx = MemorySampler(0.005) if "sampler" in mode else contextlib.nullcontext()
with ctx, torch.inference_mode():
    m(input_ids=ids, use_cache=False); m(input_ids=ids, use_cache=False)
    for i in range(4):
        warm(files)
        if "sleep" in mode: time.sleep(1.5)
        run("warm")
    for i in range(4):
        evict(files)
        if "sleep" in mode: time.sleep(1.5)
        run("cold")
