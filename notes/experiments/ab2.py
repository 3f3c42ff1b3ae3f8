import sys, time, torch, statistics as st
sys.path.insert(0, "/work/main/benchmarks")
from pathlib import Path
from _common import evict, warm
from workload import token_batch
import bigjob, bigjob.models.hf
folder = Path("/tmp/bigjob-bench-hf-llama"); files = sorted(folder.glob("*.safetensors"))
m = bigjob.from_pretrained(folder, max_memory={"cpu": int(1364236288 * 0.3)}, disk_reads="direct")
sched = bigjob.get_dispatch_info(m).schedule
units = [u for u in sched.units if getattr(u, "direct", None) is not None]
saved = {id(u): u.direct for u in units}
def set_mode(mode):
    for u in units:
        u.direct = None if mode == "mapped" else saved[id(u)]
ids = token_batch(int(sys.argv[1]), 64)
res = {}
with torch.inference_mode():
    m(input_ids=ids, use_cache=False); m(input_ids=ids, use_cache=False)
    for i in range(int(sys.argv[2])):
        for label, mode, cold in (("warm-mapped", "mapped", False), ("cold-mapped", "mapped", True), ("cold-direct", "direct", True), ("warm-direct", "direct", False)):
            set_mode(mode)
            (evict if cold else warm)(files)
            t = time.perf_counter(); m(input_ids=ids, use_cache=False); res.setdefault(label, []).append(time.perf_counter() - t)
base = st.median(res["warm-mapped"])
for k, v in res.items():
    print(f"{k:12s} median {st.median(v):.3f} x{st.median(v)/base:.3f}  {[round(x,3) for x in v]}")
