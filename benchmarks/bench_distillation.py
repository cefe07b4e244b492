"""Knowledge distillation's overhead: training-step time and memory, with and without KD, per compression.

Time: a step (forward + ``ctrl.loss()`` + backward + Adam + ``scheduler.step()``) with
``KnowledgeDistillation(type="softmax")`` over the same step without it, timed interleaved
(round robin, medians) in one run.

Memory, per configuration:
- persistent: the teacher snapshot's parameter and buffer bytes over the model's;
- saved for backward: the bytes autograd keeps from one training forward (counted with
  ``torch.autograd.graph.saved_tensors_hooks``), with KD over without (the teacher runs under
  ``no_grad``, so 1.00x is expected);
- on CUDA (``--device cuda``), the peak allocated bytes of a step, with KD over without.

    .venv/bin/python benchmarks/bench_distillation.py [--model resnet_tiny|digits] [--rounds 7] [--device cuda]

Prints a Markdown table (the RESULTS.md section is pasted from it).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from fxcompress.passes import FilterPruning, KnowledgeDistillation, MagnitudeSparsity, Quantize
from timing import (compiled_training_model, interleaved_medians, training_model, training_step,
                    training_step_arguments)

COMPRESSIONS = {
    "none (fp32)": lambda: [],
    "int8": lambda: [Quantize(bits=8)],
    "magnitude sparsity 50%": lambda: [MagnitudeSparsity(sparsity_init=0.5, sparsity_target=0.5)],
    "filter pruning 50%": lambda: [FilterPruning(pruning_target=0.5, schedule="baseline")],
}


def with_kd(make):
    return lambda: [KnowledgeDistillation(type="softmax", temperature=2.0)] + make()




def saved_for_backward_bytes(passes, model_name: str, device: str) -> int:
    """Bytes autograd saves during one training forward (+ ctrl.loss()) of the compiled model."""
    ctrl, gm, x, y = compiled_training_model(passes, model_name, device)
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(id(t), t.numel() * t.element_size())  # a tensor saved twice counts once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(gm(x), y) + ctrl.loss()
    loss.backward()
    return sum(seen.values())


def cuda_peak_bytes(passes, model_name: str) -> int:
    step = training_step(passes, model_name, "cuda")
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    return torch.cuda.max_memory_allocated()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    training_step_arguments(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    steps = {}
    for name, make in COMPRESSIONS.items():
        steps[name] = training_step(make(), args.model, args.device)
        steps[name + " + KD"] = training_step(with_kd(make)(), args.model, args.device)
    times = interleaved_medians(steps, args.rounds, args.steps, warmup=3)

    model, _, _ = training_model(args.model)
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    print(f"model: {args.model} ({model_bytes / 1e6:.2f} MB of parameters and buffers), {args.rounds} rounds x "
          f"{args.steps} steps, {args.threads} thread(s), {args.device}, interleaved medians")
    cuda = args.device.startswith("cuda")
    print("| compression | ms / step without KD | with KD | time ratio | teacher memory vs model | "
          "saved for backward, KD vs without |" + (" CUDA peak, KD vs without |" if cuda else ""))
    print("|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    for name, make in COMPRESSIONS.items():
        plain, kd = times[name], times[name + " + KD"]
        ctrl, _, _, _ = compiled_training_model(with_kd(make)(), args.model, args.device)
        teacher = ctrl.parts[0].teacher_memory_bytes()
        saved = (saved_for_backward_bytes(with_kd(make)(), args.model, args.device)
                 / saved_for_backward_bytes(make(), args.model, args.device))
        row = (f"| {name} | {plain * 1e3:.1f} | {kd * 1e3:.1f} | {kd / plain:.2f}x | {teacher / model_bytes:.2f}x | "
               f"{saved:.2f}x |")
        if cuda:
            row += f" {cuda_peak_bytes(with_kd(make)(), args.model) / cuda_peak_bytes(make(), args.model):.2f}x |"
        print(row)


if __name__ == "__main__":
    main()
