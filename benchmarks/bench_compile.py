"""Time of compile_for_compression with no passes on models of about 50, 500 and 5000 graph nodes.

Growth should be linear: the figure of merit is time per node at each size relative to
the smallest model, measured in one run (tracing, shape propagation, GraphModule codegen).

    .venv/bin/python benchmarks/bench_compile.py
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from fxcompress import compile_for_compression


class Block(nn.Module):
    """conv-bn-relu with a residual add: 4 graph nodes."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x):
        return x + self.relu(self.bn(self.conv(x)))


class Deep(nn.Module):
    def __init__(self, blocks: int, channels: int = 4):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(channels) for _ in range(blocks)])

    def forward(self, x):
        return self.blocks(x)


def measure(blocks: int, repeats: int) -> tuple[int, float]:
    model = Deep(blocks).eval()
    x = torch.randn(1, 4, 4, 4)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, gm = compile_for_compression(model, [], (x,))
        times.append(time.perf_counter() - start)
    return len(gm.graph.nodes), statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    measure(4, 1)  # warm-up: imports, first-call caches
    rows = [measure(blocks, args.repeats) for blocks in (12, 125, 1250)]
    base_nodes, base_time = rows[0]
    print("| nodes | seconds | time ratio vs smallest | time per node ratio vs smallest |")
    print("|---|---|---|---|")
    for nodes, seconds in rows:
        per_node = (seconds / nodes) / (base_time / base_nodes)
        print(f"| {nodes} | {seconds:.3f} | {seconds / base_time:.1f}x | {per_node:.2f} |")


if __name__ == "__main__":
    main()
