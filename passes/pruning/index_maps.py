"""Index maps between channel axes: how a reshape moves channel ``c`` (sympy index algebra).

A reshape (``flatten``, ``view``, ``reshape``) of a row-major tensor keeps every
element's *linear* index. Channel ``c`` of an input of shape ``(B, C, H, W)``
is the set of linear indices ``L`` with ``floor(L / s) mod C == c``, where
``s = H * W`` is the channel axis' stride. In the output of shape
``(n_0, ..., n_{d-1})`` with strides ``t_k`` the linear index is
``L = sum_k o_k * t_k``, so the input channel of output position ``o`` is::

    channel(o) = Mod(floor((sum_k o_k * t_k) / s), C)

The channel is a function of one output axis ``j`` alone exactly when

- the axes after ``j`` stay inside one channel block: ``t_j`` divides ``s``, and
- the axes before ``j`` only move whole blocks of ``C`` channels:
  ``s * C`` divides ``t_j * n_j``;

then ``channel(o) = Mod(floor(o_j * t_j / s), C)``. For ``flatten(1)`` of
``(B, C, H, W)`` that is ``floor(f / (H*W))``: channel ``c`` owns the block of
features ``[c*H*W, (c+1)*H*W)``, which is what a following ``Linear`` loses
when ``c`` is pruned. ``reshape_channel_map`` derives this with sympy and
evaluates the reduced expression into an explicit index map.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["ReshapeMap", "reshape_channel_map", "row_major_strides"]


def row_major_strides(shape: Sequence[int]) -> list[int]:
    strides, acc = [], 1
    for n in reversed(list(shape)):
        strides.append(acc)
        acc *= int(n)
    return list(reversed(strides))


@dataclass(frozen=True)
class ReshapeMap:
    """Channel ``axis`` of the input lands on ``out_axis``; ``index[o]`` is the input channel of output ``o``."""
    out_axis: int
    index: np.ndarray
    expression: str  # the reduced sympy expression, e.g. "floor(o1/16)"

    @property
    def block(self) -> int:
        """Output positions per input channel (1 for a pure relabelling)."""
        return int(len(self.index) // max(1, len(np.unique(self.index))))


def reshape_channel_map(in_shape: Sequence[int], axis: int, out_shape: Sequence[int]) -> ReshapeMap | None:
    """Where channel ``axis`` of ``in_shape`` goes in ``out_shape``, or None when it is spread over axes.

    The channel never lands on output axis 0. The leading axes may merge or split (GPT-2's
    ``Conv1D`` views ``(B, T, C)`` as ``(B*T, C)``): the map is exact on linear indices either way.
    """
    import sympy

    in_shape, out_shape = [int(n) for n in in_shape], [int(n) for n in out_shape]
    if not in_shape or not out_shape or axis <= 0 or axis >= len(in_shape):
        return None
    if math.prod(in_shape) != math.prod(out_shape):
        return None
    channels = in_shape[axis]
    s = math.prod(in_shape[axis + 1:])
    out_strides = row_major_strides(out_shape)
    o = sympy.symbols(f"o0:{len(out_shape)}", integer=True, nonnegative=True)
    linear = sum(sym * stride for sym, stride in zip(o, out_strides))
    channel = sympy.Mod(sympy.floor(linear / s), channels)
    for j in range(1, len(out_shape)):
        t, n = out_strides[j], out_shape[j]
        inner_within_block = sympy.Mod(s, t) == 0
        outer_whole_blocks = sympy.Mod(t * n, s * channels) == 0
        if not (inner_within_block and outer_whole_blocks):
            continue
        # Under the two conditions the other axes drop out: the reduced form is the
        # general one with o_k = 0 for k != j (sympy canonicalizes both the same way).
        ratio = sympy.Rational(t, s)
        reduced = sympy.Mod(sympy.floor(o[j] * ratio), channels)
        general = channel.subs({o[k]: 0 for k in range(len(out_shape)) if k != j})
        assert sympy.simplify(general - reduced) == 0
        if s * channels == t * n:
            reduced = sympy.floor(o[j] * ratio)  # o_j < n: the Mod never wraps
        # Evaluate in exact integer arithmetic (a float lambdify gets floor(98 * (1/49)) wrong),
        # and check it against sympy's exact values at the first and last position of blocks.
        index = (np.arange(n, dtype=np.int64) * int(ratio.p) // int(ratio.q)) % channels
        edges = np.flatnonzero(np.diff(index) != 0)
        probes = sorted({0, n - 1, *edges.tolist(), *(edges + 1).tolist()})[:64]
        for v in probes:
            assert int(reduced.subs(o[j], v)) == int(index[v]), (reduced, v)
        return ReshapeMap(j, index, str(reduced))
    return None
