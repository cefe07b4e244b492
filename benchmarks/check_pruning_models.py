"""Filter pruning on third-party architectures: does ``strip()`` remove parameters, and does the
stripped model compute what the masked one computes?

For each model (random weights, nothing downloaded): ``FilterPruning(pruning_target=0.5,
schedule="baseline", prune_first_conv=True, prune_downsample_convs=True)``, then

- groups found / prunable, and the reasons of the unprunable ones (counted);
- parameters and MACs before and after ``strip()`` (``model_cost``: convs, linears, Conv1D);
- ``fold == masked``: max |stripped(x) - masked(x)| relative to max |masked(x)|, eval mode;
- three SGD steps in train mode on the masked graph (finite loss), then strip and compare again.

    PYTHONPATH=. /work/tpvenv/bin/python benchmarks/check_pruning_models.py [--models regnet_x_400mf ...]
"""
from __future__ import annotations

import argparse
import collections
import time
import warnings

import torch
import torch.nn as nn

from checkout import use_this_checkout  # noqa: E402  (benchmarks/checkout.py)

ROOT = use_this_checkout()

from fxcompress import compile_for_compression  # noqa: E402
from fxcompress.passes import FilterPruning  # noqa: E402
from fxcompress.passes.pruning import model_cost  # noqa: E402


def _torchvision(name):
    def make():
        import torchvision
        model = getattr(torchvision.models, name)(weights=None).eval()
        return model, (torch.randn(2, 3, 224, 224),)
    return make


def _gpt2_small():
    from transformers import GPT2Config, GPT2Model
    model = GPT2Model(GPT2Config()).eval()  # the GPT-2 small configuration: 12 layers, 768 wide

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt2 = model

        def forward(self, ids):
            return self.gpt2(input_ids=ids, use_cache=False).last_hidden_state

    return Decoder(), (torch.randint(0, 50257, (2, 16)),)


MODELS = {"regnet_x_400mf": _torchvision("regnet_x_400mf"), "convnext_tiny": _torchvision("convnext_tiny"),
          "mobilenet_v2": _torchvision("mobilenet_v2"), "mobilenet_v3_small": _torchvision("mobilenet_v3_small"),
          "gpt2_small": _gpt2_small}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def check(name: str) -> dict:
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, gm = compile_for_compression(model, [FilterPruning(pruning_target=0.5, schedule="baseline",
                                                                 prune_first_conv=True, prune_downsample_convs=True)],
                                           inputs, copy=True)
    stats = ctrl.statistics()["filter_pruning"]
    reasons = collections.Counter(row["reason"].split(":")[-1].strip()[:90] for row in stats.skipped)
    gm.eval()
    with torch.no_grad():
        masked = gm(*inputs)
        small = ctrl.strip()
        small.eval()
        folded = small(*inputs)
    before, after = ctrl.statistics()["filter_pruning"].summary, model_cost(small)
    row = {"model": name, "groups": stats.summary["groups"], "prunable": stats.summary["prunable_groups"],
           "params_before": sum(p.numel() for p in model.parameters()),
           "params_after": sum(p.numel() for p in small.parameters()),
           "macs_before": before.get("flops_before", 0) // 2, "macs_after": after.flops // 2,
           "predicted_params_after": before.get("params_after"), "fold_vs_masked": relative_error(folded, masked),
           "compile_s": round(time.time() - t0, 1)}
    # a few training steps on the masked graph, then fold again
    gm.train()
    optimizer = torch.optim.SGD(gm.parameters(), lr=1e-3, momentum=0.9)
    losses = []
    target = torch.randn_like(masked)
    for _ in range(3):
        loss = (gm(*inputs) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    gm.eval()
    with torch.no_grad():
        masked = gm(*inputs)
        small = ctrl.strip()
        small.eval()
        row["train_losses"] = [round(v, 4) for v in losses]
        row["fold_vs_masked_after_training"] = relative_error(small(*inputs), masked)
    row["skipped"] = dict(reasons.most_common(4))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.models:
        try:
            row = check(name)
        except Exception as exc:  # noqa: BLE001 - report and go on with the next model
            row = {"model": name, "error": f"{type(exc).__name__}: {exc}"[:400]}
        print(row, flush=True)


if __name__ == "__main__":
    main()
