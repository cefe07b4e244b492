"""Looking at graphs: readable diffs and per-pass summaries of what changed.

``diff(before, after)`` is a unified diff of the generated Python code of two
GraphModules (what ``print(gm.code)`` shows), so a pass's effect reads like a
code review. ``changes(before, after)`` lists inserted and removed nodes.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch.fx

__all__ = ["diff", "changes", "GraphChanges", "code_of", "summary"]


def code_of(graph_like) -> str:
    """The readable code of a GraphModule, Graph or already-rendered string."""
    if isinstance(graph_like, str):
        return graph_like
    if isinstance(graph_like, torch.fx.GraphModule):
        return graph_like.code
    if isinstance(graph_like, torch.fx.Graph):
        return graph_like.python_code(root_module="self").src
    raise TypeError(f"expected a GraphModule, Graph or code string, got {type(graph_like).__name__}")


def diff(before, after, before_name: str = "before", after_name: str = "after", context: int = 2) -> str:
    """A unified diff of two graphs' code; empty when they are the same."""
    a = code_of(before).strip("\n").splitlines()
    b = code_of(after).strip("\n").splitlines()
    return "\n".join(difflib.unified_diff(a, b, before_name, after_name, n=context, lineterm=""))


def _node_signatures(graph_like) -> dict[str, str]:
    graph = graph_like.graph if isinstance(graph_like, torch.fx.GraphModule) else graph_like
    return {n.name: _describe(n) for n in graph.nodes}


def _describe(node: torch.fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}"


@dataclass
class GraphChanges:
    inserted: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def __str__(self):
        lines = [f"+ {n}" for n in self.inserted] + [f"- {n}" for n in self.removed]
        return "\n".join(lines) if lines else "(no node changes)"


def changes(before, after) -> GraphChanges:
    """Nodes present only after (inserted) or only before (removed), as ``name: op target``."""
    a, b = _node_signatures(before), _node_signatures(after)
    inserted = [f"{name}: {sig}" for name, sig in b.items() if a.get(name) != sig]
    removed = [f"{name}: {sig}" for name, sig in a.items() if b.get(name) != sig]
    return GraphChanges(inserted, removed)


def summary(records) -> str:
    """One line per pass run: name, modified, nodes inserted/removed, time."""
    rows = [("pass", "modified", "inserted", "removed", "seconds")]
    for r in records:
        rows.append((r.name, "yes" if r.modified else "no", str(len(r.changes.inserted)),
                     str(len(r.changes.removed)), f"{r.seconds:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
