import sys, time, torch, os, threading, mmap, statistics as st
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
    for p in files:
        if method == "none":
            continue
        if method.startswith("read"):
            chunk = int(method[4:] or 16) << 20
            with open(p, "rb", buffering=0) as f:
                buf = bytearray(chunk)
                while (n := f.readinto(buf)): total += n
        elif method.startswith("direct"):
            chunk = int(method[6:] or 16) << 20
            fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
            buf = mmap.mmap(-1, chunk)
            size = p.stat().st_size; off = 0
            while off < size:
                n = os.preadv(fd, [buf], off); total += n; off += n
                if n < chunk: break
            os.close(fd)
        else:
            with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                if method == "huge": mm.madvise(mmap.MADV_HUGEPAGE)
                size = len(mm)
                for off in range(0, size, 64 << 20):
                    l = min(64 << 20, size - off)
                    mm.madvise(22, off, l); mm.madvise(mmap.MADV_DONTNEED, off, l)
                total += size
    out.append((total, time.perf_counter() - t))
compute()
methods = sys.argv[1].split(",")
res = {m: [] for m in methods}
for r in range(3):
    for method in methods:
        evict(files); time.sleep(0.3)
        out = []
        th = threading.Thread(target=reader, args=(method, out)); th.start()
        c = compute(); th.join()
        total, s = out[0]
        res[method].append((c, total / max(s, 1e-9) / 1e9, s))
for m, v in res.items():
    print(f"{m:10s} compute {[round(x[0],3) for x in v]} read GB/s {[round(x[1],2) for x in v]} read s {[round(x[2],2) for x in v]}")
