"""Attention in the form OpenVINO's CPU plugin runs in integers: two matmuls with quantized inputs.

OpenVINO runs Q·Kᵀ and softmax·V in integer precision only when each MatMul reads
per-tensor QuantizeLinear/DequantizeLinear outputs: q and k signed (i8; uint8 q/k leave it in
f32), v either, and the softmax output quantized too (u8; without it softmax·V runs in f32).
Measured facts and the minimal ONNX graphs: docs/transformers.md, "Int8 attention".

``torch.nn.functional.scaled_dot_product_attention`` (transformers' default ``sdpa``
attention) hides the softmax, so no quantizer can sit on it; the ONNX exporter also decomposes
it with a scaling ``Mul`` and reshapes of its own. ``decompose_attention`` rewrites each call
into the ops eager attention uses::

    scores = matmul(q, k.transpose(-2, -1)) * scale  [+ mask | masked_fill(~mask, min)]
    out = matmul(softmax(scores, -1), v)

so the placement's matmul rule quantizes both inputs of both matmuls, the quantizers are
trained and calibrated in the graph itself, and the export is exactly that graph. A boolean
mask fills with the dtype's lowest value, not -inf: a query that sees no key (a fully padded
row) then averages all values where SDPA returns zeros; its output is padding either way.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx
import torch.nn.functional as F

from fxcompress.dropout import DropoutRate
from fxcompress.graph import copy_meta
from fxcompress.optable import Kind, op_kind

__all__ = ["decompose_attention"]

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _sdpa_args(node: torch.fx.Node) -> dict:
    args = dict(zip(_SDPA_ARGS, node.args))
    args.update(node.kwargs)
    return {name: args.get(name, default) for name, default in
            zip(_SDPA_ARGS, (None, None, None, None, 0.0, False, None, False))}


def _why_not(args: dict) -> str | None:
    """Why a call cannot be decomposed here (None: it can)."""
    if not all(isinstance(args[k], torch.fx.Node) for k in ("query", "key", "value")):
        return "q/k/v are not tensors of the graph"
    if _dropout_rate(args["dropout_p"]) is None:
        return f"dropout_p={args['dropout_p']!r} (attention dropout computed in the graph)"
    if args["enable_gqa"] is not False:
        return "enable_gqa (grouped-query attention)"
    if not isinstance(args["is_causal"], bool) or not (args["scale"] is None or isinstance(args["scale"], float)):
        return "is_causal/scale computed in the graph"
    if args["attn_mask"] is not None and not isinstance(args["attn_mask"], torch.fx.Node):
        return "a constant attn_mask"
    if not isinstance(args["query"].meta.get("shape"), tuple) or not isinstance(args["key"].meta.get("shape"), tuple):
        return "q/k shapes are unknown"
    return None


def _dropout_rate(dropout_p) -> float | None:
    """The call's attention dropout: a number, or the ``p`` of the ``DropoutRate`` module that gives it
    in train mode only (a model traced in train mode: fxcompress/dropout.py); None if computed otherwise."""
    if isinstance(dropout_p, (int, float)):
        return float(dropout_p)
    if isinstance(dropout_p, torch.fx.Node) and dropout_p.op == "call_module":
        module = dropout_p.graph.owning_module.get_submodule(dropout_p.target)
        if isinstance(module, DropoutRate):
            return module.p
    return None


def decompose_attention(gm: torch.fx.GraphModule, inserted_by: str, enabled: bool = True
                        ) -> tuple[list[str], list[dict]]:
    """Rewrite every ``scaled_dot_product_attention`` call of ``gm`` into matmul/softmax/matmul.

    Returns the names of the calls rewritten and ``{"scope", "reason"}`` for those left fused (all of
    them when not ``enabled``: ``quantize_attention=False``). The new nodes carry the call's metadata
    (module path, shapes, dtypes), so planning can run right after.
    """
    done, skipped = [], []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or op_kind(node, gm) is not Kind.attention:
            continue
        args = _sdpa_args(node)
        reason = _why_not(args) if enabled else "quantize_attention is false"
        if reason is not None:
            skipped.append({"scope": node.meta.get("module_path") or node.name,
                            "reason": f"scaled_dot_product_attention left fused ({reason}): its matmuls run in float"})
            continue
        _decompose(gm, node, args, inserted_by)
        done.append(node.name)
    if done:
        gm.graph.lint()
        gm.recompile()
    return done, skipped


def _decompose(gm: torch.fx.GraphModule, node: torch.fx.Node, args: dict, inserted_by: str):
    graph = gm.graph
    q, k, v, mask = args["query"], args["key"], args["value"], args["attn_mask"]
    q_shape, k_shape = q.meta["shape"], k.meta["shape"]
    dtype = node.meta.get("dtype", q.meta.get("dtype"))
    batch = tuple(torch.broadcast_shapes(q_shape[:-2], k_shape[:-2]))
    scores_shape = batch + (q_shape[-2], k_shape[-2])
    scale = args["scale"] if args["scale"] is not None else 1 / math.sqrt(q_shape[-1])

    def add(target, op_args, shape, kind="call_function", kwargs=None):
        new = graph.create_node(kind, target, op_args, kwargs or {})
        copy_meta(node, new)  # not ``inserted_by``: the placement skips ops that passes inserted
        new.meta["decomposed_by"] = inserted_by
        new.meta["module_path"] = node.meta.get("module_path", "")
        new.meta["shape"], new.meta["dtype"] = shape, dtype if shape is not None else None
        new.meta.pop("tensor_meta", None)
        return new

    with graph.inserting_before(node):
        key_t = add("transpose", (k, -2, -1), k_shape[:-2] + (k_shape[-1], k_shape[-2]), "call_method")
        scores = add(torch.matmul, (q, key_t), scores_shape)
        scores = add(operator.mul, (scores, scale), scores_shape)
        if args["is_causal"]:
            rows = add("size", (q, -2), None, "call_method")
            cols = add("size", (k, -2), None, "call_method")
            ones = add("new_ones", (scores, (rows, cols)), scores_shape[-2:], "call_method", {"dtype": torch.bool})
            ones.meta["dtype"] = torch.bool
            causal = add("tril", (ones,), scores_shape[-2:], "call_method")
            causal.meta["dtype"] = torch.bool
            scores = _apply_mask(add, scores, causal, torch.bool, scores_shape, dtype)
        if mask is not None:
            scores = _apply_mask(add, scores, mask, mask.meta.get("dtype"), scores_shape, dtype)
        probs = add(F.softmax, (scores, -1), scores_shape)
        if isinstance(args["dropout_p"], torch.fx.Node):
            # dropout on the probabilities, as SDPA applies it, in train mode only (as the rate was)
            name = f"{args['dropout_p'].target}_probs"
            gm.add_submodule(name, torch.nn.Dropout(_dropout_rate(args["dropout_p"])))
            probs = add(name, (probs,), scores_shape, "call_module")
        elif args["dropout_p"]:
            probs = add(torch.dropout, (probs, float(args["dropout_p"]), True), scores_shape)
        out = add(torch.matmul, (probs, v), node.meta.get("shape"))
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    rate = args["dropout_p"]
    if isinstance(rate, torch.fx.Node) and not rate.users:
        graph.erase_node(rate)
        gm.delete_submodule(rate.target)


def _apply_mask(add, scores, mask, mask_dtype, shape, dtype):
    """SDPA's mask: a boolean one says which keys a query sees, a float one is added to the scores."""
    if mask_dtype == torch.bool:
        hidden = add(operator.invert, (mask,), mask.meta.get("shape"))
        hidden.meta["dtype"] = torch.bool
        return add("masked_fill", (scores, hidden, torch.finfo(dtype or torch.float32).min), shape, "call_method")
    return add(operator.add, (scores, mask), shape)
