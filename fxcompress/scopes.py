"""Scopes: which modules and operations a pass acts on.

A scope is one of:

- a module path as in ``model.named_modules()`` (``layer1.0.conv1``) or a ``*``
  glob of one (``layer1.*.conv1``);
- a regular expression prefixed ``{re}`` matched against the whole module path
  (``{re}layer[12]\\.0\\..*``);
- an NNCF 2.x scope name, module level (``ResNet/Sequential[layer1]/BasicBlock[0]/Conv2d[conv1]``)
  or operation level (``ResNet/NNCFConv2d[conv1]/conv2d_0``, ``Inception3/__add___0``),
  plain or as an NNCF regular expression (``{re}ResNet/NNCFLinear\\[fc\\]/.*``).
  A scope is NNCF-style when it contains ``/`` (a module path never does).

A module scope also covers what is inside it: ``layer1`` covers ``layer1.0.conv1``.

NNCF names come from the traced graph (``ScopeIndex``): a module's NNCF scope is
its class name chain, ``Root/Class[attr]/Class[attr]...``, spelled both with the
original class names and with NNCF's wrapper names (``Conv2d`` and ``NNCFConv2d``);
an operation's NNCF name is its module's scope, ``/``, NNCF's operator name and
its call index in that scope (``__add___0``, ``relu__1``, ``conv2d_0``). NNCF's
matching rules apply to these names: a plain name matches by equality, a ``{re}``
one by ``re.search`` (nncf/common/scopes.py ``matches_any``). docs/nncf_configs.md
has the full translation with examples.

A scope that matches no module or operation is an error naming it and the
nearest names (as NNCF's ``check_scopes_in_graph``): a typo must not silently
compress a layer the user meant to keep in full precision.
"""
from __future__ import annotations

import difflib
import fnmatch
import operator
import re
from dataclasses import dataclass, field
from typing import Iterable, Union

import torch
import torch.fx

from .errors import ScopeError

__all__ = ["ScopeSet", "ScopeIndex", "nncf_scope_to_path", "index_nncf_scopes"]

_NNCF_PART = re.compile(r"\[([^\]]*)\]")
_META_KEY = "nncf_scopes"

# Modules NNCF 2.x replaces by its own subclass (nncf/torch/layers.py NNCF_MODULES_DICT): their
# scope element reads ``NNCFConv2d[conv1]`` in NNCF's operation names.
_NNCF_WRAPPED = frozenset({
    "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "LayerNorm", "Embedding", "EmbeddingBag"})

# The torch function a module's forward calls, which NNCF records as the operator name.
_MODULE_OPERATORS = {
    "Conv1d": "conv1d", "Conv2d": "conv2d", "Conv3d": "conv3d", "ConvTranspose1d": "conv_transpose1d",
    "ConvTranspose2d": "conv_transpose2d", "ConvTranspose3d": "conv_transpose3d", "Linear": "linear",
    "Bilinear": "bilinear", "BatchNorm1d": "batch_norm", "BatchNorm2d": "batch_norm", "BatchNorm3d": "batch_norm",
    "SyncBatchNorm": "batch_norm", "LayerNorm": "layer_norm", "GroupNorm": "group_norm",
    "InstanceNorm1d": "instance_norm", "InstanceNorm2d": "instance_norm", "InstanceNorm3d": "instance_norm",
    "Embedding": "embedding", "EmbeddingBag": "embedding_bag", "ReLU": "relu", "ReLU6": "hardtanh",
    "Hardtanh": "hardtanh", "LeakyReLU": "leaky_relu", "PReLU": "prelu", "ELU": "elu", "SELU": "selu",
    "GELU": "gelu", "SiLU": "silu", "Mish": "mish", "Sigmoid": "sigmoid", "Tanh": "tanh",
    "Hardswish": "hardswish", "Hardsigmoid": "hardsigmoid", "Softmax": "softmax", "LogSoftmax": "log_softmax",
    "MaxPool1d": "max_pool1d", "MaxPool2d": "max_pool2d", "MaxPool3d": "max_pool3d",
    "AvgPool1d": "avg_pool1d", "AvgPool2d": "avg_pool2d", "AvgPool3d": "avg_pool3d",
    "AdaptiveAvgPool1d": "adaptive_avg_pool1d", "AdaptiveAvgPool2d": "adaptive_avg_pool2d",
    "AdaptiveAvgPool3d": "adaptive_avg_pool3d", "AdaptiveMaxPool1d": "adaptive_max_pool1d",
    "AdaptiveMaxPool2d": "adaptive_max_pool2d", "AdaptiveMaxPool3d": "adaptive_max_pool3d",
    "Dropout": "dropout", "Dropout1d": "dropout1d", "Dropout2d": "dropout2d", "Dropout3d": "dropout3d",
    "Upsample": "interpolate", "UpsamplingNearest2d": "interpolate", "UpsamplingBilinear2d": "interpolate",
    "Flatten": "flatten", "PixelShuffle": "pixel_shuffle", "Identity": "identity",
}
# Python operators: fx records ``a + b`` and ``a += b`` alike as operator.add, NNCF as ``__add__`` /
# ``__iadd__`` (``__radd__`` for ``2 + a``); such a node answers to every spelling.
_ARITHMETIC = frozenset({"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
                         "xor", "lshift", "rshift"})


def nncf_scope_to_path(scope: str) -> str:
    """``ResNet/Sequential[layer1]/BasicBlock[0]/Conv2d[conv1]/conv2d_0`` -> ``layer1.0.conv1``."""
    return ".".join(_NNCF_PART.findall(scope))


def _class_name(entry) -> str:
    cls = entry[1] if isinstance(entry, tuple) else entry
    name = cls.__name__ if isinstance(cls, type) else str(cls)
    return name.rsplit(".", 1)[-1]


def _operator_spellings(node: torch.fx.Node, gm: torch.fx.GraphModule) -> tuple[str, list[str]]:
    """(counter family, NNCF operator names) of a node."""
    inplace = node.kwargs.get("inplace") is True
    if node.op == "call_module":
        try:
            module = gm.get_submodule(node.target)
        except AttributeError:
            return str(node.target), [str(node.target)]
        base = next((_MODULE_OPERATORS[c.__name__] for c in type(module).__mro__ if c.__name__ in _MODULE_OPERATORS),
                    re.sub(r"(?<!^)(?=[A-Z])", "_", type(module).__name__).lower())
        inplace = getattr(module, "inplace", False) is True
    elif node.op == "call_method":
        base = str(node.target)
    else:
        target = node.target
        base = getattr(target, "__name__", str(target))
        if getattr(target, "__module__", None) == "_operator" or target in vars(operator).values():
            name = base.strip("_")
            name = name[1:] if name.startswith("i") and name[1:] in _ARITHMETIC else name
            if name in _ARITHMETIC:
                return name, [f"__{name}__", f"__i{name}__", f"__r{name}__"]
            return name, [f"__{name}__"]
    if base.endswith("_") and not base.endswith("__"):
        return base[:-1], [base, base[:-1]]
    return base, ([base + "_", base] if inplace else [base])


@dataclass
class ScopeIndex:
    """The NNCF names of a traced graph's modules and operations (``gm.meta["nncf_scopes"]``).

    ``modules``: module path -> its NNCF scope strings (original and NNCF-wrapper spelling);
    ``module_ops``: path of a called (leaf) module -> the NNCF names of its calls;
    ``node_ops``: fx node name -> the NNCF names of that operation. Plain strings, so the
    index survives passes that replace a node (they keep its module path).
    """
    root: str
    modules: dict[str, tuple[str, ...]] = field(default_factory=dict)
    module_ops: dict[str, tuple[str, ...]] = field(default_factory=dict)
    node_ops: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, gm: torch.fx.GraphModule) -> "ScopeIndex":
        index = gm.meta.get(_META_KEY)
        return index if isinstance(index, ScopeIndex) else index_nncf_scopes(gm)

    def scopes_of(self, path: str) -> tuple[str, ...]:
        return self.modules.get(path, ())

    def names(self) -> list[str]:
        """Every NNCF name, NNCF-wrapper spelling first (for error hints)."""
        out = [s for spellings in self.modules.values() for s in spellings[-1:]]
        out += [s for spellings in self.node_ops.values() for s in spellings]
        return list(dict.fromkeys(out))


def index_nncf_scopes(gm: torch.fx.GraphModule, model: torch.nn.Module | None = None) -> ScopeIndex:
    """Compute the NNCF names of ``gm``'s modules and operations and keep them in ``gm.meta``.

    Run on the freshly traced graph of ``model`` (``fxcompress.tracing.trace`` does): class
    names come from the modules' call stacks, else from ``model`` (containers that are never
    called, like a ``ModuleList``). Nodes that passes inserted (``meta["inserted_by"]``) are
    not model operations and get no name.
    """
    owner = model if model is not None else gm
    index = ScopeIndex(type(owner).__name__)
    classes: dict[str, str] = {}
    for node in gm.graph.nodes:
        for path, entry in (v for v in node.meta.get("nn_module_stack", {}).values()):
            classes.setdefault(path, _class_name(entry))
    index.modules[""] = (index.root,)

    def scopes(path: str) -> tuple[str, ...]:
        if path in index.modules:
            return index.modules[path]
        parent, _, attr = path.rpartition(".")
        if path not in classes:
            try:
                classes[path] = type(owner.get_submodule(path)).__name__
            except AttributeError:
                classes[path] = "Module"
        cls = classes[path]
        wrapped = f"NNCF{cls}" if cls in _NNCF_WRAPPED else cls
        spellings = tuple(dict.fromkeys(f"{p}/{c}[{attr}]" for p, c in zip(scopes(parent)[:1] + scopes(parent)[-1:],
                                                                               (cls, wrapped))))
        index.modules[path] = spellings
        return spellings

    counters: dict[tuple[str, str], int] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or node.meta.get("inserted_by"):
            continue
        path = node.target if node.op == "call_module" else node.meta.get("module_path", "")
        family, spellings = _operator_spellings(node, gm)
        call = counters.get((path, family), 0)
        counters[(path, family)] = call + 1
        names = tuple(dict.fromkeys(f"{scope}/{op}_{call}" for scope in scopes(path) for op in spellings))
        index.node_ops[node.name] = names
        if node.op == "call_module":
            index.module_ops[path] = index.module_ops.get(path, ()) + names
    for path in classes:
        scopes(path)
    gm.meta[_META_KEY] = index
    return index


Where = Union[str, torch.fx.Node]


def _ancestors(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


class _Pattern:
    """One scope, compiled: NNCF-style (contains ``/``) or a module path / glob / regex."""

    def __init__(self, text: str, field_name: str):
        if not isinstance(text, str) or not text:
            raise ScopeError(f"{field_name}: every scope must be a non-empty string, got {text!r}", path=field_name)
        self.text = text
        self.is_regex = text.startswith("{re}")
        body = text[4:] if self.is_regex else text
        self.nncf = "/" in body
        if self.is_regex:
            try:
                self.regex = re.compile(body)
            except re.error as exc:
                raise ScopeError(f"{field_name}: invalid regular expression {text!r}: {exc}", path=field_name) from None
        self.body = body

    def match_path(self, path: str) -> bool:
        if self.nncf:
            return False
        if self.is_regex:
            return self.regex.fullmatch(path) is not None
        return path == self.body or fnmatch.fnmatchcase(path, self.body)

    def match_name(self, name: str) -> bool:
        """NNCF's ``matches_any``: ``re.search`` for ``{re}``, equality otherwise."""
        if not self.nncf:
            return False
        return self.regex.search(name) is not None if self.is_regex else name == self.body


class ScopeSet:
    """A list of scopes (one config field). ``bind(gm)`` gives it the graph's NNCF names."""

    def __init__(self, patterns: Iterable[str] | None, field: str = "ignored_scopes"):
        self.field = field
        self.patterns = list(patterns or [])
        self._compiled = [_Pattern(p, field) for p in self.patterns]
        self._index: ScopeIndex | None = None
        self._graph: torch.fx.Graph | None = None

    def __bool__(self):
        return bool(self.patterns)

    def bind(self, gm: torch.fx.GraphModule) -> "ScopeSet":
        self._index = ScopeIndex.of(gm)
        self._graph = gm.graph
        return self

    def _candidates(self, where: Where) -> tuple[list[str], list[str]]:
        """(module paths, NNCF names) that stand for ``where`` and the modules around it."""
        if isinstance(where, torch.fx.Node):
            path = where.target if where.op == "call_module" else where.meta.get("module_path", "")
            node = where
        else:
            path, node = where, None
        paths = _ancestors(path)
        index = self._index
        if index is None:  # not bound to a graph: NNCF module names by their bracketed attribute names
            return paths, []
        names = [s for p in paths + [""] for s in index.scopes_of(p)]
        if node is not None and node.name in index.node_ops:
            names += index.node_ops[node.name]
        else:
            names += index.module_ops.get(path, ())
        return paths, names

    def _matches_one(self, pattern: _Pattern, paths: list[str], names: list[str]) -> bool:
        if pattern.nncf and self._index is None and not pattern.is_regex:
            translated = nncf_scope_to_path(pattern.body)
            return translated in paths
        return any(pattern.match_path(p) for p in paths) or any(pattern.match_name(n) for n in names)

    def matches(self, where: Where) -> bool:
        """Whether a module (its path) or an operation (its fx node) is in one of the scopes."""
        if not self._compiled:
            return False
        paths, names = self._candidates(where)
        return any(self._matches_one(p, paths, names) for p in self._compiled)

    def validate(self, gm_or_paths):
        """Raise ``ScopeError`` for the first scope that matches no module or operation.

        Given a GraphModule, binds to it first (NNCF names are checked too); given module
        paths, checks those only.
        """
        if isinstance(gm_or_paths, torch.fx.GraphModule):
            self.bind(gm_or_paths)
            gm = gm_or_paths
            paths = [name for name, _ in gm.named_modules() if name]
            locations: list[Where] = paths + [n for n in gm.graph.nodes
                                              if n.op in ("call_module", "call_function", "call_method")]
        else:
            paths = [p for p in gm_or_paths if p]
            locations = list(dict.fromkeys(paths))
        candidates = [self._candidates(w) for w in locations]
        for pattern in self._compiled:
            if any(self._matches_one(pattern, p, n) for p, n in candidates):
                continue
            raise ScopeError(f"{self.field}: scope {pattern.text!r} matches no module or operation of the model"
                             f"{self._hint(pattern, paths)}", path=self.field)

    def _hint(self, pattern: _Pattern, paths: list[str]) -> str:
        pool = self._index.names() if pattern.nncf and self._index is not None else list(dict.fromkeys(paths))
        probe = pattern.body.replace("\\", "")
        close = difflib.get_close_matches(probe, pool, n=3, cutoff=0.5)
        if close:
            return f"; did you mean {', '.join(repr(c) for c in close)}?"
        kind = "NNCF names" if pattern.nncf else "module paths"
        return f"; {kind} look like {pool[:3]}"
