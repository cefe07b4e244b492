"""Fake-quantize kernel throughput: fxcompress's compiled op against PyTorch's
learnable fake quantize and against fxcompress's pure-PyTorch reference.

Each measurement is one training step of the op: forward and backward with
gradients for x, scale and zero point (torch.autograd.grad, so nothing
accumulates into .grad). Per tensor and per channel (weights-like
[256, N/256] along axis 0), on N = 1M and 16M float32 elements. Memory
bandwidth is measured in the same run by plain copies: dst.copy_(src) into a
preallocated tensor (the bandwidth) and src.clone() (a copy that allocates its
output, as every op here does; on CPU that includes faulting fresh pages in).

Throughput in GB/s counts the bytes a fused implementation must move: the
forward reads x and writes y, the backward reads grad and x and writes grad_x,
so 5 * 4 * N bytes per step; a copy moves 2 * 4 * N. Methods run interleaved,
round after round, and the fastest round of each is reported: on a shared,
noisy machine other processes only ever add time.

    .venv/bin/python benchmarks/kernels.py                 # CPU, markdown table
    .venv/bin/python benchmarks/kernels.py --device cuda   # on a GPU
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

import fxcompress.ops as ops
from fxcompress.ops import reference

QUANT_MIN, QUANT_MAX = -128, 127
CHANNELS = 256


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_case(n: int, per_channel: bool, device: torch.device):
    g = torch.Generator().manual_seed(0)
    if per_channel:
        x = torch.randn(CHANNELS, n // CHANNELS, generator=g)
        scale = torch.rand(CHANNELS, generator=g) * 0.02 + 0.01
        zero_point = torch.randint(-3, 4, (CHANNELS,), generator=g).float()
        axis = 0
    else:
        x = torch.randn(n, generator=g)
        scale, zero_point, axis = torch.full((1,), 0.02), torch.full((1,), 3.0), None
    grad = torch.randn(x.shape, generator=g)
    return [t.to(device) for t in (x, scale, zero_point, grad)] + [axis]


def step_functions(x, scale, zero_point, grad, axis):
    """name -> a function running one forward + backward step."""
    leaves = [t.clone().requires_grad_() for t in (x, scale, zero_point)]

    def ours():
        y = ops.fake_quantize(*leaves, QUANT_MIN, QUANT_MAX, axis)
        return torch.autograd.grad(y, leaves, grad)

    def pytorch():
        if axis is None:
            y = torch._fake_quantize_learnable_per_tensor_affine(*leaves, QUANT_MIN, QUANT_MAX, 1.0)
        else:
            y = torch._fake_quantize_learnable_per_channel_affine(*leaves, axis, QUANT_MIN, QUANT_MAX, 1.0)
        return torch.autograd.grad(y, leaves, grad)

    def ref():
        reference.fake_quantize(x, scale, zero_point, QUANT_MIN, QUANT_MAX, axis)
        return reference.fake_quantize_backward(grad, x, scale, zero_point, QUANT_MIN, QUANT_MAX, axis)

    def ops_only():  # the two kernels without autograd: how close they get to the bandwidth
        torch.ops.fxcompress.fake_quantize(x, scale, zero_point, QUANT_MIN, QUANT_MAX, axis)
        return torch.ops.fxcompress.fake_quantize_backward(grad, x, scale, zero_point, QUANT_MIN, QUANT_MAX, axis)

    return {"fxcompress": ours, "pytorch_learnable": pytorch, "reference": ref, "fxcompress_ops": ops_only}


def time_interleaved(functions: dict, device: torch.device, rounds: int, min_seconds: float) -> dict:
    """Seconds per call of each function: the fastest of `rounds` round-robin samples."""
    for fn in functions.values():  # warm up (allocator, lazy init)
        fn()
    samples = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            calls, start = 0, time.perf_counter()
            while True:
                fn()
                synchronize(device)
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds:
                    break
            samples[name].append(elapsed / calls)
    return {name: min(times) for name, times in samples.items()}


def run(device: torch.device, sizes: list[int], rounds: int, min_seconds: float) -> list[dict]:
    rows = []
    for n in sizes:
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        copies = time_interleaved({"copy_": lambda: dst.copy_(src), "clone": src.clone}, device, rounds,
                                  min_seconds)
        bandwidth = {name: 2 * 4 * n / t / 1e9 for name, t in copies.items()}
        for per_channel in (False, True):
            times = time_interleaved(step_functions(*make_case(n, per_channel, device)), device, rounds, min_seconds)
            step_bytes = 5 * 4 * n
            rows.append({
                "n": n, "kind": "per-channel (axis 0, 256 ch)" if per_channel else "per-tensor",
                "copy_gbs": bandwidth["copy_"], "clone_gbs": bandwidth["clone"], "times": times,
                "gbs": {name: step_bytes / t / 1e9 for name, t in times.items()},
                "vs_pytorch": times["pytorch_learnable"] / times["fxcompress"],
                "vs_reference": times["reference"] / times["fxcompress"],
            })
    return rows


def size_label(n: int) -> str:
    return f"{n // 2**20}M" if n % 2**20 == 0 else str(n)


def markdown(rows: list[dict], device: torch.device, command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        f"Device: {device_description(device)}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"fxcompress backend {ops.backend()}"
        + (f", CPU kernels {ops.backend_info().get('cpu_isa')}" if ops.backend() != "reference" else "") + ".",
        "",
        "Step times in ms (GB/s in parentheses); the ratios are step-time ratios.",
        "",
        "| elements | quantization | fxcompress | PyTorch learnable | reference | **vs PyTorch** | vs reference "
        "| fxcompress ops without autograd | copy_ GB/s | clone GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, g = r["times"], r["gbs"]
        cells = [f"{t[k] * 1e3:.2f} ({g[k]:.1f})" for k in ("fxcompress", "pytorch_learnable", "reference")]
        lines.append(f"| {size_label(r['n'])} | {r['kind']} | {' | '.join(cells)} | **{r['vs_pytorch']:.1f}x** "
                     f"| {r['vs_reference']:.1f}x | {t['fxcompress_ops'] * 1e3:.2f} ({g['fxcompress_ops']:.1f}) "
                     f"| {r['copy_gbs']:.1f} | {r['clone_gbs']:.1f} |")
    return "\n".join(lines)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} cores{load}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--sizes", default="1M,16M", help="comma-separated element counts (M = 2**20)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per measurement")
    parser.add_argument("--min-seconds", type=float, default=0.2, help="minimum time per sample")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    sizes = [int(float(s[:-1]) * 2**20) if s.upper().endswith("M") else int(s) for s in args.sizes.split(",")]
    rows = run(device, sizes, args.rounds, args.min_seconds)
    command = "python benchmarks/kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(markdown(rows, device, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
