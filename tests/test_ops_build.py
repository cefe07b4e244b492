"""The op library's build and loading: which backend is in use, the fallback to
the reference (forced, or with the library missing), the CPU instruction-set
dispatch, schema agreement between C++ and Python, and the CUDA compile check.

Subprocesses get a fresh interpreter, since the library loads once per process.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fxcompress.ops as ops
from fxcompress.ops import _library

BUILT = _library.LIBRARY_PATH.exists()
requires_built = pytest.mark.skipif(not BUILT, reason=f"the op library is not built ({_library.LIBRARY_PATH}); "
                                                      "`make setup` builds it")

# Every op on fixed inputs; run here (compiled kernels) and in subprocesses.
_COMPUTE = textwrap.dedent("""
    import torch

    def compute(ops):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, 6, 5, generator=g)
        s, zp = torch.rand(6, generator=g) * 0.1 + 0.01, torch.randn(6, generator=g) * 3
        xg, sg, zg = (t.clone().requires_grad_() for t in (x, s, zp))
        y = ops.fake_quantize(xg, sg, zg, -8, 7, 1)
        y.backward(torch.ones_like(y))
        return {
            "fake_quantize": y.detach(), "grads": (xg.grad, sg.grad, zg.grad),
            "per_tensor": ops.fake_quantize(x, s[:1], zp[:1], 0, 255),
            "xnor": ops.xnor_binarize(x), "dorefa": ops.dorefa_binarize(x.half()),
            "act": ops.activation_binarize(x, torch.ones(1), torch.full((1, 6, 1), 0.3)),
            "mask": ops.apply_mask(x, (x > 0).float()),
        }
""")

# A fresh interpreter: imports fxcompress.ops twice, records its fallback
# warnings (there must be one at most), computes, saves everything.
_PROBE = _COMPUTE + textwrap.dedent("""
    import sys, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import fxcompress.ops as ops
        import fxcompress.ops  # a second import warns no more
        from fxcompress.ops import OpsFallbackWarning
    fallback = [str(w.message) for w in caught if issubclass(w.category, OpsFallbackWarning)]
    torch.save({"backend": ops.backend(), "info": ops.backend_info(), "fallback": fallback,
                "results": compute(ops)}, sys.argv[1])
""")


def _probe(tmp_path, **env):
    out = tmp_path / "probe.pt"
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(out)], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return torch.load(out, weights_only=False)


def _compiled_results():
    if ops.backend() == "reference":
        pytest.skip("the op library is not built")
    namespace = {}
    exec(_COMPUTE, namespace)
    return namespace["compute"](ops)


def _assert_same_results(a, b):
    for key in ("fake_quantize", "per_tensor", "xnor", "dorefa", "act", "mask"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    for ga, gb in zip(a["grads"], b["grads"]):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5)


@requires_built
def test_backend_reports_compiled_when_built():
    assert ops.backend() in ("compiled (cpu)", "compiled (cpu, cuda)")
    info = ops.backend_info()
    assert info["reason"] is None and Path(info["library_path"]) == _library.LIBRARY_PATH
    assert info["cpu_isa"] in info["build"]["cpu_isas"].split(",")
    assert info["build"]["torch_version"] == torch.__version__
    if torch.version.cuda and info["build"]["cuda_kernels"] == "linked":
        assert ops.backend() == "compiled (cpu, cuda)"


@requires_built
def test_compiled_schemas_equal_the_python_table():
    for name, schema in _library.SCHEMAS.items():
        handle = torch._C._dispatch_find_schema_or_throw(f"fxcompress::{name}", "")
        assert str(handle.schema()) == f"fxcompress::{schema}"
        assert torch.Tag.pt2_compliant_tag in getattr(torch.ops.fxcompress, name).default.tags


def test_forced_reference_backend_warns_once_and_computes_the_same(tmp_path):
    probe = _probe(tmp_path, FXCOMPRESS_OPS_BACKEND="reference")
    assert probe["backend"] == "reference"
    assert len(probe["fallback"]) == 1 and "FXCOMPRESS_OPS_BACKEND=reference" in probe["fallback"][0]
    _assert_same_results(probe["results"], _compiled_results())


def test_missing_library_falls_back_with_one_actionable_warning(tmp_path):
    missing = tmp_path / "nowhere" / "libfxcompress_ops.so"
    probe = _probe(tmp_path, FXCOMPRESS_OPS_LIBRARY=str(missing), FXCOMPRESS_OPS_BACKEND="auto")
    assert probe["backend"] == "reference"
    (message,) = probe["fallback"]
    assert str(missing) in message and "failed to load" in message and "make setup" in message


def test_missing_library_is_an_error_when_compiled_is_required(tmp_path):
    env = {**os.environ, "FXCOMPRESS_OPS_LIBRARY": str(tmp_path / "missing.so"), "FXCOMPRESS_OPS_BACKEND": "compiled"}
    proc = subprocess.run([sys.executable, "-c", "import fxcompress.ops"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "FXCOMPRESS_OPS_BACKEND=compiled" in proc.stderr


def test_baseline_instruction_set_computes_the_same(tmp_path):
    expected = _compiled_results()
    probe = _probe(tmp_path, FXCOMPRESS_OPS_BACKEND="compiled", FXCOMPRESS_CPU_ISA="baseline")
    assert probe["info"]["cpu_isa"] == "baseline" and probe["fallback"] == []
    _assert_same_results(probe["results"], expected)


@requires_built
def test_cuda_sources_compile_with_nvcc():
    build = ops.backend_info()["build"]
    if shutil.which("nvcc") is None and build["cuda_kernels"] == "skipped":
        pytest.skip("nvcc is not on PATH: the CUDA compile check was skipped")
    assert build["cuda_kernels"] in ("check", "linked"), build
    if build["cuda_kernels"] == "check":  # CPU-only PyTorch: the kernels went into a static library
        artifact = Path(build["cuda_check_artifact"])
        assert artifact.name == "libfxcompress_cuda_check.a" and artifact.stat().st_size > 0
    else:
        assert ops.backend() == "compiled (cpu, cuda)"


def test_build_info_is_json():
    if ops.backend() == "reference":
        pytest.skip("the op library is not built")
    assert json.loads(torch.ops.fxcompress._build_info())["cpu_isas"]
