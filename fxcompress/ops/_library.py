"""Loads the compiled op library, or falls back to the pure-PyTorch reference,
and registers the parts that live in Python for both: fake (meta) kernels and
autograd.

Import once, at ``import fxcompress.ops``:

1. ``FXCOMPRESS_OPS_BACKEND`` selects the backend: ``auto`` (default: compiled,
   else reference), ``compiled`` (the library must load, or ImportError) or
   ``reference`` (never load it). ``FXCOMPRESS_OPS_LIBRARY`` points at another
   build of the library.
2. The compiled library (``_lib/libfxcompress_ops.so``, built by setup.py /
   CMakeLists.txt) defines the schemas with TORCH_LIBRARY and the CPU (and CUDA)
   kernels with TORCH_LIBRARY_IMPL. Before it is loaded, its build record
   (``libfxcompress_ops.json`` next to it) is checked: a library built against
   another torch (version or CUDA version) is never loaded, since C++ built
   against another libtorch is undefined behaviour. If it is missing, was
   built against another torch, or fails to load, the same schemas are
   defined here and the reference registered as their CPU and CUDA kernels,
   with one warning saying why and how to rebuild (setup.py leaves
   ``_lib/build_failure.json`` when the build failed at install time).
3. Either way, fake kernels (register_fake) and autograd (register_autograd;
   the library brings those of fake_quantize and fake_quantize_learnable, in
   C++) are registered here, so the ops trace through torch.fx, torch.compile,
   torch.export and torch.onnx.export(dynamo=True) under the same names.

Nothing here knows about graphs or compression algorithms.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import _checks, reference

NAMESPACE = "fxcompress"
BACKEND_ENV = "FXCOMPRESS_OPS_BACKEND"
LIBRARY_ENV = "FXCOMPRESS_OPS_LIBRARY"  # another build of the library (a path), for development
LIBRARY_PATH = Path(os.environ.get(LIBRARY_ENV) or Path(__file__).resolve().parent / "_lib" / "libfxcompress_ops.so")
# Written next to the library by CMakeLists.txt / setup.py (same names there).
BUILD_RECORD_PATH = LIBRARY_PATH.with_suffix(".json")      # the torch / CUDA it was built against
FAILURE_RECORD_PATH = LIBRARY_PATH.parent / "build_failure.json"  # why the install built no library
REBUILD_COMMAND = "pip install --no-build-isolation -e ."

# The op set; csrc/torch/cpu_ops.cpp defines the same schemas (a test compares).
SCHEMAS = {
    "fake_quantize": "fake_quantize(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
                     "int? axis=None) -> Tensor",
    "fake_quantize_backward": "fake_quantize_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, "
                              "int quant_min, int quant_max, int? axis=None) -> (Tensor, Tensor, Tensor)",
    "fake_quantize_learnable": "fake_quantize_learnable(Tensor x, Tensor scale, Tensor zero_point, int quant_min, "
                               "int quant_max, int? axis, float min_scale) -> Tensor",
    "fake_quantize_learnable_backward": "fake_quantize_learnable_backward(Tensor grad, Tensor x, Tensor scale, "
                                        "Tensor zero_point, int quant_min, int quant_max, int? axis, "
                                        "float min_scale) -> (Tensor, Tensor, Tensor)",
    "xnor_binarize": "xnor_binarize(Tensor w) -> Tensor",
    "dorefa_binarize": "dorefa_binarize(Tensor w) -> Tensor",
    "activation_binarize": "activation_binarize(Tensor x, Tensor scale, Tensor threshold) -> Tensor",
    "activation_binarize_backward": "activation_binarize_backward(Tensor grad, Tensor x, Tensor scale, "
                                    "Tensor threshold) -> (Tensor, Tensor, Tensor)",
    "apply_mask": "apply_mask(Tensor w, Tensor mask) -> Tensor",
}

REFERENCE_KERNELS = {
    "fake_quantize": reference.fake_quantize,
    "fake_quantize_backward": reference.fake_quantize_backward,
    "fake_quantize_learnable": reference.fake_quantize_learnable,
    "fake_quantize_learnable_backward": reference.fake_quantize_learnable_backward,
    "xnor_binarize": reference.xnor_binarize,
    "dorefa_binarize": reference.dorefa_binarize,
    "activation_binarize": reference.activation_binarize,
    "activation_binarize_backward": reference.activation_binarize_backward,
    "apply_mask": reference.apply_mask,
}

# Device types that get the reference kernel wherever the library has none.
_REFERENCE_DEVICES = ("CPU", "CUDA")

_REBUILD_HINT = (f"Rebuild it with `{REBUILD_COMMAND}` in the source tree or `make setup` (needs a C++ compiler "
                 f"and CMake)")
_BUILD_HINT = f"{_REBUILD_HINT}; meanwhile the pure-PyTorch reference kernels are used (same results, slower)."


@dataclass(frozen=True)
class LoadResult:
    """What ``load()`` did: backend "compiled" or "reference", device types with
    compiled kernels, and why the reference is used (None when it is not)."""

    backend: str
    compiled_devices: tuple[str, ...]
    reason: Optional[str]
    library_path: Optional[str]
    build: Optional[dict] = None  # the loaded library's build record


class LibraryNotLoaded(Exception):
    """The compiled library is not (or cannot be) loaded; the message says why."""


class OpsFallbackWarning(UserWarning):
    """The compiled op library is not used; the reference kernels are."""


_libraries: list[torch.library.Library] = []  # keeps Python registrations alive
_result: Optional[LoadResult] = None


def _has_kernel(name: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", dispatch_key)


def _has_schema(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"{NAMESPACE}::{name}", "")
        return True
    except RuntimeError:
        return False


def _describe_torch(version: str, cuda: str) -> str:
    return f"torch {version} ({f'CUDA {cuda}' if cuda else 'no CUDA'})"


def _checked_build_record() -> dict:
    """The library's build record, if it was built against the running torch;
    else LibraryNotLoaded. Reads files only: the library itself is not opened."""
    if not LIBRARY_PATH.exists():
        if FAILURE_RECORD_PATH.exists():
            try:
                failure = json.loads(FAILURE_RECORD_PATH.read_text())
                why = f"{failure['reason']} (build logs: {', '.join(failure['logs'])})"
            except (OSError, ValueError, KeyError, TypeError) as e:
                why = f"see {FAILURE_RECORD_PATH} (unreadable: {e})"
            raise LibraryNotLoaded(f"the op library could not be built when fxcompress was installed: {why}")
        raise LibraryNotLoaded(f"the compiled op library failed to load ({LIBRARY_PATH} does not exist)")
    try:
        record = json.loads(BUILD_RECORD_PATH.read_text())
        built = (record["torch_version"], record["torch_cuda"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LibraryNotLoaded(f"the op library at {LIBRARY_PATH} is not loaded: its build record {BUILD_RECORD_PATH} "
                               f"is missing or unreadable ({type(e).__name__}: {e}), so the torch it was built "
                               f"against is unknown (a build by an older fxcompress?)") from e
    running = (str(torch.__version__), torch.version.cuda or "")
    if built != running:
        raise LibraryNotLoaded(f"the op library at {LIBRARY_PATH} was built against {_describe_torch(*built)} but "
                               f"this process runs {_describe_torch(*running)}; it is not loaded, since C++ built "
                               f"against another libtorch is undefined behaviour")
    return record


def _load_compiled() -> dict:
    """Checks the build record, then loads the library; returns the record."""
    record = _checked_build_record()
    try:
        torch.ops.load_library(str(LIBRARY_PATH))
    except (OSError, RuntimeError) as e:
        raise LibraryNotLoaded(f"the compiled op library failed to load ({e})") from e
    return record


def _define_missing_ops() -> list[str]:
    """Defines (in Python) the ops that no library defined; returns their names."""
    missing = [name for name in SCHEMAS if not _has_schema(name)]
    if missing:
        lib = torch.library.Library(NAMESPACE, "FRAGMENT")
        _libraries.append(lib)
        for name in missing:
            lib.define(SCHEMAS[name], tags=(torch.Tag.pt2_compliant_tag,))
    return missing


def _register_reference_kernels() -> None:
    """The reference as kernel for every (op, device type) the library left empty."""
    lib = torch.library.Library(NAMESPACE, "IMPL")
    _libraries.append(lib)
    for name, kernel in REFERENCE_KERNELS.items():
        for key in _REFERENCE_DEVICES:
            if not _has_kernel(name, key):
                lib.impl(name, kernel, key)


def _schema_mismatches() -> list[str]:
    """Ops whose loaded schema differs from SCHEMAS (a library older than this code)."""
    bad = []
    for name, schema in SCHEMAS.items():
        loaded = str(torch._C._dispatch_find_schema_or_throw(f"{NAMESPACE}::{name}", "").schema())
        if loaded != f"{NAMESPACE}::{schema}":
            bad.append(f"{name}: library has {loaded!r}")
    return bad


def load() -> LoadResult:
    """Loads the op library (once) and registers everything; see the module docstring."""
    global _result
    if _result is not None:
        return _result
    requested = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if requested not in ("auto", "compiled", "reference"):
        warnings.warn(f"{BACKEND_ENV}={requested!r} is not one of auto, compiled, reference; using auto",
                      OpsFallbackWarning, stacklevel=2)
        requested = "auto"

    reason, record = None, None
    if requested == "reference":
        reason = f"{BACKEND_ENV}=reference"
    else:
        try:
            record = _load_compiled()
        except LibraryNotLoaded as e:
            if requested == "compiled":
                raise ImportError(f"fxcompress: {BACKEND_ENV}=compiled but {e}. {_REBUILD_HINT}.") from e
            reason = str(e)

    loaded = reason is None
    missing = _define_missing_ops()
    if loaded and missing:
        reason = f"the op library at {LIBRARY_PATH} lacks {', '.join(missing)} (stale build)"
    compiled_devices = tuple(key.lower() for key in _REFERENCE_DEVICES
                             if loaded and all(_has_kernel(name, key) for name in SCHEMAS))
    _register_reference_kernels()
    _register_fake_kernels()
    _register_autograd()

    if reason is not None:
        hint = _BUILD_HINT if requested != "reference" else "the pure-PyTorch reference kernels are used."
        warnings.warn(f"fxcompress.ops: {reason}. {hint}", OpsFallbackWarning, stacklevel=2)
    elif mismatched := _schema_mismatches():
        warnings.warn(f"fxcompress.ops: the op library at {LIBRARY_PATH} is older than this code "
                      f"({'; '.join(mismatched)}). {_REBUILD_HINT}.", OpsFallbackWarning, stacklevel=2)
    elif torch.version.cuda and "fallback_reason" in record and "cuda" not in compiled_devices:
        # setup.py built the CPU kernels only because the CUDA build failed; pip
        # hides its warning, so it is repeated here, where CUDA tensors pay for it.
        warnings.warn(f"fxcompress.ops: the op library has CPU kernels only: its CUDA build failed "
                      f"({record['fallback_reason']}); CUDA tensors use the pure-PyTorch reference kernels. "
                      f"{_REBUILD_HINT} once that is fixed.", OpsFallbackWarning, stacklevel=2)
    _result = LoadResult(backend="compiled" if loaded and not missing else "reference",
                         compiled_devices=compiled_devices, reason=reason,
                         library_path=str(LIBRARY_PATH) if loaded else None, build=record if loaded else None)
    return _result


# ---------------------------------------------------------------------------
# Fake kernels: output metadata only, same checks as the kernels (no values).

def _op(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def _register_fake_kernels() -> None:
    @torch.library.register_fake(_op("fake_quantize"))
    def _fake_quantize_fake(x, scale, zero_point, quant_min, quant_max, axis=None):
        _checks.check_fake_quantize(_checks.FAKE_QUANTIZE, x, scale, zero_point, quant_min, quant_max, axis)
        return torch.empty_like(x)

    @torch.library.register_fake(_op("fake_quantize_backward"))
    def _fake_quantize_backward_fake(grad, x, scale, zero_point, quant_min, quant_max, axis=None):
        op = _checks.FAKE_QUANTIZE_BACKWARD
        _checks.check_fake_quantize(op, x, scale, zero_point, quant_min, quant_max, axis)
        _checks.check_grad(op, grad, x)
        return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(zero_point)

    @torch.library.register_fake(_op("fake_quantize_learnable"))
    def _fake_quantize_learnable_fake(x, scale, zero_point, quant_min, quant_max, axis, min_scale):
        op = _checks.FAKE_QUANTIZE_LEARNABLE
        _checks.check_min_scale(op, min_scale)
        _checks.check_fake_quantize(op, x, scale, zero_point, quant_min, quant_max, axis)
        return torch.empty_like(x)

    @torch.library.register_fake(_op("fake_quantize_learnable_backward"))
    def _fake_quantize_learnable_backward_fake(grad, x, scale, zero_point, quant_min, quant_max, axis, min_scale):
        op = _checks.FAKE_QUANTIZE_LEARNABLE_BACKWARD
        _checks.check_min_scale(op, min_scale)
        _checks.check_fake_quantize(op, x, scale, zero_point, quant_min, quant_max, axis)
        _checks.check_grad(op, grad, x)
        return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(zero_point)

    @torch.library.register_fake(_op("xnor_binarize"))
    def _xnor_binarize_fake(w):
        _checks.check_weight_binarize(_checks.XNOR_BINARIZE, w, per_channel=True)
        return torch.empty_like(w)

    @torch.library.register_fake(_op("dorefa_binarize"))
    def _dorefa_binarize_fake(w):
        _checks.check_weight_binarize(_checks.DOREFA_BINARIZE, w, per_channel=False)
        return torch.empty_like(w)

    @torch.library.register_fake(_op("activation_binarize"))
    def _activation_binarize_fake(x, scale, threshold):
        _checks.check_activation_binarize(_checks.ACTIVATION_BINARIZE, x, scale, threshold)
        return torch.empty_like(x)

    @torch.library.register_fake(_op("activation_binarize_backward"))
    def _activation_binarize_backward_fake(grad, x, scale, threshold):
        op = _checks.ACTIVATION_BINARIZE_BACKWARD
        _checks.check_activation_binarize(op, x, scale, threshold)
        _checks.check_grad(op, grad, x)
        return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(threshold)

    @torch.library.register_fake(_op("apply_mask"))
    def _apply_mask_fake(w, mask):
        _checks.check_apply_mask(w, mask)
        return torch.empty_like(w)


# ---------------------------------------------------------------------------
# Autograd. Backward formulas are documented in reference.py and math.h; here
# they are only wired: the backward ops for fake_quantize and
# activation_binarize, straight-through for the weight binarizers, and
# grad * mask / grad * w for apply_mask. No double backward.

def _fake_quantize_setup(ctx, inputs, output):
    """fake_quantize and fake_quantize_learnable: (x, scale, zero_point) are tensors, the rest numbers."""
    x, scale, zero_point, *params = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.params = tuple(params)


def _fake_quantize_backward_through(backward_op):
    """The autograd formula of a fake-quantize op whose backward op takes ``(grad, x, scale,
    zero_point, *params)`` and returns the gradients of x, scale and zero_point."""
    def backward(ctx, grad):
        grads = backward_op(grad, *ctx.saved_tensors, *ctx.params)
        needed = tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))
        return needed + (None,) * len(ctx.params)
    return backward


# Where the library's Autograd registration shows up (it covers every device type).
_COMPILED_AUTOGRAD_KEY = "Autograd"


def _straight_through(ctx, grad):
    return grad


def _activation_binarize_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _activation_binarize_backward(ctx, grad):
    x, scale, threshold = ctx.saved_tensors
    grads = torch.ops.fxcompress.activation_binarize_backward(grad, x, scale, threshold)
    return tuple(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad))


def _apply_mask_setup(ctx, inputs, output):
    w, mask = inputs
    ctx.save_for_backward(w, mask)


def _apply_mask_backward(ctx, grad):
    w, mask = ctx.saved_tensors
    grad_w = torch.ops.fxcompress.apply_mask(grad, mask) if ctx.needs_input_grad[0] else None
    grad_mask = None
    if ctx.needs_input_grad[1]:
        if mask.shape == w.shape and mask.dtype == w.dtype:
            grad_mask = torch.ops.fxcompress.apply_mask(grad, w)
        else:
            grad_mask = (grad.float() * w.float()).sum_to_size(mask.shape).to(mask.dtype)
    return grad_w, grad_mask


def _register_autograd() -> None:
    # The compiled library brings the autograd of fake_quantize and fake_quantize_learnable in C++
    # (csrc/torch/autograd_ops.cpp, the same formulas without the Python overhead, which dominated a
    # QAT step); the fallback uses these.
    if not _has_kernel("fake_quantize", _COMPILED_AUTOGRAD_KEY):
        torch.library.register_autograd(
            _op("fake_quantize"), _fake_quantize_backward_through(torch.ops.fxcompress.fake_quantize_backward),
            setup_context=_fake_quantize_setup)
    if not _has_kernel("fake_quantize_learnable", _COMPILED_AUTOGRAD_KEY):
        torch.library.register_autograd(
            _op("fake_quantize_learnable"),
            _fake_quantize_backward_through(torch.ops.fxcompress.fake_quantize_learnable_backward),
            setup_context=_fake_quantize_setup)
    torch.library.register_autograd(_op("xnor_binarize"), _straight_through)
    torch.library.register_autograd(_op("dorefa_binarize"), _straight_through)
    torch.library.register_autograd(_op("activation_binarize"), _activation_binarize_backward,
                                    setup_context=_activation_binarize_setup)
    torch.library.register_autograd(_op("apply_mask"), _apply_mask_backward, setup_context=_apply_mask_setup)
