"""Planning time of a meta-device model with ~200,000 parameter tensors.

The model is transformer-shaped: blocks of four attention projections, two MLP
projections and two LayerNorms, every Linear with a bias (16 tensors, 11 modules a block).
Building it under ``init_empty_weights`` is not timed; ``infer_auto_device_map`` is, for
each strategy, over a declared inventory of two GPUs, CPU and disk.

    python benchmarks/plan_time.py [--tensors 200000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
from torch import nn

from bigjob import __version__
from bigjob.engine.plan.empty import init_empty_weights
from bigjob.engine.plan.planner import STRATEGIES
from bigjob.engine.plan.resolution import infer_auto_device_map


class Attention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))


class MLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = nn.LayerNorm(width), Attention(width), nn.LayerNorm(width), MLP(width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tensors", type=int, default=200_000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    blocks = args.tensors // 16
    with init_empty_weights():
        model = nn.Sequential(*[Block(args.width) for _ in range(blocks)])
    tensors = sum(1 for _ in model.parameters())
    modules = sum(1 for _ in model.modules())
    total = sum(p.numel() * 4 for p in model.parameters())
    budgets = {"cuda:0": total // 8, "cuda:1": total // 8, "cpu": total // 4}
    print(f"# {' '.join(sys.argv)}")
    print(f"# bigjob {__version__}, torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}")
    print(f"# model: {tensors} tensors, {modules} modules, {total / 2**30:.2f} GiB fp32; budgets {budgets} + disk")
    print()
    print("| strategy | no-split | median s | min s | map entries |")
    print("|---|---|---|---|---|")
    for no_split in ([], ["Block"]):
        for strategy in STRATEGIES:
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                device_map = infer_auto_device_map(model, budgets, no_split, strategy=strategy)
                times.append(time.perf_counter() - start)
            label = ",".join(no_split) or "-"
            print(f"| {strategy} | {label} | {statistics.median(times):.3f} | {min(times):.3f} | {len(device_map)} |")


if __name__ == "__main__":
    main()
