"""Fake-quantize kernel throughput: fxcompress's compiled op against PyTorch's
learnable fake quantize, against fxcompress's pure-PyTorch reference, and
against the memory-bound floor.

Each measurement is one training step of the op: forward and backward with
gradients for x, scale and zero point (torch.autograd.grad, so nothing
accumulates into .grad). Per tensor and per channel (weights-like
[256, N/256] along axis 0), on N = 64K, 1M and 16M float32 elements by default.

Throughput in GB/s counts the bytes a fused implementation must move: the
forward reads x and writes y, the backward reads grad and x and writes grad_x,
so 5 * 4 * N bytes per step. The memory-bound floor is the same traffic with
the cheapest math PyTorch has, timed in the same run: ``x.clone()`` (the
forward's read and fresh write) plus ``torch.add(grad, x)`` (the backward's two
reads and fresh write): no kernel that returns new tensors, as these ops do,
can beat it by more than its arithmetic. "warm floor" is the same into
preallocated buffers (``copy_``, ``add(out=)``): what is left without the cost
of fresh output memory (on CPU: faulting new pages in). The machine's
bandwidth is also shown as plain copies: dst.copy_(src) into a preallocated
tensor and src.clone().

Methods run interleaved, round after round; the fastest round of each is
reported (on a shared, noisy machine other processes only ever add time), and
the ratio of the compiled ops to the floor as the median and spread of the
per-round ratios.

    .venv/bin/python benchmarks/kernels.py --threads 1 --clock cpu   # CPU, markdown tables
    .venv/bin/python benchmarks/kernels.py --device cuda   # on a GPU
    .venv/bin/python benchmarks/kernels.py --threads 1 --clock cpu --isas avx512,avx2   # CPU kernels per ISA

``--isas`` compares the compiled CPU kernels' instruction sets instead, in one process: the
forward and backward ops on each (switched with ``torch.ops.fxcompress._set_cpu_isa`` before each
sample) and their floors, interleaved round by round as above.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
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

    def ops_only():  # the two kernels alone: how close they get to the floor
        torch.ops.fxcompress.fake_quantize(x, scale, zero_point, QUANT_MIN, QUANT_MAX, axis)
        return torch.ops.fxcompress.fake_quantize_backward(grad, x, scale, zero_point, QUANT_MIN, QUANT_MAX, axis)

    y_buffer, gx_buffer = torch.empty_like(x), torch.empty_like(x)

    def floor():  # the step's memory traffic with fresh outputs: read x, write y; read grad and x, write grad_x
        x.clone()
        return torch.add(grad, x)

    def warm_floor():  # the same into preallocated outputs
        y_buffer.copy_(x)
        return torch.add(grad, x, out=gx_buffer)

    def forward_op():
        return torch.ops.fxcompress.fake_quantize(x, scale, zero_point, QUANT_MIN, QUANT_MAX, axis)

    def backward_op():
        return torch.ops.fxcompress.fake_quantize_backward(grad, x, scale, zero_point, QUANT_MIN, QUANT_MAX, axis)

    return {"fxcompress": ours, "pytorch_learnable": pytorch, "reference": ref, "fxcompress_ops": ops_only,
            "floor": floor, "warm_floor": warm_floor, "forward_op": forward_op, "clone": x.clone,
            "backward_op": backward_op, "add": lambda: torch.add(grad, x)}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
# The kernels and their floors run without autograd: the dispatcher then goes straight to the
# kernels, past the Python autograd kernel that torch.library.register_autograd puts in front of
# fake_quantize (its cost shows in the "fxcompress" column, the full training step).
WITHOUT_AUTOGRAD = {"fxcompress_ops", "floor", "warm_floor", "forward_op", "clone", "backward_op", "add"}


def time_interleaved(functions: dict, device: torch.device, rounds: int, min_seconds: float,
                     clock: str = "wall", isa_of: dict | None = None) -> dict:
    """Seconds per call of each function, one sample per round-robin round. ``clock="cpu"`` counts
    the process's CPU time: on a machine shared by more jobs than cores, one thread's measure of
    the work itself, without the time spent waiting for a core. Functions named in WITHOUT_AUTOGRAD
    run under ``torch.inference_mode()`` (entered once per sample, not per call). ``isa_of`` maps
    function names to the CPU instruction set their samples (and warm-up) run on."""
    now = CLOCKS[clock]
    isa_of = isa_of or {}

    def use_isa(name):
        if name in isa_of:
            torch.ops.fxcompress._set_cpu_isa(isa_of[name])

    for name, fn in functions.items():  # warm up (allocator, lazy init)
        use_isa(name)
        fn()
    samples = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            use_isa(name)
            with torch.inference_mode(name in WITHOUT_AUTOGRAD or name in isa_of):
                calls, start = 0, now()
                while True:
                    fn()
                    synchronize(device)
                    calls += 1
                    elapsed = now() - start
                    if elapsed >= min_seconds:
                        break
            samples[name].append(elapsed / calls)
    return samples


def run(device: torch.device, sizes: list[int], rounds: int, min_seconds: float, clock: str = "wall") -> list[dict]:
    rows = []
    for n in sizes:
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        copies = time_interleaved({"copy_": lambda: dst.copy_(src), "clone": src.clone}, device, rounds,
                                  min_seconds, clock)
        bandwidth = {name: 2 * 4 * n / min(t) / 1e9 for name, t in copies.items()}
        for per_channel in (False, True):
            samples = time_interleaved(step_functions(*make_case(n, per_channel, device)), device, rounds,
                                       min_seconds, clock)
            times = {name: min(t) for name, t in samples.items()}
            step_bytes = 5 * 4 * n
            rows.append({
                "n": n, "kind": "per-channel (axis 0, 256 ch)" if per_channel else "per-tensor",
                "copy_gbs": bandwidth["copy_"], "clone_gbs": bandwidth["clone"], "times": times,
                "gbs": {name: step_bytes / t / 1e9 for name, t in times.items()},
                "vs_pytorch": times["pytorch_learnable"] / times["fxcompress"],
                "vs_reference": times["reference"] / times["fxcompress"],
                "ops_vs_floor": sorted(a / b for a, b in zip(samples["fxcompress_ops"], samples["floor"])),
                "ops_vs_warm_floor": sorted(a / b for a, b in zip(samples["fxcompress_ops"], samples["warm_floor"])),
                "forward_vs_clone": sorted(a / b for a, b in zip(samples["forward_op"], samples["clone"])),
                "backward_vs_add": sorted(a / b for a, b in zip(samples["backward_op"], samples["add"])),
            })
    return rows


def run_isas(sizes: list[int], isas: list[str], rounds: int, min_seconds: float, clock: str) -> list[dict]:
    """The forward and backward ops on each instruction set against clone / add, interleaved."""
    rows = []
    for n in sizes:
        for per_channel in (False, True):
            x, scale, zero_point, grad, axis = make_case(n, per_channel, torch.device("cpu"))
            args = (scale, zero_point, QUANT_MIN, QUANT_MAX, axis)
            functions, isa_of = {}, {}
            for isa in isas:
                functions[f"forward[{isa}]"] = lambda: torch.ops.fxcompress.fake_quantize(x, *args)
                functions[f"backward[{isa}]"] = lambda: torch.ops.fxcompress.fake_quantize_backward(grad, x, *args)
                isa_of.update({f"forward[{isa}]": isa, f"backward[{isa}]": isa})
            functions.update({"clone": x.clone, "add": lambda: torch.add(grad, x)})
            samples = time_interleaved(functions, torch.device("cpu"), rounds, min_seconds, clock, isa_of)
            step = {isa: [f + b for f, b in zip(samples[f"forward[{isa}]"], samples[f"backward[{isa}]"])]
                    for isa in isas}
            floor = [c + a for c, a in zip(samples["clone"], samples["add"])]
            rows.append({
                "n": n, "kind": "per-channel (axis 0, 256 ch)" if per_channel else "per-tensor",
                "times": {name: min(t) for name, t in samples.items()},
                "step_vs_floor": {isa: sorted(s / f for s, f in zip(step[isa], floor)) for isa in isas},
                # each ISA against the first one, per round
                "vs_first": {isa: {part: sorted(a / b for a, b in zip(samples[f"{part}[{isa}]"],
                                                                      samples[f"{part}[{isas[0]}]"]))
                                   for part in ("forward", "backward")} for isa in isas[1:]},
            })
        torch.ops.fxcompress._set_cpu_isa("")
    return rows


def markdown_isas(rows: list[dict], isas: list[str], command: str) -> str:
    first = isas[0]
    lines = [
        f"Command: `{command}`",
        "",
        f"Device: {device_description(torch.device('cpu'))}; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; CPU kernels compiled: {ops.backend_info()['build']['cpu_isas']}.",
        "",
        "The forward and backward ops alone (no autograd), µs, fastest round; step = forward + backward, "
        "floor = clone + add, per-round ratios as median (min-max).",
        "",
        "| elements | quantization | " + " | ".join(f"forward {i} | backward {i}" for i in isas)
        + " | clone | add | " + " | ".join(f"**step / floor, {i}**" for i in isas) + " | "
        + " | ".join(f"{i} / {first} forward | {i} / {first} backward" for i in isas[1:]) + " |",
        "|---|---|" + "---|" * (2 * len(isas) + 2 + len(isas) + 2 * (len(isas) - 1)),
    ]
    for r in rows:
        t = r["times"]
        cells = [f"{t[f'{part}[{i}]'] * 1e6:.1f}" for i in isas for part in ("forward", "backward")]
        cells += [f"{t['clone'] * 1e6:.1f}", f"{t['add'] * 1e6:.1f}"]
        cells += [f"**{ratio_spread(r['step_vs_floor'][i])}**" for i in isas]
        cells += [ratio_spread(r["vs_first"][i][part]) for i in isas[1:] for part in ("forward", "backward")]
        lines.append(f"| {size_label(r['n'])} | {r['kind']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def size_label(n: int) -> str:
    if n % 2**20 == 0:
        return f"{n // 2**20}M"
    return f"{n // 2**10}K" if n % 2**10 == 0 else str(n)


def parse_size(text: str) -> int:
    """``64K`` = 64 * 2**10, ``1M`` = 2**20, or a plain count."""
    unit = {"K": 2**10, "M": 2**20}.get(text[-1:].upper())
    return int(float(text[:-1]) * unit) if unit else int(text)


def ratio_spread(ratios: list) -> str:
    """Median and min-max of sorted per-round ratios."""
    return f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"


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
        "| fxcompress ops without autograd | floor (clone + add) | warm floor | **ops / floor** | ops / warm floor "
        "| copy_ GB/s | clone GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, g = r["times"], r["gbs"]
        cells = [f"{t[k] * 1e3:.3f} ({g[k]:.1f})" for k in ("fxcompress", "pytorch_learnable", "reference")]
        kernel_cells = [f"{t[k] * 1e3:.3f} ({g[k]:.1f})" for k in ("fxcompress_ops", "floor", "warm_floor")]
        lines.append(f"| {size_label(r['n'])} | {r['kind']} | {' | '.join(cells)} | **{r['vs_pytorch']:.1f}x** "
                     f"| {r['vs_reference']:.1f}x | {' | '.join(kernel_cells)} | **{ratio_spread(r['ops_vs_floor'])}** "
                     f"| {ratio_spread(r['ops_vs_warm_floor'])} | {r['copy_gbs']:.1f} | {r['clone_gbs']:.1f} |")
    lines += [
        "",
        "The two ops alone against their own floors (same run; µs, fastest round; per-round ratio median and "
        "spread): the forward reads x and writes a fresh y, as `clone` does; the backward reads grad and x and "
        "writes a fresh grad_x, as `torch.add(grad, x)` does, plus three sums.",
        "",
        "| elements | quantization | forward op | clone | **forward / clone** | backward op | add "
        "| **backward / add** |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["times"]
        lines.append(f"| {size_label(r['n'])} | {r['kind']} | {t['forward_op'] * 1e6:.1f} | {t['clone'] * 1e6:.1f} "
                     f"| **{ratio_spread(r['forward_vs_clone'])}** | {t['backward_op'] * 1e6:.1f} "
                     f"| {t['add'] * 1e6:.1f} | **{ratio_spread(r['backward_vs_add'])}** |")
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
    parser.add_argument("--sizes", default="64K,1M,16M", help="comma-separated element counts (K = 2**10, M = 2**20)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per measurement")
    parser.add_argument("--min-seconds", type=float, default=0.2, help="minimum time per sample")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: the process's CPU time (CPU only, with --threads 1: "
                             "excludes waiting for a core on a shared machine)")
    parser.add_argument("--isas", default=None,
                        help="comma-separated CPU instruction sets (e.g. avx512,avx2): compare the compiled "
                             "kernels on each instead; ratios are against the first")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        parser.error("--clock cpu measures one CPU thread: use it with --device cpu --threads 1")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    command = "python benchmarks/kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.isas:
        if device.type != "cpu" or ops.backend() == "reference":
            parser.error("--isas compares the compiled CPU kernels: use it with --device cpu and the op library built")
        isas = args.isas.split(",")
        for isa in isas:  # a clear error now rather than in the middle of the run
            torch.ops.fxcompress._set_cpu_isa(isa)
        print(markdown_isas(run_isas(sizes, isas, args.rounds, args.min_seconds, args.clock), isas, command.strip()))
        return 0
    rows = run(device, sizes, args.rounds, args.min_seconds, args.clock)
    print(markdown(rows, device, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
