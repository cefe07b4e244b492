"""Numerical agreement checks between two models (or any two callables).

Outputs are compared recursively: tensors, numbers, ``None``/strings, tuples and
lists (including namedtuples), and mappings (dicts, Hugging Face ``ModelOutput``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

__all__ = ["assert_modules_agree", "max_abs_diff", "assert_outputs_agree", "state_snapshot",
           "assert_state_unchanged", "module_structure"]


# ---------------------------------------------------------------------------
# internals
# ---------------------------------------------------------------------------


class _StructureMismatch(Exception):
    pass


def _as_float(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu")
    if t.is_complex():
        return t.to(torch.complex128)
    return t.to(torch.float64)


def _elementwise_diff(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|x - y| in float64, 0 where equal (incl. equal infinities and both NaN),
    inf where exactly one is NaN or the infinities differ."""
    xd, yd = _as_float(x), _as_float(y)
    d = (xd - yd).abs()
    if d.is_complex():  # pragma: no cover - abs of complex is real already
        d = d.real
    equal = (xd == yd) | (torch.isnan(xd) & torch.isnan(yd))
    d = torch.where(equal, torch.zeros_like(d), d)
    return torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)


def _index_str(flat_index: int, shape: torch.Size) -> str:
    if len(shape) == 0:
        return "()"
    idx = []
    for size in reversed(shape):
        idx.append(flat_index % size)
        flat_index //= size
    return str(tuple(reversed(idx)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return repr(v)


def _walk(x: Any, y: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """Yield ``(path, leaf_x, leaf_y)`` pairs; raise _StructureMismatch on a
    structural difference."""
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            raise _StructureMismatch(
                f"{path}: {type(x).__name__} vs {type(y).__name__}")
        if x.shape != y.shape:
            raise _StructureMismatch(
                f"{path}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
        yield path, x, y
    elif isinstance(x, Mapping) or isinstance(y, Mapping):
        if not (isinstance(x, Mapping) and isinstance(y, Mapping)):
            raise _StructureMismatch(f"{path}: {type(x).__name__} vs {type(y).__name__}")
        kx, ky = list(x.keys()), list(y.keys())
        if set(kx) != set(ky):
            only_x = [k for k in kx if k not in y]
            only_y = [k for k in ky if k not in x]
            raise _StructureMismatch(
                f"{path}: keys differ (only in a: {only_x}, only in b: {only_y})")
        for k in kx:
            yield from _walk(x[k], y[k], f"{path}[{k!r}]")
    elif isinstance(x, (tuple, list)) or isinstance(y, (tuple, list)):
        if not (isinstance(x, (tuple, list)) and isinstance(y, (tuple, list))):
            raise _StructureMismatch(f"{path}: {type(x).__name__} vs {type(y).__name__}")
        if len(x) != len(y):
            raise _StructureMismatch(f"{path}: length {len(x)} vs {len(y)}")
        for i, (a, b) in enumerate(zip(x, y)):
            yield from _walk(a, b, f"{path}[{i}]")
    else:
        yield path, x, y


def _leaf_report(path: str, x: Any, y: Any, atol: float, rtol: float,
                 check_dtype: bool) -> tuple[float, str | None]:
    """(max abs diff, problem description or None) for one leaf pair."""
    if isinstance(x, torch.Tensor):
        if check_dtype and x.dtype != y.dtype:
            return math.inf, f"{path}: dtype {x.dtype} vs {y.dtype}"
        if x.numel() == 0:
            return 0.0, None
        d = _elementwise_diff(x, y)
        mx = float(d.max())
        scale = torch.maximum(_as_float(x).abs(), _as_float(y).abs())
        if scale.is_complex():  # pragma: no cover
            scale = scale.real
        bad = (d > atol + rtol * scale) | torch.isinf(d)
        n_bad = int(bad.sum())
        if n_bad == 0:
            return mx, None
        flat = int(torch.argmax(d.flatten()))
        xv = x.detach().flatten()[flat].item()
        yv = y.detach().flatten()[flat].item()
        return mx, (
            f"{path}: max abs diff {mx:.6g} at index {_index_str(flat, x.shape)} "
            f"(a={_fmt(xv)}, b={_fmt(yv)}); {n_bad}/{x.numel()} elements outside "
            f"atol={atol:g}, rtol={rtol:g}; shape {tuple(x.shape)}")
    if isinstance(x, (int, float, complex)) and isinstance(y, (int, float, complex)) \
            and not isinstance(x, bool) and not isinstance(y, bool):
        if x == y or (isinstance(x, float) and isinstance(y, float)
                      and math.isnan(x) and math.isnan(y)):
            return 0.0, None
        diff = abs(x - y)
        if math.isnan(diff):
            diff = math.inf
        if diff <= atol + rtol * max(abs(x), abs(y)) and not math.isinf(diff):
            return float(diff), None
        return float(diff), f"{path}: {_fmt(x)} vs {_fmt(y)} (abs diff {diff:.6g})"
    if type(x) is not type(y) or x != y:
        return math.inf, f"{path}: {x!r} vs {y!r}"
    return 0.0, None


def _clone_inputs(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_clone_inputs(o) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_clone_inputs(o) for o in obj)
    if isinstance(obj, Mapping):
        return {k: _clone_inputs(v) for k, v in obj.items()}
    return obj


def _call(model: Callable[..., Any], inputs: Any) -> Any:
    inputs = _clone_inputs(inputs)  # a model mutating its input must not affect the other
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@contextlib.contextmanager
def _eval_mode(*models: Any) -> Iterator[None]:
    saved: list[tuple[nn.Module, bool]] = []
    for m in models:
        if isinstance(m, nn.Module):
            saved += [(sub, sub.training) for sub in m.modules()]
    try:
        for m in models:
            if isinstance(m, nn.Module):
                m.eval()
        yield
    finally:
        for sub, training in saved:
            sub.training = training


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def max_abs_diff(x: Any, y: Any) -> float:
    """Largest absolute elementwise difference between ``x`` and ``y``.

    Works on tensors and on nested tuples/lists/dicts of them (the maximum over all
    leaves); numbers compare by value.  Equal infinities and NaN against NaN count
    as 0; NaN against a number, or a differing non-numeric leaf, count as ``inf``.
    Raises ``ValueError`` when shapes or structures differ.
    """
    try:
        pairs = list(_walk(x, y, "output"))
    except _StructureMismatch as e:
        raise ValueError(f"max_abs_diff: structures differ: {e}") from None
    worst = 0.0
    for path, a, b in pairs:
        d, _ = _leaf_report(path, a, b, atol=0.0, rtol=0.0, check_dtype=False)
        worst = max(worst, d)
    return worst


def assert_outputs_agree(x: Any, y: Any, *, atol: float = 1e-5, rtol: float = 1e-5,
                         msg: str = "", check_dtype: bool = True) -> float:
    """Assert two (nested) outputs agree elementwise:
    ``|x - y| <= atol + rtol * max(|x|, |y|)`` for every element of every tensor,
    same structure, shapes and (with ``check_dtype``) dtypes.  Returns the max abs
    diff.  Raises ``AssertionError`` naming each disagreeing leaf by its path
    (``output[0]['logits']``) with the max abs diff, its index and the two values.
    """
    prefix = f"{msg}: " if msg else ""
    try:
        pairs = list(_walk(x, y, "output"))
    except _StructureMismatch as e:
        raise AssertionError(f"{prefix}outputs differ in structure: {e}") from None
    worst = 0.0
    problems = []
    for path, a, b in pairs:
        d, problem = _leaf_report(path, a, b, atol, rtol, check_dtype)
        worst = max(worst, d)
        if problem is not None:
            problems.append(problem)
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise AssertionError(
            f"{prefix}outputs disagree (max abs diff {worst:.6g}) in "
            f"{len(problems)} of {len(pairs)} leaves:\n  {shown}{more}")
    return worst


def assert_modules_agree(a: Callable[..., Any], b: Callable[..., Any], inputs: Any, *,
                         atol: float = 1e-5, rtol: float = 1e-5, msg: str = "",
                         check_dtype: bool = True) -> float:
    """Run ``a`` and ``b`` on the same inputs and assert their outputs agree.

    ``inputs``: a tensor (one positional input), a tuple/list (positional inputs) or
    a dict (keyword inputs); each model gets its own clone.  Modules run in eval
    mode under ``torch.no_grad``; every submodule's train/eval flag is restored
    afterwards.  ``a`` and ``b`` may be any callables (only modules are switched
    to eval).  See :func:`assert_outputs_agree` for the comparison; returns the
    max abs diff.
    """
    with _eval_mode(a, b), torch.no_grad():
        out_a = _call(a, inputs)
        out_b = _call(b, inputs)
    return assert_outputs_agree(out_a, out_b, atol=atol, rtol=rtol, msg=msg,
                                check_dtype=check_dtype)


# -- "nothing was modified" checks --------------------------------------------------------------

def state_snapshot(module: nn.Module) -> dict:
    """A copy of every parameter and buffer value (for ``assert_state_unchanged``)."""
    return {k: v.clone() for k, v in module.state_dict(keep_vars=True).items()}


def assert_state_unchanged(before: dict, module: nn.Module):
    """The same keys, bitwise the same values and ``requires_grad`` as in ``state_snapshot``."""
    after = module.state_dict(keep_vars=True)
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"
        assert after[key].requires_grad == value.requires_grad, f"{key}.requires_grad changed"


def module_structure(model: nn.Module) -> dict:
    """Everything about each module but tensor values: its type, attributes (by identity), hooks, and
    its parameters, buffers and submodules (by identity); compare two with ``==``."""
    state = {}
    for path, m in model.named_modules():
        # a GraphModule's graph is compared by its code (a rollback restores a copy of the graph)
        attributes = {k: v for k, v in vars(m).items() if not isinstance(v, dict) and k != "_graph"}
        hooks = {k: dict(v) for k, v in vars(m).items() if isinstance(v, dict) and "hook" in k}
        state[path] = (type(m), attributes, hooks, dict(m._parameters), dict(m._buffers), dict(m._modules))
    return state
