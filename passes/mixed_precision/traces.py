"""HAWQ's sensitivities: the average Hessian trace of each quantized layer's weights.

By Hutchinson iterations (``hessian.py``) on the first ``num_data_points`` samples,
with every quantizer disabled (the float model's Hessian, as NNCF does) and the
model in eval mode (BatchNorm running statistics, no dropout: nothing is updated).
The weight enters as ``w + δ`` (a forward hook on its quantizer adds a zero tensor
``δ``), and the traces are taken with respect to ``δ``, so parameters are never
written and masks before the quantizer are respected. Or read from a file
(``traces_per_layer_path``), as ``dump.py`` writes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx

from fxcompress.data import CalibrationData, batch_target, batch_to_inputs, count_samples, preserved_modes, to_device
from fxcompress.distributed import average_across_ranks
from fxcompress.errors import ConfigError
from fxcompress.quantizers import FakeQuantizer

from .hessian import TraceEstimate, estimate_average_traces
from .layers import QuantizedLayer, weight_value

__all__ = ["PROBES_PER_PASS", "default_target_fn", "default_criterion_fn", "TraceBatch", "trace_batches",
           "estimate_layer_traces", "load_traces", "average_traces_across_ranks"]

# Hutchinson probes that share one forward pass and first backward pass (hessian.py); the result
# equals probing one by one, with at most PROBES_PER_PASS - 1 extra probes after convergence.
PROBES_PER_PASS = 4


default_target_fn = batch_target  # (input, target) tuples or batch["labels"]; None (criterion_fn decides)


def default_criterion_fn(outputs, target, criterion):
    """NNCF's ``criterion_fn(outputs, target, criterion)`` default: ``criterion(outputs, target)``."""
    if target is None:
        raise ValueError("mixed precision: the batches have no target (expected (input, target) tuples or a "
                         "'labels' key); pass MixedPrecision(criterion_fn=lambda outputs, target, criterion: "
                         "loss) or target_fn=")
    return criterion(outputs, target)


@dataclass
class TraceBatch:
    """One batch as the model takes it, its target and how many samples it holds."""
    args: tuple
    kwargs: dict
    target: Any
    samples: int


def trace_batches(data: CalibrationData, target_fn: Callable, num_data_points: int) -> list[TraceBatch]:
    """The first batches of ``data`` holding at least ``num_data_points`` samples, on the data's device."""
    out, seen = [], 0
    for batch in data.loader:
        args, kwargs = batch_to_inputs(batch, data.input_fn, data.accepted_kwargs)
        target = target_fn(batch)
        args, kwargs = to_device(args, data.device), to_device(kwargs, data.device)
        n = count_samples(args, kwargs)
        out.append(TraceBatch(args, kwargs, to_device(target, data.device), n))
        seen += n
        if seen >= num_data_points:
            break
    if not out:
        raise ValueError("initialize: the data loader yielded no batches")
    return out


def estimate_layer_traces(gm: torch.fx.GraphModule, layers: list[QuantizedLayer], batches: list[TraceBatch],
                          loss_fn: Callable[[Any, Any], torch.Tensor], *, seed: int, iter_number: int,
                          tolerance: float, progress: str, probes_per_pass: int = PROBES_PER_PASS) -> TraceEstimate:
    """Average Hessian traces of ``layers``' weights of the loss ``loss_fn(outputs, target)`` over ``batches``."""
    values = [weight_value(gm, layer.weight_node) for layer in layers]
    deltas = [torch.zeros_like(v, dtype=torch.float32).requires_grad_(True) for v in values]
    quantizers = [m for m in gm.modules() if isinstance(m, FakeQuantizer)]
    enabled = [q.enabled for q in quantizers]
    hooks = [layer.module.register_forward_hook(lambda m, args, out, d=d: out + d.to(out.dtype))
             for layer, d in zip(layers, deltas)]

    def loss_of(b: TraceBatch):
        return lambda: loss_fn(gm(*b.args, **b.kwargs), b.target)

    try:
        for q in quantizers:
            q.enabled = False
        with preserved_modes(gm):
            gm.eval()
            generator = torch.Generator().manual_seed(int(seed))
            return estimate_average_traces(
                [(loss_of(b), b.samples) for b in batches], deltas, iter_number=iter_number,
                tolerance=tolerance, probes_per_pass=probes_per_pass, generator=generator, progress=progress)
    finally:
        for h in hooks:
            h.remove()
        for q, flag in zip(quantizers, enabled):
            q.enabled = flag


def load_traces(path, layers: list[QuantizedLayer]) -> list[float]:
    """Traces saved by an earlier run (``{module_path: trace}`` or a tensor in layer order)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ConfigError(f"MixedPrecision.traces_per_layer_path: cannot read {path}: {exc}",
                          path="traces_per_layer_path") from None
    if isinstance(saved, dict):
        missing = [l.module_path for l in layers if l.module_path not in saved]
        if missing:
            raise ConfigError(f"MixedPrecision.traces_per_layer_path: {path} has no trace for {missing[:5]}",
                              path="traces_per_layer_path")
        return [float(saved[l.module_path]) for l in layers]
    values = torch.as_tensor(saved).reshape(-1).tolist()
    if len(values) != len(layers):
        raise ConfigError(f"MixedPrecision.traces_per_layer_path: {path} holds {len(values)} traces, the model "
                          f"has {len(layers)} quantized layers", path="traces_per_layer_path")
    return [float(v) for v in values]


def average_traces_across_ranks(traces: list[float]) -> list[float]:
    """The mean of every rank's traces (every rank then chooses from all ranks' data; the weights agree)."""
    t = torch.tensor(traces, dtype=torch.float64)
    average_across_ranks([t])
    return t.tolist()
