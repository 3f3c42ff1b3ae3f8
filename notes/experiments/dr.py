import sys, time, torch, statistics as st
sys.path.insert(0, "/work/main/benchmarks")
from pathlib import Path
from _common import evict, warm
from workload import token_batch
import bigjob, bigjob.models.hf
folder = Path("/tmp/bigjob-bench-hf-llama"); files = sorted(folder.glob("*.safetensors"))
mode = sys.argv[2]
m = bigjob.from_pretrained(folder, max_memory={"cpu": int(1364236288 * 0.3)}, disk_reads=mode)
sched = bigjob.get_dispatch_info(m).schedule
ids = token_batch(int(sys.argv[1]), 64)
with torch.inference_mode():
    out0 = m(input_ids=ids, use_cache=False).logits; m(input_ids=ids, use_cache=False)
    ws = []; cs = []; dw = []; dc = []
    for i in range(5):
        warm(files); t = time.perf_counter(); m(input_ids=ids, use_cache=False); ws.append(time.perf_counter() - t); dw.append(sched.direct_reads)
    for i in range(5):
        evict(files); t = time.perf_counter(); out = m(input_ids=ids, use_cache=False).logits; cs.append(time.perf_counter() - t); dc.append(sched.direct_reads)
print(mode, "warm", [round(x,3) for x in ws], dw, "cold", [round(x,3) for x in cs], dc, "med", round(st.median(ws),3), round(st.median(cs),3), "x", round(st.median(cs)/st.median(ws), 3), "diff", float((out-out0).abs().max()), "pool", sched.pool and sched.pool.held)
