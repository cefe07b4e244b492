"""Pruning recovery: accuracy after one epoch of fine-tuning at ~0.25 of the MACs, fxcompress vs Torch-Pruning.

The model is a residual CNN for the 8x8 sklearn digits (``conv1 -> [conv2 -> conv3] + skip -> pool ->
conv4 -> fc``), trained dense once (seed 0, 6 epochs); every channel group is prunable
(``prune_first_conv``, ``prune_downsample_convs``; only the classifier's outputs stay). Each setting
prunes it to at most 0.25 of its conv/linear MACs (uniform ratio per group, FLOPs target 0.75) and
fine-tunes one epoch (Adam, lr 1e-3, batch 64, 22 steps), the same batches for every setting of a
seed. Reported: test accuracy (450 images) and the kept MACs fraction, mean over the seeds.

fxcompress, every combination of
- ``filter_importance``: L2, L1, geometric_median, group_l2, taylor, bn_scale;
- schedule: one-shot (``baseline``: the target before the first step; taylor after the first
  backward pass) or progressive (``exponential`` with ``update_per_optimizer_step``,
  ``pruning_steps: --span`` (0.25): the level rises every step over the first quarter of the
  epoch, the pruned set only grows);
- recovery right after one-shot pruning (``--recoveries``), in ``ctrl.initialize`` over the epoch's
  training batches before the optimizer is built: none, BatchNorm adaptation
  (``initializer.batchnorm_adaptation``) or least-squares reconstruction of the layers reading
  pruned channels (``initializer.reconstruction``); not for taylor, whose masks wait for the first
  backward pass;
- with or without ``KnowledgeDistillation(type="softmax", temperature=--temperature (16))`` from
  the dense model.

Torch-Pruning (``MetaPruner``, uniform ratio found by bisection for the same MACs bound, the
classifier ignored), with its ``GroupMagnitudeImportance(p=2)``, ``FPGMImportance``, ``GroupTaylorImportance`` and
``BNScaleImportance``, one-shot (pruned before the first step; Taylor from the first batch's
gradients) or progressive (``iterative_steps=5`` spread over the same span; the optimizer is
rebuilt after each step, since Torch-Pruning replaces the parameters). Torch-Pruning has no
distillation of its own: its "with distillation" rows add the same loss by hand
(``passes/distillation/losses.softmax_loss``, a frozen copy of the dense model as teacher), so
the comparison separates what distillation brings from what the library brings.

    PYTHONPATH=<site-packages with torch-pruning> .venv/bin/python benchmarks/bench_pruning_recovery.py \
        [--seeds 0 1 2] [--temperature 16] [--span 0.25] [--criteria ...] [--recoveries ...] [--no-torch-pruning]

Prints a Markdown table (the RESULTS.md section is pasted from it), with the test accuracy right after
pruning (and the recovery), before the first training step, for the one-shot rows.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from checkout import use_this_checkout

use_this_checkout()

from fxcompress import compile_for_compression  # noqa: E402
from fxcompress.passes import FilterPruning, KnowledgeDistillation  # noqa: E402
from fxcompress.passes.distillation.losses import softmax_loss  # noqa: E402
from fxcompress.testing import ResidualDigitsCNN, evaluate_accuracy, load_digits_tensors, seeded  # noqa: E402

MACS_KEPT = 0.25
BATCH = 64
LR = 1e-3
CRITERIA = ("L2", "L1", "geometric_median", "group_l2", "taylor", "bn_scale")
RECOVERIES = ("none", "BN adaptation", "reconstruction")  # one-shot only: what initialize does right after pruning


def conv_linear_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the convs and linears of an nn.Module for one sample (forward hooks)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += output[0].numel() * per_output
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(x[:1])
    finally:
        for h in handles:
            h.remove()
    return total


def batches(x, y, seed):
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    return list(loader)


def pretrained(x, y):
    with seeded(0):
        model = ResidualDigitsCNN()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=1e-4)
        model.train()
        for epoch in range(6):
            for xb, yb in batches(x, y, 100 + epoch):
                optimizer.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                optimizer.step()
    return model.eval()


# -- fxcompress -----------------------------------------------------------------------------------

def recovery_initializer(recovery: str, samples: int) -> dict | None:
    """The ``initializer`` block of a recovery: BatchNorm statistics or consumer weights re-estimated on
    ``samples`` training samples right after pruning (``ctrl.initialize``)."""
    return {"none": None,
            "BN adaptation": {"batchnorm_adaptation": {"num_bn_adaptation_samples": samples}},
            "reconstruction": {"reconstruction": {"num_samples": samples}}}[recovery]


def run_fxcompress(model, train, test, criterion: str, progressive: bool, kd: bool, temperature: float, seed: int,
                   span: float = 0.25, initializer: dict | None = None, **extra):
    """(accuracy after the epoch, kept MACs fraction, accuracy right after pruning and initialize or None)."""
    steps = len(train)
    schedule = (dict(schedule="exponential", update_per_optimizer_step=True, pruning_steps=span,
                     steps_per_epoch=steps) if progressive else dict(schedule="baseline"))
    passes = [FilterPruning(pruning_flops_target=1 - MACS_KEPT, filter_importance=criterion, prune_first_conv=True,
                            prune_downsample_convs=True, **schedule, **extra,
                            **({"initializer": initializer} if initializer else {}))]
    if kd:
        passes.insert(0, KnowledgeDistillation(type="softmax", temperature=temperature))
    with seeded(seed):
        ctrl, gm = compile_for_compression(model, passes, (train[0][0][:2],), copy=True)
        if initializer:  # the training batches (reconstruction, BatchNorm adaptation); before the optimizer
            ctrl.initialize(train)
        one_shot_now = not progressive and criterion != "taylor"  # taylor's masks wait for the first backward
        before = evaluate_accuracy(gm, test) if one_shot_now else None
        optimizer = torch.optim.Adam(gm.parameters(), lr=LR)
        gm.train()
        for xb, yb in train:
            optimizer.zero_grad()
            (F.cross_entropy(gm(xb), yb) + ctrl.loss()).backward()
            optimizer.step()
            ctrl.scheduler.step()
        ctrl.scheduler.epoch_step()
    stats = ctrl.statistics().to_dict()["filter_pruning"]
    macs = stats["flops_after"] / stats["flops_before"]
    return evaluate_accuracy(ctrl.strip(), test), macs, before


# -- Torch-Pruning ----------------------------------------------------------------------------------

def tp_importance(tp, name: str):
    return {"L2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
            "geometric_median": lambda: tp.importance.FPGMImportance(),
            "taylor": lambda: tp.importance.GroupTaylorImportance(),
            "bn_scale": lambda: tp.importance.BNScaleImportance()}[name]()


def tp_pruner(tp, model, example, name: str, ratio: float, iterative_steps: int):
    return tp.pruner.MetaPruner(model, example, importance=tp_importance(tp, name), pruning_ratio=ratio,
                                iterative_steps=iterative_steps, ignored_layers=[model.fc], global_pruning=False)


def tp_ratio_for_macs(tp, model, example) -> float:
    """The smallest uniform ratio whose pruned model keeps at most MACS_KEPT of the MACs (bisection)."""
    dense = conv_linear_macs(model, example)
    lo, hi = 0.0, 0.95
    for _ in range(12):
        mid = (lo + hi) / 2
        trial = copy.deepcopy(model)
        tp_pruner(tp, trial, example, "L2", mid, 1).step()
        if conv_linear_macs(trial, example) / dense <= MACS_KEPT:
            hi = mid
        else:
            lo = mid
    return hi


def run_torch_pruning(tp, model, train, test, name: str, progressive: bool, ratio: float, seed: int,
                      span: float = 0.25, kd: bool = False, temperature: float = 16.0):
    example = train[0][0][:2]
    steps = len(train)
    iterative = 5 if progressive else 1
    prune_at = {round(k * steps * span / iterative) for k in range(iterative)}  # batches before which it prunes
    teacher = copy.deepcopy(model).eval()

    def loss_of(xb, yb):
        logits = net(xb)
        loss = F.cross_entropy(logits, yb)
        if kd:  # the loss fxcompress's KnowledgeDistillation adds, written out for Torch-Pruning
            with torch.no_grad():
                soft = teacher(xb)
            loss = loss + softmax_loss(logits, soft, temperature)
        return loss

    before = None
    with seeded(seed):
        net = copy.deepcopy(model)
        dense = conv_linear_macs(net, example)
        pruner = tp_pruner(tp, net, example, name, ratio, iterative)
        optimizer = torch.optim.Adam(net.parameters(), lr=LR)
        net.train()
        for i, (xb, yb) in enumerate(train):
            if i in prune_at:
                if name == "taylor":  # Torch-Pruning's Taylor reads the gradients left in .grad
                    net.zero_grad()
                    F.cross_entropy(net(xb), yb).backward()
                pruner.step()
                if i == 0 and not progressive:
                    before = evaluate_accuracy(net, test)
                net.zero_grad()
                optimizer = torch.optim.Adam(net.parameters(), lr=LR)  # the pruned layers are new parameters
            optimizer.zero_grad()
            loss_of(xb, yb).backward()
            optimizer.step()
    return evaluate_accuracy(net, test), conv_linear_macs(net, example) / dense, before


# -- the table --------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--temperature", type=float, default=16.0)
    parser.add_argument("--criteria", nargs="*", default=list(CRITERIA))
    parser.add_argument("--span", type=float, default=0.25, help="fraction of the epoch progressive pruning takes")
    parser.add_argument("--tp-criteria", nargs="+", default=["L2", "geometric_median", "taylor", "bn_scale"])
    parser.add_argument("--recoveries", nargs="+", default=list(RECOVERIES), choices=RECOVERIES,
                        help="what initialize does right after one-shot pruning")
    parser.add_argument("--calibration-samples", type=int, default=None,
                        help="samples for reconstruction / BN adaptation (default: the whole training set)")
    parser.add_argument("--no-torch-pruning", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y, xs, ys = load_digits_tensors(0)
    test = DataLoader(TensorDataset(xs, ys), batch_size=256)
    model = pretrained(x, y)
    print(f"dense accuracy {evaluate_accuracy(model, test):.2%}, {conv_linear_macs(model, xs)} MACs per sample")
    rows = []  # (library, criterion, schedule, recovery, kd, [acc], [macs], [acc before], seconds)
    samples = args.calibration_samples or len(x)  # default: every training sample (22 batches), forward only

    def record(library, criterion, schedule, recovery, kd, fn):
        accs, macs, befores, start = [], [], [], time.perf_counter()
        for seed in args.seeds:
            acc, m, before = fn(seed)
            accs.append(acc)
            macs.append(m)
            befores.append(before)
        rows.append((library, criterion, schedule, recovery, kd, accs, macs, befores,
                     (time.perf_counter() - start) / len(args.seeds)))
        print(f"  {library} {criterion} {schedule} {recovery} kd={kd}: {[f'{a:.2%}' for a in accs]} "
              f"MACs {statistics.mean(macs):.3f}", flush=True)

    if not args.no_torch_pruning:
        import torch_pruning as tp
        ratio = tp_ratio_for_macs(tp, model, xs[:2])
        print(f"Torch-Pruning {importlib.metadata.version('torch-pruning')}: uniform pruning_ratio {ratio:.4f}")
        for name in args.tp_criteria:
            for progressive in (False, True):
                for kd in (False, True):
                    record("Torch-Pruning", name, "progressive" if progressive else "one-shot", "none",
                           "yes (same loss, by hand)" if kd else "no",
                           lambda seed: run_torch_pruning(tp, model, batches(x, y, seed), test, name, progressive,
                                                          ratio, seed, args.span, kd, args.temperature))
    settings = [(False, r) for r in args.recoveries] + [(True, "none")]
    for criterion in args.criteria:
        for progressive, recovery in settings:
            if recovery != "none" and criterion == "taylor":
                continue  # taylor's masks come after the first backward pass: nothing to recover at initialize
            for kd in (False, True):
                record("fxcompress", criterion, "progressive" if progressive else "one-shot", recovery,
                       "yes" if kd else "no",
                       lambda seed: run_fxcompress(model, batches(x, y, seed), test, criterion, progressive, kd,
                                                   args.temperature, seed, args.span,
                                                   recovery_initializer(recovery, samples)))

    print(f"\nseeds {args.seeds}; KD temperature {args.temperature:g}; progressive over {args.span:g} epoch\n")
    print("| library | importance | schedule | recovery | distillation | accuracy (mean) | per seed | "
          "before fine-tuning (mean) | MACs kept | s per run |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for library, criterion, schedule, recovery, kd, accs, macs, befores, seconds in sorted(
            rows, key=lambda r: (r[0] != "Torch-Pruning", -statistics.mean(r[5]))):
        before = f"{statistics.mean(befores):.2%}" if None not in befores else "-"
        print(f"| {library} | {criterion} | {schedule} | {recovery} | {kd} | {statistics.mean(accs):.2%} | "
              f"{' / '.join(f'{a:.1%}' for a in accs)} | {before} | {statistics.mean(macs):.3f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
