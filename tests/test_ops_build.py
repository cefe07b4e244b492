"""The op library's build and loading: which backend is in use, the fallback to
the reference (forced, with the library missing, or built against another
torch), the CPU instruction-set dispatch, schema agreement between C++ and
Python, and the CUDA compile check. setup.py's build fallbacks: test_ops_install.py.

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
from test_ops import cpu_isa_params

BUILT = _library.LIBRARY_PATH.exists() and _library.BUILD_RECORD_PATH.exists()
requires_built = pytest.mark.skipif(not BUILT, reason=f"the op library is not built ({_library.LIBRARY_PATH}); "
                                                      "`make setup` builds it")
# Tests of the library loaded in this process (not when the reference is forced, as in make test's second run).
requires_loaded = pytest.mark.skipif(ops.backend() == "reference",
                                     reason="the compiled op library is not loaded in this process")

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
# warnings (there must be one at most), whether the library file is mapped into
# the process (loaded), computes, saves everything.
_PROBE = _COMPUTE + textwrap.dedent("""
    import os, sys, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import fxcompress.ops as ops
        import fxcompress.ops  # a second import warns no more
        from fxcompress.ops import OpsFallbackWarning, _library
    fallback = [str(w.message) for w in caught if issubclass(w.category, OpsFallbackWarning)]
    with open("/proc/self/maps") as maps:
        mapped = os.path.realpath(_library.LIBRARY_PATH) in maps.read()
    torch.save({"backend": ops.backend(), "info": ops.backend_info(), "fallback": fallback, "mapped": mapped,
                "results": compute(ops)}, sys.argv[1])
""")


def _probe(tmp_path, prelude: str = "", **env):
    """Runs _PROBE (after `prelude`) in a fresh interpreter with `env` added."""
    out = tmp_path / "probe.pt"
    proc = subprocess.run([sys.executable, "-c", prelude + _PROBE, str(out)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return torch.load(out, weights_only=False)


def _compiled_results():
    if ops.backend() == "reference":
        pytest.skip("the compiled op library is not loaded in this process")
    namespace = {}
    exec(_COMPUTE, namespace)
    return namespace["compute"](ops)


def _assert_same_results(a, b):
    for key in ("fake_quantize", "per_tensor", "xnor", "dorefa", "act", "mask"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    for ga, gb in zip(a["grads"], b["grads"]):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5)


@requires_loaded
def test_backend_reports_compiled_when_built():
    assert ops.backend() in ("compiled (cpu)", "compiled (cpu, cuda)")
    info = ops.backend_info()
    assert info["reason"] is None and Path(info["library_path"]) == _library.LIBRARY_PATH
    assert info["cpu_isa"] in info["build"]["cpu_isas"].split(",")
    assert info["build"]["torch_version"] == torch.__version__
    if torch.version.cuda and info["build"]["cuda_kernels"] == "linked":
        assert ops.backend() == "compiled (cpu, cuda)"


@requires_loaded
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
    assert _library.REBUILD_COMMAND in message


def _library_copy(folder: Path, **record) -> Path:
    """This build's library copied into `folder`, its build record changed by `record`."""
    folder.mkdir(parents=True, exist_ok=True)
    library = folder / _library.LIBRARY_PATH.name
    shutil.copy2(_library.LIBRARY_PATH, library)
    built = json.loads(_library.BUILD_RECORD_PATH.read_text())
    (folder / _library.BUILD_RECORD_PATH.name).write_text(json.dumps({**built, **record}))
    return library


def _running_torch() -> str:
    cuda = torch.version.cuda
    return f"torch {torch.__version__} ({f'CUDA {cuda}' if cuda else 'no CUDA'})"


@requires_built
@pytest.mark.parametrize("version, cuda", [("2.14.1+cu130", "13.0"), (str(torch.__version__), "12.8")],
                         ids=["other-torch", "other-cuda"])
def test_library_built_against_another_torch_is_not_loaded(tmp_path, version, cuda):
    library = _library_copy(tmp_path / "pkg", torch_version=version, torch_cuda=cuda)
    probe = _probe(tmp_path, FXCOMPRESS_OPS_LIBRARY=str(library), FXCOMPRESS_OPS_BACKEND="auto")
    assert probe["backend"] == "reference" and not probe["mapped"]  # checked before loading, never loaded
    (message,) = probe["fallback"]
    assert message == (f"fxcompress.ops: the op library at {library} was built against torch {version} "
                       f"(CUDA {cuda}) but this process runs {_running_torch()}; it is not loaded, since C++ built "
                       f"against another libtorch is undefined behaviour. Rebuild it with "
                       f"`{_library.REBUILD_COMMAND}` in the source tree or `make setup` (needs a C++ compiler and "
                       f"CMake); meanwhile the pure-PyTorch reference kernels are used (same results, slower).")

    if version != str(torch.__version__):  # once is enough: with the compiled backend required, an import error
        env = {**os.environ, "FXCOMPRESS_OPS_LIBRARY": str(library), "FXCOMPRESS_OPS_BACKEND": "compiled"}
        proc = subprocess.run([sys.executable, "-c", "import fxcompress.ops"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode != 0 and f"was built against torch {version} (CUDA {cuda})" in proc.stderr


@requires_built
def test_library_without_build_record_is_not_loaded(tmp_path):
    library = _library_copy(tmp_path / "pkg")
    library.with_suffix(".json").unlink()
    probe = _probe(tmp_path, FXCOMPRESS_OPS_LIBRARY=str(library), FXCOMPRESS_OPS_BACKEND="auto")
    assert probe["backend"] == "reference" and not probe["mapped"]
    (message,) = probe["fallback"]
    assert f"{library.with_suffix('.json')} is missing or unreadable" in message
    assert _library.REBUILD_COMMAND in message


@requires_built
def test_cpu_only_fallback_build_warns_once_under_cuda_torch(tmp_path):
    """A library that setup.py built without CUDA kernels because the CUDA build
    failed: under a CUDA torch (simulated: torch.version.cuda set before import)
    it loads, and one warning repeats why, since pip hides setup.py's output."""
    library = _library_copy(tmp_path / "pkg", torch_cuda="13.0", cuda_kernels="disabled",
                            fallback_reason="CMake Error at CMakeLists.txt:85 (enable_language): no CUDA for you")
    probe = _probe(tmp_path, prelude="import torch; torch.version.cuda = '13.0'\n",
                   FXCOMPRESS_OPS_LIBRARY=str(library), FXCOMPRESS_OPS_BACKEND="compiled")
    assert probe["backend"] == "compiled (cpu)" and probe["mapped"]
    assert probe["info"]["build"]["fallback_reason"].endswith("no CUDA for you")
    (message,) = probe["fallback"]
    assert message.startswith("fxcompress.ops: the op library has CPU kernels only: its CUDA build failed "
                              "(CMake Error at CMakeLists.txt:85 (enable_language): no CUDA for you); CUDA tensors "
                              "use the pure-PyTorch reference kernels.")
    assert _library.REBUILD_COMMAND in message


def test_missing_library_is_an_error_when_compiled_is_required(tmp_path):
    env = {**os.environ, "FXCOMPRESS_OPS_LIBRARY": str(tmp_path / "missing.so"), "FXCOMPRESS_OPS_BACKEND": "compiled"}
    proc = subprocess.run([sys.executable, "-c", "import fxcompress.ops"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "FXCOMPRESS_OPS_BACKEND=compiled" in proc.stderr


@pytest.mark.parametrize("isa", cpu_isa_params())
def test_forced_instruction_set_computes_the_same(tmp_path, isa):
    expected = _compiled_results()
    probe = _probe(tmp_path, FXCOMPRESS_OPS_BACKEND="compiled", FXCOMPRESS_CPU_ISA=isa)
    assert probe["info"]["cpu_isa"] == isa and probe["fallback"] == []
    _assert_same_results(probe["results"], expected)


def _cpu_flags() -> set:
    """The CPU features Linux reports (it leaves out those the OS has not enabled in XCR0)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


@requires_loaded
def test_default_instruction_set_is_the_best_this_cpu_has():
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no x86 CPU flags in /proc/cpuinfo to check the detection against")
    compiled = ops.backend_info()["build"]["cpu_isas"].split(",")
    wanted = [isa for isa, needs in (("avx512", {"avx512f", "avx512bw", "avx512vl", "avx512dq"}), ("avx2", {"avx2"}))
              if needs <= flags and isa in compiled]
    best = (wanted + ["baseline"])[0]
    probe = _probe_isa(FXCOMPRESS_CPU_ISA="")  # the default choice, whatever this process forced
    assert probe == best
    assert torch.ops.fxcompress._cpu_isas_supported().split(",") == wanted + ["baseline"]


def _probe_isa(**env) -> str:
    """The instruction set a fresh interpreter with `env` picks (or its error, from any op)."""
    code = "import torch, fxcompress.ops; print(torch.ops.fxcompress._cpu_isa())"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)
    return proc.stdout.strip() if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1]


@requires_loaded
def test_forcing_an_instruction_set_this_library_or_cpu_lacks_is_a_clear_error():
    supported = torch.ops.fxcompress._cpu_isas_supported()
    compiled = ops.backend_info()["build"]["cpu_isas"]
    assert _probe_isa(FXCOMPRESS_CPU_ISA="avx1024") == (
        f"RuntimeError: FXCOMPRESS_CPU_ISA=avx1024: unknown CPU instruction set 'avx1024'; this library has "
        f"{compiled} and this CPU can run {supported}")
    with pytest.raises(RuntimeError, match=r"_set_cpu_isa\('sse5'\): unknown CPU instruction set 'sse5'"):
        torch.ops.fxcompress._set_cpu_isa("sse5")
    lacking = [isa for isa in compiled.split(",") if isa not in supported.split(",")]
    if not lacking:
        pytest.skip(f"this CPU runs every instruction set of the library ({compiled}): no unsupported one to force")
    message = _probe_isa(FXCOMPRESS_CPU_ISA=lacking[0])
    assert message.startswith(f"RuntimeError: FXCOMPRESS_CPU_ISA={lacking[0]}: this CPU cannot run the "
                              f"'{lacking[0]}' kernels (they need ")
    assert message.endswith(f"); the ones it can run: {supported}")


@requires_loaded
def test_set_cpu_isa_switches_the_kernels_and_back():
    F = torch.ops.fxcompress
    start = F._cpu_isa()
    supported = F._cpu_isas_supported().split(",")
    assert start == supported[0] or os.environ.get("FXCOMPRESS_CPU_ISA") == start
    try:
        assert F._set_cpu_isa("baseline") == start and F._cpu_isa() == "baseline"
        assert F._set_cpu_isa(supported[0]) == "baseline" and F._cpu_isa() == supported[0]
        assert F._set_cpu_isa("") == supported[0]  # back to the default choice, made at the next call
        assert F._cpu_isa() == (os.environ.get("FXCOMPRESS_CPU_ISA") or supported[0])
    finally:
        F._set_cpu_isa(start)


@requires_loaded
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


def test_build_info_is_json_and_equals_the_build_record():
    if ops.backend() == "reference":
        pytest.skip("the compiled op library is not loaded in this process")
    compiled_in = json.loads(torch.ops.fxcompress._build_info())
    assert compiled_in["cpu_isas"]
    # The record next to the library, checked before loading, describes this very build.
    record = json.loads(_library.BUILD_RECORD_PATH.read_text())
    record.pop("fallback_reason", None)  # added by setup.py, not compiled in
    assert record == compiled_in
