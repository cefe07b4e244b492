"""Installing never fails because of the op library (setup.py's fallbacks),
simulated for real by running `setup.py build_ext` with CMake arguments that
break the build:

- an nvcc that fails (given as CMAKE_CUDA_COMPILER): the full build fails in
  its CUDA part, so setup.py builds the CPU kernels only (FXC_CUDA=OFF, torch
  imported from its paths) and warns once; the library loads and computes;
- a C++ compiler that does not exist: every CMake attempt fails, so setup.py
  installs no library, records why, and `import fxcompress` warns once and
  uses the reference kernels.

Builds go to a temporary build_lib (and, for the in-place test, a copy of the
source tree), never into this checkout's fxcompress/ops/_lib.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import fxcompress.ops as ops
from test_ops_build import _COMPUTE, _assert_same_results, _probe

ROOT = Path(__file__).resolve().parents[1]
LIB_SUBDIR = Path("fxcompress", "ops", "_lib")
REBUILD = "pip install --no-build-isolation -e ."
# The CPU-only fallback's CMake build folder is kept across test runs (like
# setup.py's own build/ folders), so only the first run compiles everything.
FALLBACK_BUILD_DIR = ROOT / "build" / "test-ops-fallback"


def _build_ext(cmake_args: str, build_dir: Path, *setup_args: str, cwd: Path = ROOT):
    """Runs `setup.py build_ext` with CMAKE_ARGS; returns (process, setup.py's warnings)."""
    env = {**os.environ, "CMAKE_ARGS": cmake_args, "FXCOMPRESS_OPS_BUILD_DIR": str(build_dir),
           "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    env.pop("FXCOMPRESS_SKIP_OPS_BUILD", None)
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", *setup_args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING: fxcompress")]
    return proc, warnings


def _results_here():
    """The probe's computation in this process (compiled or reference kernels: both compute the same)."""
    namespace = {}
    exec(_COMPUTE, namespace)
    return namespace["compute"](ops)


def _failing_nvcc(folder: Path) -> Path:
    nvcc = folder / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc fatal   : fxcompress test: this nvcc cannot compile anything' >&2\n"
                    "exit 1\n")
    nvcc.chmod(0o755)
    return nvcc


def test_failing_cuda_build_falls_back_to_the_cpu_kernels(tmp_path):
    nvcc = _failing_nvcc(tmp_path)
    build_lib = tmp_path / "lib"
    proc, warnings = _build_ext(f"-DCMAKE_CUDA_COMPILER={nvcc}", FALLBACK_BUILD_DIR, "--build-lib", str(build_lib))

    (warning,) = warnings
    assert "the op library's full build (CUDA kernels where PyTorch has CUDA) failed" in warning
    assert "CUDA" in warning.split("failed: ", 1)[1]  # the reason names the CUDA compiler's failure
    assert "Built its CPU kernels only" in warning and "torch imported from its paths" in warning
    assert f"Rebuild after fixing: {REBUILD}" in warning
    lib_dir = build_lib / LIB_SUBDIR
    record = json.loads((lib_dir / "libfxcompress_ops.json").read_text())
    assert record["cuda_kernels"] == "disabled" and record["torch_version"] == str(torch.__version__)
    assert record["fallback_reason"] in warning
    assert not (lib_dir / "build_failure.json").exists()
    # The failed configure left no cache behind: once nvcc is fixed, the full build starts afresh.
    (full_log,) = [p for p in FALLBACK_BUILD_DIR.glob("ops-*/fxcompress-build.log") if "-cpu" not in p.parent.name]
    assert str(full_log) in warning and not (full_log.parent / "CMakeCache.txt").exists()

    # The fallback library loads, says how it was built, and computes what the reference computes.
    library = lib_dir / "libfxcompress_ops.so"
    probe = _probe(tmp_path, FXCOMPRESS_OPS_LIBRARY=str(library), FXCOMPRESS_OPS_BACKEND="compiled")
    assert probe["backend"] == "compiled (cpu)" and probe["fallback"] == [] and probe["mapped"]
    assert probe["info"]["build"] == record
    _assert_same_results(probe["results"], _results_here())


def _source_copy(dest: Path) -> Path:
    """The files setup.py needs to build, copied: an in-place build then writes there."""
    dest.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "CMakeLists.txt"):
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "_lib")
    for name in ("csrc", "fxcompress", "passes"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


def test_when_cmake_fails_entirely_the_install_uses_the_reference_kernels(tmp_path):
    source = _source_copy(tmp_path / "src")
    lib_dir = source / LIB_SUBDIR
    # A library and record from an earlier build: an in-place build that builds no library must remove them.
    lib_dir.mkdir()
    (lib_dir / "libfxcompress_ops.so").write_bytes(b"stale")
    (lib_dir / "libfxcompress_ops.json").write_text("{}")

    bad_compiler = "/nonexistent/fxcompress-test/c++"
    proc, warnings = _build_ext(f"-DCMAKE_CXX_COMPILER={bad_compiler}", tmp_path / "cmake", "--inplace",
                                "--build-lib", str(tmp_path / "lib"), cwd=source)

    (warning,) = warnings
    assert warning.startswith("WARNING: fxcompress: the op library could not be built: CMake Error")
    assert bad_compiler in warning and "the CPU-only fallback: the same error" in warning
    assert "installed with its pure-PyTorch reference kernels" in warning and REBUILD in warning
    assert sorted(p.name for p in lib_dir.iterdir()) == ["build_failure.json"]
    failure = json.loads((lib_dir / "build_failure.json").read_text())
    assert bad_compiler in failure["reason"] and all(Path(log).exists() for log in failure["logs"])

    # Import: reference kernels, one warning naming the reason and the rebuild command.
    library = lib_dir / "libfxcompress_ops.so"
    probe = _probe(tmp_path, FXCOMPRESS_OPS_LIBRARY=str(library), FXCOMPRESS_OPS_BACKEND="auto")
    assert probe["backend"] == "reference"
    (message,) = probe["fallback"]
    assert message.startswith("fxcompress.ops: the op library could not be built when fxcompress was installed: ")
    assert bad_compiler in message and REBUILD in message and "reference kernels are used" in message
    assert probe["info"]["reason"] in message

    # With the compiled backend required (as `make test` does), the same is an import error.
    env = {**os.environ, "FXCOMPRESS_OPS_LIBRARY": str(library), "FXCOMPRESS_OPS_BACKEND": "compiled"}
    proc = subprocess.run([sys.executable, "-c", "import fxcompress.ops"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "could not be built when fxcompress was installed" in proc.stderr

