"""The per-device table of quantization placement: which inputs of which op kinds the target device
(OpenVINO's plugin) needs quantized to run the op in integers, which kinds keep a quantized input on
its grid, which give non-negative outputs, and whether 8-bit weights need the overflow fix
(docs/export.md, "What OpenVINO runs in int8"). ``policy.plan_quantization`` reads it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from fxcompress.optable import Kind, OpKind, kinds_tagged

__all__ = ["InputRule", "DeviceRules", "DEVICE_RULES"]


@dataclass(frozen=True)
class InputRule:
    """Inputs of an op kind that must arrive quantized for the device to run it in integers.

    ``inputs``: positional indices (a keyword argument of the same position is
    found by ``names``). ``all_dynamic``: only when every listed input is a
    float tensor computed from the model inputs (a residual add, not a bias
    add; a product of two activations). ``symmetric``: force symmetric
    quantizers. ``skip_if_feeding``: op kinds whose
    consumption of this op's output means the op runs in float anyway (an add
    whose result only feeds LayerNorm: NNCF's transformer pattern).
    """
    inputs: tuple[int, ...]
    reason: str
    names: tuple[str, ...] = ()
    all_dynamic: bool = False
    symmetric: bool = False
    skip_if_feeding: frozenset = frozenset()


@dataclass(frozen=True)
class DeviceRules:
    inputs: Mapping[OpKind, InputRule]
    # Kinds whose output of a quantized tensor stays on the same grid (NNCF: quantization-agnostic).
    agnostic: frozenset
    # Kinds whose output is never negative: unsigned quantizers after them.
    nonnegative: frozenset
    # The device may lack VNNI: 8-bit weights, and the second operand of a matmul of two activations
    # (k of q @ k^T), use 7 bits under overflow_fix.
    overflow_fix: bool


_NORMS = frozenset({Kind.layer_norm, Kind.group_norm})
_CPU_INPUTS = {
    Kind.conv: InputRule((0,), "conv input", ("input",)),
    Kind.conv_transpose: InputRule((0,), "transposed conv input", ("input",)),
    Kind.linear: InputRule((0,), "linear input", ("input",)),
    Kind.addmm: InputRule((1,), "linear input", ("input", "mat1")),  # addmm(bias, x, weight): Conv1D
    Kind.matmul: InputRule((0, 1), "matmul operand", ("input", "other"), all_dynamic=True, symmetric=True),
    Kind.add: InputRule((0, 1), "residual add input", ("input", "other"), all_dynamic=True,
                     skip_if_feeding=_NORMS),
    Kind.avg_pool: InputRule((0,), "pooling input", ("input",)),
}
_AGNOSTIC = kinds_tagged("quantization_agnostic")
_NONNEGATIVE = frozenset({Kind.relu, Kind.sigmoid, Kind.softmax})

DEVICE_RULES: dict[str, DeviceRules] = {
    "CPU": DeviceRules(_CPU_INPUTS, _AGNOSTIC, _NONNEGATIVE, overflow_fix=True),
    "ANY": DeviceRules(_CPU_INPUTS, _AGNOSTIC, _NONNEGATIVE, overflow_fix=True),
    "TRIAL": DeviceRules(_CPU_INPUTS, _AGNOSTIC, _NONNEGATIVE, overflow_fix=True),
    # Sapphire Rapids has VNNI/AMX: no overflow issue.
    "CPU_SPR": DeviceRules(_CPU_INPUTS, _AGNOSTIC, _NONNEGATIVE, overflow_fix=False),
    "GPU": DeviceRules(_CPU_INPUTS, _AGNOSTIC, _NONNEGATIVE, overflow_fix=False),
    "NPU": DeviceRules(_CPU_INPUTS, _AGNOSTIC, _NONNEGATIVE, overflow_fix=False),
}
