"""Tracing a user's ``nn.Module`` into a ``torch.fx.GraphModule`` with metadata.

``trace`` first tries plain symbolic tracing. When the model's Python control
flow depends on input *shapes* (Hugging Face transformers: ``if seq_len > ...``,
``torch.arange(x.size(1))``), plain fx cannot decide it; we then trace again with
proxies that carry the example inputs' concrete values. Shape queries
(``x.size()``, ``x.shape``) stay graph nodes, so sizes that flow into tensor ops
(``view``, ``expand``, ``arange``, slices) follow the inputs' real sizes at run
time; only a Python *decision* on a size (``if``, ``int()``) takes the example's
answer, and the graph then checks that decision on every call (``shape_guard``
nodes, which raise ``InputShapeError`` naming the input and dimension; a slice
of a parameter or buffer by an input size, such as BERT's position ids, is
guarded the same way). Control flow on tensor *values* is never specialized: it
raises ``TraceError`` naming the module, the operation and the user's source line.

Every node gets ``node.meta``:
- ``"shape"`` / ``"dtype"``: from shape propagation on the example inputs
  (tuples for multi-output nodes, ``None`` for non-tensors);
- ``"integer_derived"``: computed only from integer inputs and constants (attention
  masks and what is built from them; ``fxcompress.integer_inputs``);
- ``"module_path"``: the module the node belongs to, as in ``named_modules()``
  (the called module for ``call_module`` nodes, the enclosing module otherwise).

The GraphModule gets ``gm.meta["example_inputs"]`` (args tuple) and
``gm.meta["example_kwargs"]`` (dict), which passes and export use, and
``gm.meta["huggingface_model_type"]`` (``config.model_type`` of a Hugging Face model, else None).
"""
from __future__ import annotations

import ast
import fnmatch
import inspect
import operator
import os
import traceback
from typing import Any, Iterable, Sequence

import torch
import torch.fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata

from .dropout import make_dropout_mode_aware
from .errors import InputShapeError, TraceError
from .integer_inputs import mark_integer_derived
from .input_fit import NodeFailure, input_shape_error, module_code_error, refused_by_model_code
from .graph import shallow_module_copy
from .scopes import index_nncf_scopes

__all__ = ["trace", "normalize_example_inputs", "propagate_metadata", "shape_guard"]

_FX_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))

# Attribute reads and method calls whose result depends only on ranks/types:
# with shape specialization they return concrete Python values. Sizes
# (``x.shape``, ``x.size()``) are not among them: they stay graph nodes.
_SHAPE_ATTRIBUTES = frozenset({"ndim", "dtype", "device", "is_cuda", "layout", "is_floating_point"})
_SHAPE_METHODS = frozenset({"dim", "numel", "nelement", "ndimension", "is_floating_point",
                            "is_contiguous", "get_device"})


def normalize_example_inputs(example_inputs) -> tuple[tuple, dict]:
    """Accepts a tensor, a tuple/list of positional inputs, or a dict of keyword inputs."""
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword "
        f"inputs, got {type(example_inputs).__name__}")


class _LeafSpec:
    """Which modules stay opaque ``call_module`` nodes: classes, or paths with ``*`` globs."""

    def __init__(self, leaf_modules: Iterable[Any] | None):
        self.classes: tuple[type, ...] = ()
        self.paths: list[str] = []
        for item in leaf_modules or ():
            if isinstance(item, type) and issubclass(item, torch.nn.Module):
                self.classes += (item,)
            elif isinstance(item, str):
                self.paths.append(item)
            else:
                raise TypeError(
                    f"leaf_modules entries must be nn.Module classes or module paths, got {item!r}")

    def matches(self, module: torch.nn.Module, path: str) -> bool:
        return isinstance(module, self.classes) or any(fnmatch.fnmatchcase(path, p) for p in self.paths)

    def check_paths_exist(self, model: torch.nn.Module):
        names = [n for n, _ in model.named_modules() if n]
        for pattern in self.paths:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise TraceError(f"leaf_modules entry {pattern!r} matches no module of the model; "
                                 f"module paths look like {names[:3]}")


class _Tracer(torch.fx.Tracer):
    """fx Tracer with user leaf modules and a record of where tracing failed."""

    def __init__(self, leaves: _LeafSpec):
        super().__init__()
        self.leaves = leaves
        self.failing_module: tuple[str, type] | None = None

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if self.leaves.matches(m, module_qualified_name):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The innermost module on the way up is where the failure happened.
            if self.failing_module is None:
                self.failing_module = (self.path_of_module(m), type(m))
            raise


class _ConcreteProxy(torch.fx.Proxy):
    """A proxy that knows the concrete value its node takes on the example inputs."""

    @property
    def concrete(self):
        return self.node.meta["_concrete"]

    def __getattr__(self, name):
        if name in ("node", "tracer") or name.startswith("__"):
            raise AttributeError(name)
        if name in _SHAPE_ATTRIBUTES and "_concrete" in self.node.meta:
            return getattr(self.concrete, name)
        if name == "shape" and isinstance(self.node.meta.get("_concrete"), torch.Tensor):
            return self.tracer.create_proxy("call_method", "size", (self,), {})  # a node: x.size()
        return super().__getattr__(name)

    def __index__(self):
        # Python needs a plain int here (range(), a list index): the example's value, checked on every call.
        return self.tracer.decide(self, operator.eq, self.concrete)

    __int__ = __index__

    def __len__(self):
        return len(self.concrete)

    def __iter__(self):
        return iter([self[i] for i in range(len(self.concrete))])

    def keys(self):
        return self.concrete.keys()


class _ShapeSpecializingTracer(_Tracer):
    """Runs the example inputs alongside tracing so shape queries are concrete."""

    def __init__(self, leaves: _LeafSpec, inputs: dict[str, Any]):
        super().__init__(leaves)
        self._inputs = inputs
        self._computing = False
        # Buffers (BERT's position and token-type ids) become get_attr nodes, not constants
        # computed at the example's size.
        self.proxy_buffer_attributes = True

    def call_module(self, m, forward, args, kwargs):
        if self._computing:  # computing a concrete value: run the module for real
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def proxy(self, node):
        return _ConcreteProxy(node, self)

    def _value(self, a):
        return map_aggregate(a, lambda x: x.concrete if isinstance(x, _ConcreteProxy) else x)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        if kind == "call_method" and target in _SHAPE_METHODS:
            self_value, *rest = self._value(args)
            return getattr(self_value, target)(*rest, **self._value(kwargs))
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if kind == "placeholder" and isinstance(self._inputs.get(target), (bool, int, float, str, type(None))):
            # A flag such as use_cache=False: the model's code reads its value, which the graph bakes in.
            return self._inputs[target]
        if isinstance(proxy, _ConcreteProxy):
            # While computing the value, module calls and attribute reads must run
            # for real instead of being traced (fx patches them during tracing).
            self._computing = True
            try:
                proxy.node.meta["_concrete"] = value = self._run(proxy.node, kind, target, args, kwargs)
            finally:
                self._computing = False
            if _is_size_value(proxy.node, value):
                proxy.node.meta["_size"] = True
            if kind == "call_function" and target is operator.getitem:
                self._guard_slice_of_constant(args)
        return proxy

    def decide(self, proxy: _ConcreteProxy, compare, expected, negate_args=None):
        """The example's answer to a Python decision on a size, with a graph node checking it on every call.

        The check is ``proxy`` itself (``compare`` None), ``compare(proxy, expected)``, or for a
        comparison that was false, the opposite comparison of its operands (``negate_args``).
        """
        if not proxy.node.meta.get("_size"):
            raise torch.fx.proxy.TraceError(
                "data-dependent control flow: the Python condition depends on tensor values")
        if negate_args is not None:
            operands = torch.fx.map_arg(negate_args, self.proxy)
            holds = self.create_proxy("call_function", compare, operands, {})
        else:
            holds = proxy if compare is None else self.create_proxy("call_function", compare, (proxy, expected), {})
        self.create_proxy("call_function", shape_guard,
                          (holds, _expression(holds.node),
                           {name: self.proxy(n) for name, n in _sizes_read(holds.node).items()}), {})
        return expected

    def _guard_slice_of_constant(self, args):
        """``buffer[:, a:b]`` with a size ``b`` is shorter than asked past the buffer's end: guard ``b <= len``."""
        tensor, index = args
        if not (isinstance(tensor, _ConcreteProxy) and tensor.node.op == "get_attr"):
            return
        for dim, item in enumerate(index if isinstance(index, tuple) else (index,)):
            if isinstance(item, slice) and isinstance(item.stop, _ConcreteProxy) and item.stop.node.meta.get("_size"):
                length = tensor.concrete.shape[dim]
                if item.stop.concrete <= length:
                    self.decide(item.stop, operator.le, length)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _run(self, node, kind, target, args, kwargs):
        a, kw = self._value(args), self._value(kwargs)
        try:
            return self._run_on_values(node, kind, target, a, kw)
        except Exception as exc:  # noqa: BLE001 - the op refused the example values
            raise NodeFailure(node, a, kw, exc) from exc

    def _run_on_values(self, node, kind, target, a, kw):
        if kind == "placeholder":
            return self._inputs[target]
        if kind == "get_attr":
            return _get_attr(self.root, target)
        if kind == "call_module":
            return self.root.get_submodule(target)(*a, **kw)
        if kind == "call_method":
            return getattr(a[0], target)(*a[1:], **kw)
        if kind == "call_function":
            return target(*a, **kw)
        return None

    def to_bool(self, obj):
        if not isinstance(obj, _ConcreteProxy):
            raise torch.fx.proxy.TraceError(
                "data-dependent control flow: the Python condition depends on tensor values")
        if obj.concrete:
            return self.decide(obj, None, True)
        node = obj.node
        if node.op == "call_function" and node.target in _NEGATED and obj.node.meta.get("_size"):
            self.decide(self.proxy(node), _NEGATED[node.target], None, negate_args=node.args)
        else:
            self.decide(obj, operator.eq, False)
        return False

    def iter(self, obj):
        return iter(obj)


def _is_size_value(node: torch.fx.Node, value) -> bool:
    """Whether ``node`` computes a Python number (or tuple of them) from input sizes only."""
    if node.op == "call_method" and node.target == "size":
        return True
    if isinstance(value, torch.Tensor) or node.op not in ("call_function", "call_method"):
        return False
    inputs = node.all_input_nodes
    return bool(inputs) and all(n.meta.get("_size") for n in inputs)


_OPERATORS = {operator.add: "+", operator.sub: "-", operator.mul: "*", operator.floordiv: "//",
              operator.truediv: "/", operator.mod: "%", operator.gt: ">", operator.ge: ">=",
              operator.lt: "<", operator.le: "<=", operator.eq: "==", operator.ne: "!="}


_NEGATED = {operator.gt: operator.le, operator.ge: operator.lt, operator.lt: operator.ge, operator.le: operator.gt,
            operator.eq: operator.ne, operator.ne: operator.eq}


def _expression(node) -> str:
    """``input_ids.shape[1] <= 32``: a size computation written in terms of the inputs."""
    if not isinstance(node, torch.fx.Node):
        return repr(node)
    if node.op == "call_method" and node.target == "size":
        tensor = _same_shape_source(node.args[0]).name
        return f"{tensor}.shape[{node.args[1]}]" if len(node.args) > 1 else f"{tensor}.shape"
    if node.op == "call_function":
        if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node) \
                and node.args[0].op == "call_method" and node.args[0].target == "size" and len(node.args[0].args) == 1:
            return f"{_same_shape_source(node.args[0].args[0]).name}.shape[{node.args[1]}]"
        if node.target in _OPERATORS:
            a, b = node.args
            return f"{_expression(a)} {_OPERATORS[node.target]} {_expression(b)}"
    return node.name


_SAME_SHAPE_METHODS = frozenset({"to", "bool", "long", "int", "float", "half", "contiguous", "clone", "detach"})


def _same_shape_source(node: torch.fx.Node) -> torch.fx.Node:
    """The input a tensor was converted from (``attention_mask.to(torch.bool)``), to name its sizes after it."""
    while node.op == "call_method" and node.target in _SAME_SHAPE_METHODS and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def _sizes_read(node: torch.fx.Node) -> dict[str, torch.fx.Node]:
    """The size nodes a decision depends on, by their expression (their values go into the error)."""
    found, stack, seen = {}, [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_method" and n.target == "size":
            found[_expression(n)] = n
        else:
            stack.extend(n.all_input_nodes)
    return found


@torch.fx.node.has_side_effect
def shape_guard(holds, condition: str, sizes: dict):
    """Checks a decision the model's Python code took on the example inputs' sizes; part of traced graphs.

    Raises ``InputShapeError`` when inputs of another shape would have taken the other branch,
    so the graph cannot compute them. While ``torch.export`` traces the graph the sizes are
    symbolic and export records its own guards.
    """
    if isinstance(holds, torch.fx.Proxy):  # fx re-tracing the graph (symbolic_trace, unpickling): keep the check
        return holds.tracer.create_proxy("call_function", shape_guard, (holds, condition, sizes), {})
    if isinstance(holds, torch.SymBool) or holds:
        return None
    got = ", ".join(f"{name} = {value}" for name, value in sizes.items())
    inputs = sorted({name.split(".shape")[0] for name in sizes})
    raise InputShapeError(
        f"inputs of these shapes do not fit the compiled model ({got}): it needs `{condition}`, "
        f"as for the example inputs (the model's Python code decided on that size while tracing; "
        f"compile with example inputs of this shape to get a graph for them)",
        inputs=inputs, reason=f"needs `{condition}`", operation="shape_guard")


class _Retracer(torch.fx.Tracer):
    """The tracer torch.fx uses to rebuild a GraphModule's graph from its code when it is unpickled.

    Stock re-tracing names nodes after their targets (``conv2d_3``); this one gives
    them back the names the code uses (``conv1``, ``conv1_weight_quantizer``), so
    ``gm.code`` reads the same after a round trip. It is built without arguments,
    as torch.fx requires. Buffers are proxied: traced graphs slice and expand them by input
    sizes (BERT's position ids), which a real tensor cannot take a proxy for.
    """

    def __init__(self):
        super().__init__()
        self.proxy_buffer_attributes = True

    def trace(self, root, concrete_args=None):
        graph = super().trace(root, concrete_args)
        names = _node_names_in_code(root.__dict__.get("_code"))
        if names is None or len(names) != len(graph.nodes):
            return graph  # code this parser does not follow: keep torch.fx's names
        renamed = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for node, name in zip(graph.nodes, names):
            new = renamed.create_node(node.op, node.target, torch.fx.map_arg(node.args, env.__getitem__),
                                      torch.fx.map_arg(node.kwargs, env.__getitem__), name=name, type_expr=node.type)
            new.meta = node.meta
            env[node] = new
        return renamed


def _node_names_in_code(code: str | None) -> list[str] | None:
    """Node names in the order torch.fx's generated ``forward`` creates them, or None.

    Generated code binds every node to a variable: placeholders are the arguments
    (renamed by ``name = argument`` where they differ), every other node is one
    ``name = expression`` statement, the output is ``return``. Statements such as
    ``x = y = None`` only free memory.
    """
    if not code:
        return None
    try:
        (function,) = [s for s in ast.parse(code.strip()).body if isinstance(s, ast.FunctionDef)]
    except (SyntaxError, ValueError):
        return None
    names = [a.arg for a in function.args.args[1:]]
    for statement in function.body:
        if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Constant) \
                and statement.value.value is None:
            continue  # frees variables, creates no node
        if isinstance(statement, ast.Return):
            names.append("output")
        elif isinstance(statement, ast.Assign) and len(statement.targets) == 1 \
                and isinstance(statement.targets[0], ast.Name):
            target, value = statement.targets[0].id, statement.value
            if isinstance(value, ast.Name) and value.id in names:
                names[names.index(value.id)] = target  # a placeholder named unlike its argument
            else:
                names.append(target)
        else:
            return None
    return names


def _get_attr(root, target: str):
    value = root
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame that is the user's code, not torch's or ours."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if not path.startswith(_FX_DIR) and not path.startswith(_OWN_DIR) and "<eval_with_key>" not in path \
                and frame.filename != _GENERATED_FILE:
            return frame
    return None


def _describe_failure(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "control flow" in text:
        return "data-dependent Python control flow (a condition on a traced tensor's values)"
    if "iterate" in text or "__iter__" in text:
        return "iteration over a traced tensor"
    if "len" in text and "not supported" in text:
        return "len() of a traced tensor"
    return f"{type(exc).__name__}: {text}"


def _trace_error(exc: BaseException, tracer: _Tracer, model: torch.nn.Module) -> TraceError:
    module_path, module_type = tracer.failing_module or ("", type(model))
    frame = _user_frame(exc)
    operation = _describe_failure(exc)
    where = f"module '{module_path}' ({module_type.__name__})" if module_path else \
        f"the model's own forward ({type(model).__name__})"
    source = f"{frame.filename}:{frame.lineno}: {frame.line}" if frame else None
    hint = (f"Mark it a leaf module so it is kept as one opaque call: "
            f"leaf_modules=['{module_path}'] or leaf_modules=[{module_type.__name__}]"
            if module_path else
            "Move the code into a submodule and mark that a leaf module (leaf_modules=[...]), "
            "or make the control flow depend only on shapes")
    message = f"cannot trace {where}: {operation}"
    if source:
        message += f"\n  at {source}"
    message += f"\n  {hint}"
    return TraceError(message, module_path=module_path, operation=operation, source_line=source)


_GENERATED_FILE = "<fxcompress: forward with the example inputs' signature>"


def _input_names(model: torch.nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """Names of the inputs the example gives: positional ones by the forward's signature, then keywords."""
    sig = inspect.signature(model.forward)
    params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has_var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    if len(args) > len(params):
        raise TraceError(f"{type(model).__name__}.forward takes {len(params)} positional inputs, "
                         f"but {len(args)} example inputs were given")
    names = [p.name for p in params[:len(args)]]
    known = {p.name for p in sig.parameters.values()}
    for key in kwargs:
        if key in names:
            raise TraceError(f"example input '{key}' is given both by position and by keyword")
        if key not in known and not has_var_kw:
            raise TraceError(f"{type(model).__name__}.forward has no parameter '{key}'; "
                             f"it takes {[p.name for p in sig.parameters.values()]}")
        if not key.isidentifier():
            raise TraceError(f"example input name {key!r} is not a valid Python identifier")
    missing = [p.name for p in sig.parameters.values()
               if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and p.default is p.empty and p.name not in names and p.name not in kwargs]
    if missing:
        raise TraceError(f"example inputs for {missing} of {type(model).__name__}.forward are missing")
    return names + list(kwargs)


def _with_explicit_forward(model: torch.nn.Module, positional: list[str], keywords: list[str]):
    """A shallow copy of ``model`` whose forward takes exactly the example inputs.

    fx builds placeholders from the signature of ``forward``; decorated forwards
    (``*args, **kwargs`` wrappers, as in Hugging Face models) and optional inputs
    the user did not give would otherwise become placeholders of their own.
    """
    cls = type(model)
    call_args = ", ".join(positional + [f"{k}={k}" for k in keywords])
    source = (f"def forward(self, {', '.join(positional + keywords)}):\n"
              f"    return _original_forward(self, {call_args})\n")
    namespace = {"_original_forward": cls.forward}
    exec(compile(source, _GENERATED_FILE, "exec"), namespace)  # noqa: S102 - generated from identifiers only
    traced_cls = type(cls.__name__, (cls,), {"forward": namespace["forward"], "__module__": cls.__module__})
    root = shallow_module_copy(model)
    root.__class__ = traced_cls
    return root


def trace(model: torch.nn.Module, example_inputs=None, *, leaf_modules: Sequence[Any] | None = None,
          specialize_shapes: bool | None = None) -> torch.fx.GraphModule:
    """Trace ``model`` into a GraphModule whose nodes carry shapes, dtypes and module paths.

    ``example_inputs``: a tensor, a tuple of positional inputs or a dict of keyword inputs.
    ``leaf_modules``: classes or module paths (``*`` globs) kept as opaque calls.
    ``specialize_shapes``: ``None`` tries plain fx first and specializes on the example
    shapes only if needed; ``True``/``False`` force one way.

    The user's model is never modified: the GraphModule's submodules are shallow copies
    that share the parameter tensors (as torch.fx does).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"trace expects an nn.Module, got {type(model).__name__}")
    args, kwargs = normalize_example_inputs(example_inputs)
    leaves = _LeafSpec(leaf_modules)
    leaves.check_paths_exist(model)
    names = _input_names(model, args, kwargs)
    root = _with_explicit_forward(model, names[:len(args)], names[len(args):])

    values = dict(zip(names, list(args) + list(kwargs.values())))
    keys: dict[str, int | str] = {n: (i if i < len(args) else n) for i, n in enumerate(names)}
    graph = None
    first_error = None
    if not specialize_shapes:
        tracer = _Tracer(leaves)
        try:
            graph = tracer.trace(root)
        except Exception as exc:  # noqa: BLE001 - turned into a TraceError below
            first_error = _trace_error(exc, tracer, model)
            if specialize_shapes is False or not (args or kwargs):
                raise first_error from exc
    if graph is None:
        tracer = _ShapeSpecializingTracer(leaves, values)
        try:
            with torch.no_grad():
                graph = tracer.trace(root)
        except NodeFailure as failure:
            raise input_shape_error(failure, root, values, keys) from failure.cause
        except Exception as exc:  # noqa: BLE001
            if refused_by_model_code(exc):
                path, module_type = tracer.failing_module or ("", type(model))
                frame = _user_frame(exc)
                source = f"{frame.filename}:{frame.lineno}: {frame.line}" if frame else None
                raise module_code_error(exc, path, module_type, source, values, keys) from exc
            raise _trace_error(exc, tracer, model) from exc
        for node in graph.nodes:
            node.meta.pop("_concrete", None)

    # torch.fx records the tracer class in the graph and re-creates it with no
    # arguments to rebuild the graph from the code when a GraphModule is unpickled.
    # Ours are trace-time tools (leaf specs, example values): record the re-tracer.
    graph._tracer_cls = _Retracer
    graph._tracer_extras = {}
    name = type(model).__name__
    gm = torch.fx.GraphModule(tracer.root, graph, class_name=name)
    # fx froze every ``self.training`` dropout decision at the mode the model was in: make them follow
    # gm.train()/gm.eval() again (fxcompress/dropout.py).
    make_dropout_mode_aware(gm, traced_in_training=model.training)
    if gm.graph.eliminate_dead_code():  # shape queries answered concretely leave unused nodes
        gm.recompile()
    gm.meta["example_inputs"] = args
    gm.meta["example_kwargs"] = kwargs
    gm.meta["leaf_modules"] = list(leaf_modules or ())
    gm.meta["specialized_shapes"] = first_error is not None or bool(specialize_shapes)
    gm.meta["huggingface_model_type"] = _huggingface_model_type(model)
    gm.meta["dynamic_dims"] = _dynamic_dims(gm, values) if gm.meta["specialized_shapes"] else None
    if args or kwargs:
        try:
            propagate_metadata(gm)
        except NodeFailure as failure:
            raise input_shape_error(failure, gm, values, keys) from failure.cause
    else:
        _set_module_paths(gm)
    index_nncf_scopes(gm, model)  # NNCF scope names of the model as traced, before passes rewrite it
    return gm


def _dynamic_dims(gm: torch.fx.GraphModule, values: dict[str, Any]) -> dict[str, dict[int, str]]:
    """Input dimensions the graph follows (sizes it reads, and the batch), with export names.

    ``{"input_ids": {0: "batch", 1: "sequence"}, ...}``: dimension 0 is the batch; the second
    dimension of a 2-D integer input (token ids, masks) is the sequence; other dimensions
    read are ``dim<i>``, shared by inputs whose example sizes agree (export needs one name for
    sizes the model requires equal).
    """
    read: dict[str, set[int]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_method" or node.target != "size":
            continue
        source = _same_shape_source(node.args[0])
        if source.op != "placeholder" or not isinstance(values.get(source.target), torch.Tensor):
            continue
        rank = values[source.target].dim()
        dims = read.setdefault(source.target, set())
        if len(node.args) > 1:
            dims.add(node.args[1] % rank)
        else:
            dims.update(range(rank))
    def is_text(value):
        return isinstance(value, torch.Tensor) and value.dim() == 2 and not value.is_floating_point()

    # Token ids, token types and masks share the sequence length, also those whose size the model never reads.
    sequence = any(is_text(values[name]) and 1 in dims for name, dims in read.items())
    out = {}
    for name, value in values.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        dims = read.get(name, set()) | {0} | ({1} if sequence and is_text(value) else set())
        out[name] = {d: ("batch" if d == 0 else "sequence" if is_text(value) and d == 1 else f"dim{d}_{value.shape[d]}")
                     for d in sorted(dims)}
    return out


def _huggingface_model_type(model: torch.nn.Module) -> str | None:
    """``config.model_type`` of a Hugging Face transformers model ("bert", "gpt2"), else None."""
    if not any(c.__module__.startswith("transformers.") for c in type(model).__mro__):
        return None
    return getattr(getattr(model, "config", None), "model_type", None) or None


def _set_module_paths(gm: torch.fx.GraphModule):
    for node in gm.graph.nodes:
        if node.op == "call_module":
            node.meta["module_path"] = node.target
        elif "module_path" not in node.meta:
            stack = node.meta.get("nn_module_stack")
            node.meta["module_path"] = next(reversed(stack.values()))[0] if stack else ""


def _tensor_facts(meta):
    """(shape, dtype) of a ShapeProp TensorMetadata, or tuples of them for containers."""
    from torch.fx.passes.shape_prop import TensorMetadata
    if isinstance(meta, TensorMetadata):
        return tuple(meta.shape), meta.dtype
    if isinstance(meta, (tuple, list)):
        facts = [_tensor_facts(m) for m in meta]
        return tuple(f[0] for f in facts), tuple(f[1] for f in facts)
    if isinstance(meta, dict):
        facts = {k: _tensor_facts(m) for k, m in meta.items()}
        return {k: f[0] for k, f in facts.items()}, {k: f[1] for k, f in facts.items()}
    return None, None


def _tensor_metadata(value: torch.Tensor) -> TensorMetadata:
    """fx's ``TensorMetadata`` of a concrete tensor, as ``shape_prop._extract_tensor_metadata`` computes it
    but without its memory-format check, which imports sympy (about 4 s, a third of compiling
    ResNet-18) to handle symbolic shapes that a concrete example tensor never has."""
    memory_format = None
    for candidate in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
        if value.is_contiguous(memory_format=candidate) if value.layout == torch.strided else False:
            memory_format = candidate
            break
    quantized = value.is_quantized
    qparams = {}
    if quantized:
        if value.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            qparams = {"qscheme": value.qscheme(), "scale": value.q_scale(), "zero_point": value.q_zero_point()}
        else:
            qparams = {"qscheme": value.qscheme(), "scale": value.q_per_channel_scales().tolist(),
                       "zero_point": value.q_per_channel_zero_points().tolist(),
                       "axis": value.q_per_channel_axis()}
    stride = value.stride() if value.layout == torch.strided else ()
    return TensorMetadata(value.shape, value.dtype, value.requires_grad, stride, memory_format, quantized, qparams)


class _MetadataInterpreter(torch.fx.Interpreter):
    """Runs the graph on the example inputs and records each node's ``tensor_meta`` (as fx's ShapeProp).

    A node that fails raises ``NodeFailure`` with the values it got, which tracing turns
    into an ``InputShapeError`` naming the module that refused the inputs.
    """

    def run_node(self, n: torch.fx.Node):
        try:
            result = super().run_node(n)
        except Exception as exc:  # noqa: BLE001 - reported with the node and its input values
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            raise NodeFailure(n, args, kwargs, exc) from exc
        found = []

        def tensor_meta(value):
            if not isinstance(value, torch.Tensor):
                return value
            found.append(value)
            return _tensor_metadata(value)

        meta = map_aggregate(result, tensor_meta)
        if found:
            n.meta["tensor_meta"] = meta
        else:
            n.meta.pop("tensor_meta", None)
        return result


def propagate_metadata(gm: torch.fx.GraphModule, example_inputs=None):
    """(Re)compute ``shape``/``dtype``/``module_path`` for every node on the example inputs.

    Passes call this after inserting nodes, so later passes see complete metadata.
    """
    if example_inputs is None:
        args, kwargs = gm.meta.get("example_inputs", ()), gm.meta.get("example_kwargs", {})
    else:
        args, kwargs = normalize_example_inputs(example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat = list(args)
    for node in placeholders[len(args):]:
        name = node.target.lstrip("*")
        if name in kwargs:
            flat.append(kwargs[name])
        else:
            flat.append(node.args[0] if node.args else None)
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            _MetadataInterpreter(gm).run(*flat)
    finally:
        gm.train(was_training)
    for node in gm.graph.nodes:
        node.meta["shape"], node.meta["dtype"] = _tensor_facts(node.meta.get("tensor_meta"))
    _set_module_paths(gm)
    mark_integer_derived(gm)
