"""Hutchinson's estimator of the average Hessian trace per weight tensor, never forming the Hessian.

For a loss ``L`` and a weight tensor ``w`` with ``n`` elements, the *average
trace* is ``tr(H_ww) / n`` with ``H_ww = d²L/dw²`` (the diagonal block of the
Hessian that belongs to ``w``). Hutchinson's identity ``tr(H) = E[vᵀ H v]`` for
Rademacher vectors ``v`` (entries ±1 with probability 1/2) gives an unbiased
estimate from Hessian-vector products, each computed with two backward passes:

1. ``g = dL/dw`` with ``create_graph=True`` (the gradient as a differentiable function);
2. ``Hv = d(g · v)/dw`` (``torch.autograd.grad(g, w, grad_outputs=v)``).

One *iteration* draws one ``v`` per tensor and evaluates ``vᵀ H v`` on the loss
averaged over all the given batches (batches weighted by their sample count, so
the result is the Hessian of the mean loss over those samples, as NNCF's
``HessianTraceEstimator`` does). The estimate is the running mean over
iterations; iterating stops when the relative change of the summed running mean
falls below ``tolerance`` (NNCF's rule:
``|m_i - m_{i-1}| / (|m_{i-1}| + 1e-6) < tolerance``) or after ``iter_number``
iterations.

Several probe vectors can share one forward pass and first backward pass
(``probes_per_pass``): the gradient graph of a batch is kept and differentiated
once per probe. The probes are consumed in order by the same stopping rule, so
the result equals running the iterations one by one with those vectors.

This module knows nothing of models or quantizers: it takes loss closures and
the tensors to differentiate with respect to.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from fxcompress.data import progress_bar

__all__ = ["TraceEstimate", "rademacher_like", "hessian_vector_products", "estimate_average_traces"]

_DIFF_EPS = 1e-6  # NNCF's guard against a zero previous mean

LossFn = Callable[[], torch.Tensor]


@dataclass
class TraceEstimate:
    """Average Hessian traces ``tr(H_ii) / numel_i``, one per input tensor, and how they were reached."""
    traces: list[float]
    iterations: int
    converged: bool
    history: list[list[float]] = field(default_factory=list)  # per-iteration single-probe estimates
    seconds: float = 0.0

    @property
    def total(self) -> float:
        return float(sum(self.traces))


def rademacher_like(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A tensor of ±1 (equal probability) with ``t``'s shape, dtype and device."""
    bits = torch.randint(0, 2, t.shape, generator=generator, dtype=torch.int8, device="cpu")
    return (bits * 2 - 1).to(dtype=t.dtype, device=t.device)


def hessian_vector_products(loss: torch.Tensor, inputs: Sequence[torch.Tensor],
                            vectors: Sequence[Sequence[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """``H v`` for each probe ``v`` (one tensor per input), ``H`` the Hessian of ``loss`` w.r.t. ``inputs``.

    Two backward passes: the gradient with ``create_graph=True``, then one
    gradient-vector product per probe (the first graph is kept between probes).
    Block ``i`` of the result is ``sum_j H_ij v_j``; dotted with ``v_i`` it gives
    ``v_iᵀ H_ii v_i`` plus cross terms ``v_iᵀ H_ij v_j`` (j ≠ i) whose mean is zero
    for independent Rademacher vectors, so the per-tensor estimate stays unbiased
    (NNCF probes all weights at once the same way).
    """
    grads = torch.autograd.grad(loss, list(inputs), create_graph=True, allow_unused=True)
    if any(g is None for g in grads):
        missing = [i for i, g in enumerate(grads) if g is None]
        raise ValueError(f"the loss does not depend on input tensor(s) {missing}; "
                         "their Hessian trace cannot be estimated")
    if not any(g.requires_grad for g in grads):
        # the loss is linear in every input: H = 0
        return [[torch.zeros_like(x) for x in inputs] for _ in vectors]
    out = []
    for i, v in enumerate(vectors):
        hv = torch.autograd.grad(grads, list(inputs), grad_outputs=list(v), retain_graph=i < len(vectors) - 1,
                                 allow_unused=True)
        out.append([torch.zeros_like(x) if h is None else h.detach() for x, h in zip(inputs, hv)])
    return out


def estimate_average_traces(losses: Sequence[tuple[LossFn, int]], inputs: Sequence[torch.Tensor], *,
                            iter_number: int = 200, tolerance: float = 1e-4, probes_per_pass: int = 1,
                            generator: torch.Generator | None = None,
                            progress: str | None = None) -> TraceEstimate:
    """Average Hessian trace of each tensor in ``inputs`` by Hutchinson iterations.

    ``losses``: ``(loss_fn, num_samples)`` per batch; ``loss_fn()`` runs the model
    and returns the batch's mean loss as a differentiable function of ``inputs``
    (tensors with ``requires_grad=True``). The Hessian is that of
    ``sum_b num_samples_b * loss_b / sum_b num_samples_b``.
    """
    if not losses:
        raise ValueError("no data to estimate Hessian traces on: the loader yielded no batches")
    if iter_number < 1:
        raise ValueError(f"iter_number must be >= 1, got {iter_number}")
    inputs = list(inputs)
    for i, x in enumerate(inputs):
        if not x.requires_grad:
            raise ValueError(f"input tensor {i} does not require grad")
    total_samples = float(sum(n for _, n in losses))
    numels = [x.numel() for x in inputs]
    start = time.perf_counter()

    history: list[list[float]] = []
    running_sum = [0.0] * len(inputs)
    previous_total = 0.0
    converged = False
    bar = progress_bar(range(iter_number), progress)
    bar_iter = iter(bar)
    done = 0
    while done < iter_number and not converged:
        k = min(probes_per_pass, iter_number - done)
        probes = [[rademacher_like(x, generator) for x in inputs] for _ in range(k)]
        products = [[torch.zeros_like(x) for x in inputs] for _ in range(k)]
        for loss_fn, count in losses:
            weight = count / total_samples
            for p, hv in enumerate(hessian_vector_products(loss_fn(), inputs, probes)):
                for j, h in enumerate(hv):
                    products[p][j] += weight * h
        for p in range(k):
            estimate = [float((products[p][j] * probes[p][j]).sum()) / numels[j] for j in range(len(inputs))]
            history.append(estimate)
            done += 1
            next(bar_iter, None)
            running_sum = [s + e for s, e in zip(running_sum, estimate)]
            mean_total = sum(running_sum) / done
            change = abs(mean_total - previous_total) / (abs(previous_total) + _DIFF_EPS)
            previous_total = mean_total
            if done > 1 and change < tolerance:
                converged = True
                break
    if hasattr(bar, "close"):
        bar.close()
    traces = [s / done for s in running_sum]
    if not all(math.isfinite(t) for t in traces):
        raise FloatingPointError(f"Hessian trace estimate is not finite: {traces}")
    return TraceEstimate(traces, done, converged, history, time.perf_counter() - start)
