"""The channel rules of the channel analysis (``..dependency``), one module per op family.

- ``layers``: conv (regular, grouped, depthwise), conv_transpose, linear, addmm (Conv1D). The input
  is consumed on its channel axis, the output starts a space, a grouped conv ties each group
  whole. Pins a layer with a problem (shared or computed weight, grouped transposed conv, no
  shapes) and an input reaching it on another axis.
- ``norms``: batch_norm, layer_norm. Channels pass through (BatchNorm's shrink, LayerNorm is
  masked). Pins a LayerNorm over more than the channels, a functional or reused BatchNorm.
- ``elementwise``: activations, max/avg pool, dropout, identity, add/sub/mul/div; inserted
  per-tensor quantizers, stochastic depth, ``x ** p``. Channels pass through or are tied element
  by element. Pins broadcast or untracked channel-wise operands and divisors.
- ``concat``: cat. Inputs tied at their offsets on the channel axis, element by element on
  another. Pins misaligned inputs and the channels of untracked inputs.
- ``shapes``: flatten, reshape/view, transpose/permute, mean; shape queries. Channels move by
  index maps. Pins channels spread over several axes, unreadable target shapes, a mean over
  the channels.

Kinds without a rule (group_norm, softmax, matmul, attention, embedding, unknown modules and
functions) pin every tracked input: the sweep blocks what no rule claims.
"""
from __future__ import annotations

from fxcompress.optable import OPS

from . import concat, elementwise, layers, norms, shapes  # noqa: F401 - importing registers the rules
from .registry import channel_rule, channel_rule_where, rule_for, rule_kinds

__all__ = ["channel_rule", "channel_rule_where", "rule_for", "rule_kinds"]

# Every other kind the op table marks channel_passthrough is an elementwise activation (relu, gelu,
# sigmoid, ...): channels pass through, zeros stay zero where f(0) == 0.
channel_rule(*(k for k in OPS if k.channel_passthrough and k not in rule_kinds()))(elementwise.activation)
