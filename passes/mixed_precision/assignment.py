"""Bit assignment: the quantization noise of each candidate width, setting widths, manual widths.

- noise: ``||Q_b(w) - w||²`` for each candidate ``b``, from a copy of each weight
  quantizer set to ``b`` bits (HAWQ's sensitivity is the trace times this);
- ``apply_bits``: weight quantizers get their layer's bits; an activation
  quantizer that feeds quantized layers gets the maximum of their bits; activation
  quantizers feeding no quantized layer keep theirs, unless named;
- ``manual_bits``: ``bitwidth_per_scope`` (module scopes, quantizer names or NNCF
  quantizer ids) resolved to bits per quantizer.

``FakeQuantizer.set_bits`` keeps the real-valued range a quantizer covers, so a
4-bit quantizer spans the range its 8-bit range initialization found.
"""
from __future__ import annotations

import copy
import difflib
import re

import torch
import torch.fx

from fxcompress.errors import ConfigError, ScopeError
from fxcompress.quantizers import FakeQuantizer
from fxcompress.scopes import ScopeSet

from .layers import QuantizedLayer, effective_bits_for, nominal_bits, quantizer_of, weight_value
from .quantizer_ids import nncf_quantizer_ids

__all__ = ["activation_quantizers", "quantization_noise", "apply_bits", "manual_bits"]


def activation_quantizers(gm: torch.fx.GraphModule, layers: list[QuantizedLayer]) -> dict[str, FakeQuantizer]:
    """The activation quantizers feeding ``layers``, by name."""
    return {name: gm.get_submodule(name) for layer in layers for name in layer.activation_quantizers}


@torch.no_grad()
def quantization_noise(gm: torch.fx.GraphModule, layers: list[QuantizedLayer],
                       candidate_bits) -> list[dict[int, float]]:
    """``||Q_b(w) - w||²`` per layer and candidate width ``b``."""
    out = []
    for layer in layers:
        w = weight_value(gm, layer.weight_node).float()
        noise = {}
        for b in candidate_bits:
            q = copy.deepcopy(layer.module)
            q.enabled = True
            if not bool(q.initialized):
                _init_from_weight(q, w)
            q.set_bits(effective_bits_for(layer.overflow_fix, b))
            noise[int(b)] = float(((q(w) - w) ** 2).sum())
        out.append(noise)
    return out


def apply_bits(gm: torch.fx.GraphModule, all_layers: list[QuantizedLayer], weight_bits: dict[str, int],
               activation_bits: dict[str, int] | None = None):
    """Set weight quantizers (by name; nominal bits) and derive or set the activation quantizers."""
    by_name = {l.weight_quantizer: l for l in all_layers}
    for name, bits in weight_bits.items():
        layer = by_name[name]
        target = effective_bits_for(layer.overflow_fix, bits)
        if layer.module.spec.bits != target:
            layer.module.set_bits(target)
    activation_bits = dict(activation_bits or {})
    derived: dict[str, int] = {}
    for layer in all_layers:
        for name in layer.activation_quantizers:
            derived[name] = max(derived.get(name, 0), nominal_bits(layer, layer.module))
    modules = activation_quantizers(gm, all_layers)
    # Named ones need not feed a quantized layer (an addition's inputs in manual mode).
    modules.update({name: gm.get_submodule(name) for name in activation_bits})
    for name, module in modules.items():
        bits = activation_bits.get(name, derived.get(name))
        if bits is not None and module.spec.bits != bits:
            module.set_bits(bits)


def manual_bits(gm: torch.fx.GraphModule, layers: list[QuantizedLayer], all_layers: list[QuantizedLayer],
                bitwidth_per_scope: list) -> tuple[dict[str, int], dict[str, int]]:
    """``bitwidth_per_scope``: ``[[bits, scope], ...]`` as ``(weight_bits, activation_bits)`` by quantizer name;
    later entries win (docs/mixed_precision.md). ``layers``: those whose bits are chosen (a scope names
    their weights); ``all_layers``: every quantized layer (tells weight quantizers from activation ones)."""
    weight_bits: dict[str, int] = {}
    activation_bits: dict[str, int] = {}
    weight_quantizers = {l.weight_quantizer for l in all_layers}
    activation_nodes = {n.target: n for n in gm.graph.nodes
                        if n.op == "call_module" and quantizer_of(gm, n) is not None
                        and n.target not in weight_quantizers}
    nncf_ids: dict[str, tuple[str, ...]] | None = None
    for i, (bits, scope) in enumerate(bitwidth_per_scope):
        field = f"bitwidth_per_scope[{i}]"
        pattern, _, role = scope.partition("|")
        role = role.upper()
        if not re.fullmatch(r"WEIGHT|OUTPUT|INPUT\d*|", role):
            raise ConfigError(f"MixedPrecision.{field}: unknown role '|{role}' in {scope!r}; use '|WEIGHT', "
                              f"'|OUTPUT', '|INPUT' or '|INPUT<port>' (or none)", path=field)
        if role and "/" in pattern:  # an NNCF quantizer id (passes/quantization/quantizer_ids.py)
            if nncf_ids is None:
                nncf_ids = nncf_quantizer_ids(gm)
            for name in _match_quantizer_ids(pattern, role, nncf_ids, field, scope):
                (weight_bits if name in weight_quantizers else activation_bits)[name] = int(bits)
            continue
        scopes = ScopeSet([pattern], field).bind(gm)
        matched = False
        if role in ("", "WEIGHT"):
            for layer in layers:
                if scopes.matches(layer.module_path) or pattern == layer.weight_quantizer:
                    weight_bits[layer.weight_quantizer] = int(bits)
                    matched = True
        if role not in ("", "WEIGHT") or (role == "" and not matched):
            for name, node in activation_nodes.items():
                if pattern == name or (role and scopes.matches(node.meta.get("module_path", ""))):
                    activation_bits[name] = int(bits)
                    matched = True
        if not matched:
            known = [l.module_path for l in layers] + list(activation_nodes)
            raise ScopeError(f"MixedPrecision.{field}: scope {scope!r} matches no quantized layer or "
                             f"quantizer; quantized layers and activation quantizers: {known[:8]}",
                             path=field)
    return weight_bits, activation_bits


def _match_quantizer_ids(pattern: str, role: str, ids: dict[str, tuple[str, ...]], field: str,
                         scope: str) -> list[str]:
    """Quantizers an NNCF quantizer id names: ``<operation>|<role>``, the operation plain or ``{re}``.

    A plain operation name matches an id with that name, else (NNCF's manual initializer:
    ``scope_name in str(insertion_point)``) the ids that contain it; a ``{re}`` one is searched
    in the operation names. ``|INPUT`` without a port matches every input port.
    """
    def split(quantizer_id: str) -> tuple[str, str]:
        operation, _, id_role = quantizer_id.rpartition("|")
        return operation, id_role

    def role_matches(id_role: str) -> bool:
        return id_role == role or (role == "INPUT" and id_role.startswith("INPUT"))

    if pattern.startswith("{re}"):
        try:
            regex = re.compile(pattern[4:])
        except re.error as exc:
            raise ConfigError(f"MixedPrecision.{field}: invalid regular expression {pattern!r}: {exc}",
                              path=field) from None
        found = [name for name, qids in ids.items()
                 if any(role_matches(r) and regex.search(op) for op, r in map(split, qids))]
    else:
        found = [name for name, qids in ids.items()
                 if any(role_matches(r) and op == pattern for op, r in map(split, qids))]
        if not found:
            found = [name for name, qids in ids.items() if any(scope in q for q in qids)]
    if found:
        return found
    every = [q for qids in ids.values() for q in qids]
    close = difflib.get_close_matches(scope.replace("{re}", "").replace("\\", ""), every, n=3, cutoff=0.5)
    hint = (f"did you mean {', '.join(repr(c) for c in close)}?" if close
            else f"the model's quantizer ids look like {every[:3]}")
    raise ScopeError(f"MixedPrecision.{field}: NNCF quantizer id {scope!r} names no quantizer of the model; {hint}",
                     path=field)


@torch.no_grad()
def _init_from_weight(q: FakeQuantizer, w: torch.Tensor):
    """Min/max range of the weight (per channel on the quantizer's axis) for an uninitialized copy."""
    axis = q.axis
    if axis is None:
        q.set_range(w.min(), w.max())
    else:
        flat = w.movedim(axis, 0).reshape(w.shape[axis], -1)
        q.set_range(flat.min(dim=1).values, flat.max(dim=1).values)
