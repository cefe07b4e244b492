"""Passes and the pass manager.

A pass is a small object with a ``name`` and ``__call__(gm, ctx) -> PassResult``
(as ``torch.fx.passes.infra.pass_base``). It may mutate ``gm`` in place; it
must not write into the parameter and buffer tensors the graph had when the
manager got it in place: they are shared with the user's model, so a rewrite
that changes weights creates new tensors (a pass that does is rolled back with
a ``PassError`` naming them). Tensors an earlier pass created (a quantizer's
scale) may be changed in place.

The manager runs passes in order and, after each one: lints the graph,
recompiles, refreshes shape metadata, records a diff, and in debug mode checks
outputs on the example inputs. A pass that raises leaves the GraphModule and
the tensors it shares with the user's model as they were before that pass:
graph, modules, attributes and hooks (``GraphSnapshot``) and parameter and
buffer values (``TensorSnapshot``, one copy of the model's tensors while the
pass runs). See docs/design.md, "Passes".
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx

from . import inspect as fx_inspect
from .errors import FxCompressError, PassError
from .graph import GraphSnapshot, TensorSnapshot
from .tracing import propagate_metadata

__all__ = ["Pass", "PassResult", "PassContext", "PassRecord", "PassManager"]


@dataclass
class PassContext:
    """What every pass may read: the example inputs and run-wide settings."""
    example_inputs: tuple = ()
    example_kwargs: dict = field(default_factory=dict)
    debug: bool = False

    @classmethod
    def for_graph(cls, gm: torch.fx.GraphModule, debug: bool = False) -> "PassContext":
        return cls(tuple(gm.meta.get("example_inputs", ())), dict(gm.meta.get("example_kwargs", {})), debug)

    def run(self, module: torch.nn.Module):
        return module(*self.example_inputs, **self.example_kwargs)


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool
    controller: Any = None  # a ControllerPart for compression passes


class Pass:
    """Base class. Subclasses set ``name`` and implement ``call``.

    ``preserves_outputs``: the rewritten graph computes the same values as the
    input graph right after the pass (debug mode then compares values, not only
    shapes). Lowering passes that fold masks/BN say True.
    """
    name: str = "pass"
    preserves_outputs: bool = False

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        return self.call(gm, ctx)

    def __repr__(self):
        return f"{type(self).__name__}()"


@dataclass
class PassRecord:
    name: str
    modified: bool
    diff: str
    changes: fx_inspect.GraphChanges
    seconds: float


def _outputs_agree(a, b, atol: float, rtol: float) -> str | None:
    """None if the two outputs agree, else a description of the first difference."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return f"output shape changed from {tuple(a.shape)} to {getattr(b, 'shape', type(b).__name__)}"
        if not torch.isfinite(b).all():
            return "output has non-finite values"
        if atol is not None and not torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol):
            return f"output changed (max abs diff {(a.float() - b.float()).abs().max().item():.3g})"
        return None
    if isinstance(a, (tuple, list)):
        if not isinstance(b, (tuple, list)) or len(a) != len(b):
            return "output structure changed"
        for x, y in zip(a, b):
            problem = _outputs_agree(x, y, atol, rtol)
            if problem:
                return problem
        return None
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return "output structure changed"
        for k in a:
            problem = _outputs_agree(a[k], b[k], atol, rtol)
            if problem:
                return f"{k}: {problem}"
    return None


class PassManager:
    def __init__(self, passes: Sequence[Pass], debug: bool = False, atol: float = 1e-5, rtol: float = 1e-4):
        self.passes = list(passes)
        self.debug = debug
        self.atol, self.rtol = atol, rtol
        self.records: list[PassRecord] = []
        # The tensors the graph had when this manager first saw it: for compile_for_compression,
        # the user's model's. Passes must not write into them; tensors passes created may be.
        self._original_tensors: list[torch.Tensor] | None = None

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> list[PassResult]:
        """Run all passes on ``gm`` in place; returns their results (records in ``self.records``)."""
        ctx = ctx or PassContext.for_graph(gm, self.debug)
        results = []
        for p in self.passes:
            results.append(self.run_one(p, gm, ctx))
        return results

    def run_one(self, p: Pass, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        name = getattr(p, "name", type(p).__name__)
        snapshot = GraphSnapshot(gm)
        values = TensorSnapshot(gm)
        if self._original_tensors is None:
            self._original_tensors = values.tensors()
        before_code = gm.code
        reference = self._reference_outputs(gm, ctx) if self.debug else None
        start = time.perf_counter()
        try:
            result = p(gm, ctx)
            if not isinstance(result, PassResult):
                raise PassError(f"pass '{name}' returned {type(result).__name__}, expected a PassResult")
            if result.graph_module is not gm:
                raise PassError(f"pass '{name}' must rewrite the GraphModule it is given in place")
            written = values.changed(among=self._original_tensors)
            if written:
                raise PassError(f"pass '{name}' wrote into {len(written)} of the model's parameter or buffer "
                                f"tensors in place ({', '.join(written[:5])}{', ...' if len(written) > 5 else ''}); "
                                f"they are shared with the user's model, so a pass must create new tensors instead")
            gm.graph.lint()
            gm.recompile()
            if ctx.example_inputs or ctx.example_kwargs:
                propagate_metadata(gm)
            if reference is not None:
                self._check_outputs(p, name, gm, ctx, reference)
        except FxCompressError as exc:
            self._roll_back(snapshot, values)
            if hasattr(exc, "add_note") and not isinstance(exc, PassError):  # Python >= 3.11
                exc.add_note(f"(raised by pass '{name}', which was rolled back: the graph, the modules and "
                             f"the parameter and buffer values are as before it)")
            raise
        except Exception as exc:
            self._roll_back(snapshot, values)
            raise PassError(f"pass '{name}' failed and was rolled back, the graph is unchanged: "
                            f"{type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - start
        after_code = gm.code
        if not result.modified and before_code != after_code:
            warnings.warn(f"pass '{name}' reported modified=False but changed the graph", stacklevel=2)
        self.records.append(PassRecord(
            name=name, modified=result.modified,
            diff=fx_inspect.diff(before_code, after_code, f"before {name}", f"after {name}"),
            changes=fx_inspect.changes(snapshot.graph, gm.graph), seconds=seconds))
        return result

    @staticmethod
    def _roll_back(snapshot: GraphSnapshot, values: TensorSnapshot):
        # Structure first: it puts back replaced parameters, whose values are then restored.
        snapshot.restore()
        values.restore()

    def _reference_outputs(self, gm, ctx):
        if not (ctx.example_inputs or ctx.example_kwargs):
            return None
        was_training = gm.training
        gm.eval()
        try:
            with torch.no_grad():
                return ctx.run(gm)
        finally:
            gm.train(was_training)

    def _check_outputs(self, p, name, gm, ctx, reference):
        out = self._reference_outputs(gm, ctx)
        atol = self.atol if getattr(p, "preserves_outputs", False) else None
        problem = _outputs_agree(reference, out, atol, self.rtol)
        if problem:
            raise PassError(f"debug check after pass '{name}': {problem} on the example inputs")
