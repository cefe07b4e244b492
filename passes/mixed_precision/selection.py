"""HAWQ-v2 bit-width selection: pure functions of traces, FLOPs and quantization noise.

Inputs, per quantized layer (execution order): the average Hessian trace of its
weights, its FLOPs, the squared L2 norm of its weight-quantization noise
``||Q_b(w) - w||²`` at each candidate bit width ``b``, and optionally the
*group* of the layer (the activation quantizer that feeds it: layers fed by one
activation quantizer share that quantizer's bit width).

**Candidates** (NNCF's ``TraceOrderBitwidthMatcher``): sort the layers by
ascending trace (ties by execution order) and take every non-decreasing
sequence of candidate bit widths along that order, so a layer with a smaller
trace never gets more bits than a layer with a larger one. With ``L`` layers and
``m`` widths there are ``C(L + m - 1, m - 1)`` candidates (253 for ResNet-18's
21 layers and ``[2, 4, 8]``).

**Bit complexity** (NNCF's ``CompressionRatioCalculator``): ``sum over layers of
FLOPs_l × max(weight bits_l, activation bits_l)``; the activation bits of a
group are the maximum of its layers' weight bits (so one quantizer serves all
its consumers), a layer without a group counts its weight bits. FLOPs per
sample as NNCF counts them: conv ``2 × weight.numel() × output spatial size``,
linear ``2 × weight.numel() × prod(input.shape[1:-1])``. **Compression ratio** =
bit complexity of the all-8-bit model / bit complexity of the candidate.

**Choice** (NNCF's ``choose_qconfig_sequence``, HAWQ-v2): among candidates with
``compression ratio >= target``, the one with the least total sensitivity
``sum_l trace_l × ||Q_{b_l}(w_l) - w_l||²``; ties go to the higher compression
ratio, then to the earlier candidate. A target outside
``[min ratio, max ratio]`` of the candidates is a ``ConfigError`` naming the
reachable range (NNCF raises there too).

``strict=True`` (NNCF's ``bitwidth_assignment_mode: strict``) keeps only
candidates in which all layers of a group have the same weight bits.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Hashable, Mapping, Sequence

import numpy as np

from fxcompress.errors import ConfigError

__all__ = ["BASE_BITS", "MAX_CANDIDATES", "Selection", "trace_order", "monotone_configurations",
           "effective_bits", "bit_complexity", "compression_ratio", "ratio_bounds", "select_bitwidths"]

BASE_BITS = 8            # the reference: a fully 8-bit model has compression ratio 1
MAX_CANDIDATES = 2_000_000
_RATIO_RTOL = 1e-9       # ratios equal up to float rounding meet the target


@dataclass
class Selection:
    """The chosen configuration and how it was found (all lists in execution order)."""
    bits: list[int]                     # weight bits per layer
    activation_bits: dict               # group -> bits
    compression_ratio: float
    sensitivity: float
    order: list[int]                    # layer indices by ascending trace
    num_candidates: int
    num_feasible: int
    reachable: tuple[float, float]
    candidate_ratios: list[float] = field(default_factory=list, repr=False)
    candidate_sensitivities: list[float] = field(default_factory=list, repr=False)


def trace_order(traces: Sequence[float]) -> list[int]:
    """Layer indices by ascending trace; equal traces keep execution order."""
    return sorted(range(len(traces)), key=lambda i: (traces[i], i))


def monotone_configurations(traces: Sequence[float], bits: Sequence[int]) -> list[tuple[int, ...]]:
    """Every assignment (execution order) whose bits do not decrease along ascending traces."""
    order = trace_order(traces)
    out = []
    for seq in itertools.combinations_with_replacement(sorted(set(bits)), len(order)):
        config = [0] * len(order)
        for position, layer in enumerate(order):
            config[layer] = seq[position]
        out.append(tuple(config))
    return out


def _group_members(groups: Sequence[Hashable | None] | None, n: int) -> dict:
    members: dict = {}
    for i, g in enumerate(groups if groups is not None else [None] * n):
        if g is not None:
            members.setdefault(g, []).append(i)
    return members


def effective_bits(config: Sequence[int], groups: Sequence[Hashable | None] | None = None) -> list[int]:
    """Per layer ``max(weight bits, activation bits)``, activation bits = max over the layer's group."""
    eff = list(config)
    for members in _group_members(groups, len(config)).values():
        top = max(config[i] for i in members)
        for i in members:
            eff[i] = top
    return eff


def bit_complexity(config: Sequence[int], flops: Sequence[float],
                   groups: Sequence[Hashable | None] | None = None) -> float:
    return float(sum(f * b for f, b in zip(flops, effective_bits(config, groups))))


def compression_ratio(config: Sequence[int], flops: Sequence[float],
                      groups: Sequence[Hashable | None] | None = None) -> float:
    """All-8-bit bit complexity over the configuration's (1.0 for all 8 bits, 2.0 for all 4)."""
    return BASE_BITS * float(sum(flops)) / bit_complexity(config, flops, groups)


def ratio_bounds(bits: Sequence[int]) -> tuple[float, float]:
    """The compression ratios any model can reach with these candidate widths: uniform max and min bits."""
    return BASE_BITS / max(bits), BASE_BITS / min(bits)


def _count(n_layers: int, n_bits: int) -> int:
    return math.comb(n_layers + n_bits - 1, n_bits - 1)


def select_bitwidths(traces: Sequence[float], flops: Sequence[float],
                     perturbations: Sequence[Mapping[int, float]], bits: Sequence[int],
                     target_ratio: float, *, groups: Sequence[Hashable | None] | None = None,
                     fixed: Mapping[int, int] | None = None, strict: bool = False,
                     field_name: str = "compression_ratio") -> Selection:
    """HAWQ-v2's choice (module docstring): least total sensitivity among monotone candidates
    whose compression ratio is at least ``target_ratio``.

    ``fixed``: layer index -> bits for layers that keep their width (excluded by
    scopes); they count in the bit complexity but are not part of the order.
    """
    n = len(traces)
    if not (len(flops) == len(perturbations) == n):
        raise ValueError(f"{n} traces, {len(flops)} FLOP counts and {len(perturbations)} perturbation maps")
    if groups is not None and len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} layers")
    fixed = dict(fixed or {})
    widths = sorted(set(int(b) for b in bits))
    if not widths:
        raise ConfigError(f"{field_name}: no candidate bit widths", path="bits")
    free = [i for i in range(n) if i not in fixed]
    for i in free:
        missing = [b for b in widths if b not in perturbations[i]]
        if missing:
            raise ValueError(f"layer {i}: no quantization noise for bits {missing}")
    count = _count(len(free), len(widths))
    if count > MAX_CANDIDATES:
        raise ConfigError(f"bits: {len(widths)} bit widths over {len(free)} layers make {count} monotone "
                          f"candidates (limit {MAX_CANDIDATES}); use fewer candidate bit widths", path="bits")

    order_free = sorted(free, key=lambda i: (traces[i], i))
    seqs = np.array(list(itertools.combinations_with_replacement(widths, len(free))), dtype=np.int64)
    seqs = seqs.reshape(len(seqs), len(free))
    configs = np.zeros((len(seqs), n), dtype=np.int64)
    if free:
        configs[:, order_free] = seqs
    for i, b in fixed.items():
        configs[:, i] = b
    members = _group_members(groups, n)
    effective = configs.copy()
    keep = np.ones(len(configs), dtype=bool)
    for idx in members.values():
        top = configs[:, idx].max(axis=1, keepdims=True)
        effective[:, idx] = top
        if strict:
            keep &= (configs[:, idx] == top).all(axis=1)
    configs, effective = configs[keep], effective[keep]
    if len(configs) == 0:
        raise ConfigError(f"{field_name}: no candidate configuration is left (strict mode with fixed layers "
                          f"of different widths in one group)", path=field_name)
    flops_arr = np.asarray(flops, dtype=np.float64)
    ratios = BASE_BITS * flops_arr.sum() / (effective * flops_arr).sum(axis=1)
    noise = np.zeros((len(configs), n), dtype=np.float64)
    for i in free:
        lookup = np.array([float(perturbations[i][b]) for b in widths])
        noise[:, i] = lookup[np.searchsorted(widths, configs[:, i])] * float(traces[i])
    sens = noise.sum(axis=1)

    low, high = float(ratios.min()), float(ratios.max())
    if not (low * (1 - _RATIO_RTOL) <= target_ratio <= high * (1 + _RATIO_RTOL)):
        raise ConfigError(
            f"{field_name}: {target_ratio:g} cannot be reached with bits {widths}"
            f"{' (strict mode)' if strict else ''}{f' and {len(fixed)} fixed layer(s)' if fixed else ''}: "
            f"the reachable range is [{low:.4g}, {high:.4g}] (1.0 = all 8-bit; "
            f"{BASE_BITS / widths[0]:g} = all {widths[0]}-bit)", path=field_name)
    feasible = np.nonzero(ratios >= target_ratio * (1 - _RATIO_RTOL))[0]
    # least sensitivity, then highest ratio, then enumeration order
    best = feasible[np.lexsort((feasible, -ratios[feasible], sens[feasible]))[0]]
    chosen = [int(b) for b in configs[best]]
    act = {g: max(chosen[i] for i in idx) for g, idx in members.items()}
    return Selection(bits=chosen, activation_bits=act, compression_ratio=float(ratios[best]),
                     sensitivity=float(sens[best]), order=trace_order(traces), num_candidates=len(configs),
                     num_feasible=len(feasible), reachable=(low, high),
                     candidate_ratios=ratios.tolist(), candidate_sensitivities=sens.tolist())
