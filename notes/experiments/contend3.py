import sys, time, torch, os, threading, mmap
sys.path.insert(0, "/work/main/benchmarks")
from pathlib import Path
from _common import evict
files = sorted(Path("/tmp/bigjob-bench-hf-llama").glob("*.safetensors"))
a = torch.randn(256, 1024); w = torch.randn(1024, 2816)
def compute(n=200):
    t = time.perf_counter()
    for _ in range(n): a @ w
    return time.perf_counter() - t
def reader(method, out):
    t = time.perf_counter(); total = 0
    if method == "anon":
        buf = mmap.mmap(-1, 1300 << 20)
        buf.madvise(22 + 1)  # MADV_POPULATE_WRITE
        total = len(buf); buf.close()
    elif method == "anonhuge":
        buf = mmap.mmap(-1, 1300 << 20); buf.madvise(mmap.MADV_HUGEPAGE)
        buf.madvise(23); total = len(buf); buf.close()
    else:
        for p in files:
            with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                mm.madvise(mmap.MADV_HUGEPAGE)
                size = len(mm)
                for off in range(0, size, 64 << 20):
                    l = min(64 << 20, size - off)
                    mm.madvise(22, off, l); mm.madvise(mmap.MADV_DONTNEED, off, l)
                total += size
    out.append((total, time.perf_counter() - t))
compute()
for r in range(2):
    for method, pause in (("huge", 0.0), ("huge", 6.0), ("anon", 0.0), ("anon", 6.0), ("anonhuge", 6.0)):
        evict(files); time.sleep(pause)
        base = compute()
        out = []
        th = threading.Thread(target=reader, args=(method, out)); th.start()
        c = compute(); th.join()
        total, s = out[0]
        print(f"{method:8s} pause {pause}: compute alone {base:.3f} with {c:.3f} (+{c-base:.3f}); {total/2**20:.0f} MiB in {s:.2f}s", flush=True)
