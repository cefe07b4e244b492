"""Build script: maps passes/ to fxcompress.passes and builds the C++ op library.

The op library (csrc/, CMakeLists.txt) is built with CMake against the torch
that is already installed (hence `pip install --no-build-isolation`), in a
build directory under build/ that is reused across builds (incremental), and
copied with its build record (libfxcompress_ops.json: the torch and CUDA
versions it was built against) to fxcompress/ops/_lib/: into the source tree
for `pip install -e .` and `python setup.py build_ext --inplace`, into the
wheel for `pip install .`.

The library is optional, so installing never fails because of it:
1. the full build (CUDA kernels where PyTorch has CUDA and nvcc works);
2. if that fails (a partial CUDA toolkit that stops TorchConfig.cmake, an
   nvcc that cannot compile our kernels, ...): the CPU kernels only, with
   torch imported from its install paths as torch.utils.cpp_extension does
   (FXC_CUDA=OFF, FXC_TORCH_FROM_PATHS=ON), and one warning saying why;
3. if that fails too: no library. _lib/build_failure.json records why, and
   `import fxcompress` warns once and uses the pure-PyTorch reference kernels.
Each attempt's full CMake output is in fxcompress-build.log in its build folder.

Environment: FXCOMPRESS_SKIP_OPS_BUILD=1 skips the library (the package then
uses its pure-PyTorch reference kernels); CMAKE_BUILD_PARALLEL_LEVEL sets the
number of compile jobs (default: all cores); CMAKE_ARGS adds CMake arguments;
FXCOMPRESS_OPS_BUILD_DIR moves the CMake build folders (default: build/).
"""
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent

# passes/ is imported as fxcompress.passes (docs/design.md); pyproject.toml maps the folder.
PACKAGES = (["fxcompress"] + [f"fxcompress.{p}" for p in find_packages("fxcompress")]
            + ["fxcompress.passes"] + [f"fxcompress.passes.{p}" for p in find_packages("passes")])

OPS_LIBRARY = "fxcompress.ops._lib.libfxcompress_ops"
# Written next to the library (same names as fxcompress/ops/_library.py reads).
BUILD_RECORD = "libfxcompress_ops.json"      # by CMake: what the library was built against
FAILURE_RECORD = "build_failure.json"        # by this script: why there is no library
REBUILD_COMMAND = "pip install --no-build-isolation -e ."

# The build attempts, in order: name, extra CMake arguments (after CMAKE_ARGS, so they hold).
BUILD_ATTEMPTS = (
    ("full", []),
    ("cpu", ["-DFXC_CUDA=OFF", "-DFXC_TORCH_FROM_PATHS=ON"]),
)


class CMakeExtension(Extension):
    """A shared library built by CMakeLists.txt rather than by setuptools."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class OpsBuildFailed(Exception):
    """One build attempt failed; ``why`` is the first error in its output."""

    def __init__(self, why: str, log: Path):
        super().__init__(why)
        self.why, self.log = why, log


def _tool(name: str):
    """`name` from this interpreter's environment (pip's cmake / ninja), else from PATH."""
    here = shutil.which(name, path=str(Path(sys.executable).parent))
    return here or shutil.which(name)


def _first_error(lines: list[str], limit: int = 400) -> str:
    """The first error of a CMake run, on one line: the message of the first
    `CMake Error` (its indented lines), else the first compiler/linker error
    line, else the last line."""
    for i, line in enumerate(lines):
        if line.startswith("CMake Error"):
            message = [line.strip()]
            for follow in lines[i + 1:]:
                if follow.strip() and not follow[0].isspace():
                    break
                message.append(follow.strip())
            return _shorten(" ".join(part for part in message if part).rstrip(":. "), limit)
    for line in lines:
        if re.search(r"\berror\b|\bfatal\b|FAILED:", line, re.IGNORECASE):
            return _shorten(line.strip().rstrip(". "), limit)
    last = [line.strip() for line in lines if line.strip()]
    return _shorten(last[-1].rstrip(". ") if last else "no output", limit)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _warn(message: str) -> None:
    print(f"\nWARNING: {message}\n", file=sys.stderr, flush=True)


class BuildOps(build_ext):
    def get_ext_filename(self, fullname):
        # A plain shared library (loaded with torch.ops.load_library), not a Python
        # extension module: no ABI tag. setuptools asks with the full dotted name
        # and with its last component only.
        if OPS_LIBRARY == fullname or OPS_LIBRARY.endswith("." + fullname):
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        if os.environ.get("FXCOMPRESS_SKIP_OPS_BUILD") == "1":
            print("FXCOMPRESS_SKIP_OPS_BUILD=1: not building the op library (reference kernels will be used)")
            ext.optional = True  # nothing to copy into the source tree either
            return
        lib_dir = target.parent
        lib_dir.mkdir(parents=True, exist_ok=True)
        for stale in (target, lib_dir / BUILD_RECORD, lib_dir / FAILURE_RECORD):
            stale.unlink(missing_ok=True)
        # For in-place and editable builds setuptools then copies the library into
        # the source tree, whose _lib/ folder is not in git (the library is ignored).
        (ROOT / Path(*OPS_LIBRARY.split(".")[:-1])).mkdir(parents=True, exist_ok=True)

        failures = []
        for name, extra_args in BUILD_ATTEMPTS:
            try:
                build_dir = self._cmake_build(name, extra_args)
            except OpsBuildFailed as failure:
                failures.append(failure)
                continue
            shutil.copy2(build_dir / "libfxcompress_ops.so", target)
            record = json.loads((build_dir / BUILD_RECORD).read_text())
            if failures:
                record["fallback_reason"] = failures[0].why
                _warn(f"fxcompress: the op library's full build (CUDA kernels where PyTorch has CUDA) failed: "
                      f"{failures[0].why}. Built its CPU kernels only instead (torch imported from its paths, "
                      f"no CUDA sources); CUDA tensors will use the pure-PyTorch reference kernels. "
                      f"Log: {failures[0].log}. Rebuild after fixing: {REBUILD_COMMAND}")
            (lib_dir / BUILD_RECORD).write_text(json.dumps(record, indent=1) + "\n")
            return
        # No library: the package works with its reference kernels and says why at import.
        ext.optional = True  # setuptools then has no library to copy into the source tree
        full, cpu = failures
        why = f"{full.why} (the CPU-only fallback: {'the same error' if cpu.why == full.why else cpu.why})"
        (lib_dir / FAILURE_RECORD).write_text(json.dumps(
            {"reason": why, "logs": [str(f.log) for f in failures]}, indent=1) + "\n")
        _warn(f"fxcompress: the op library could not be built: {why}. fxcompress is installed with its "
              f"pure-PyTorch reference kernels (same results, slower). Logs: {', '.join(str(f.log) for f in failures)}. "
              f"Rebuild after fixing: {REBUILD_COMMAND}")

    def copy_extensions_to_source(self):
        """Also brings the build records into the source tree, and removes a library
        and records that this build did not produce (a stale library must not stay)."""
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            if not isinstance(ext, CMakeExtension) or os.environ.get("FXCOMPRESS_SKIP_OPS_BUILD") == "1":
                continue
            inplace_file, regular_file = (Path(p) for p in self._get_inplace_equivalent(build_py, ext))
            for name in (inplace_file.name, BUILD_RECORD, FAILURE_RECORD):
                built, in_source = regular_file.parent / name, inplace_file.parent / name
                if built.exists():
                    if name != inplace_file.name:  # setuptools copied the library itself
                        shutil.copy2(built, in_source)
                else:
                    in_source.unlink(missing_ok=True)

    def _cmake_build(self, attempt: str, extra_args: list[str]) -> Path:
        """Configures and builds in this attempt's build folder; returns it, or
        raises OpsBuildFailed with the first error."""
        build_dir = self._build_dir(attempt)
        build_dir.mkdir(parents=True, exist_ok=True)
        log = build_dir / "fxcompress-build.log"
        cmake = _tool("cmake")
        if cmake is None:
            raise OpsBuildFailed("CMake >= 3.22 was not found (`pip install cmake`)", log)
        configure = [cmake, "-S", str(ROOT), "-B", str(build_dir), f"-DPython_EXECUTABLE={sys.executable}",
                     "-DCMAKE_BUILD_TYPE=Release"]
        ninja = _tool("ninja")
        if ninja and not (build_dir / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        configure += shlex.split(os.environ.get("CMAKE_ARGS", "")) + extra_args
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        with open(log, "w") as log_file:
            try:
                self._run(configure, log_file, log)
            except OpsBuildFailed:
                # A failed configure leaves a half-written cache (e.g. an empty
                # CMAKE_CUDA_ARCHITECTURES) that would fail the next build too,
                # even after the toolchain is fixed: the next one starts afresh.
                (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
                shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)
                raise
            self._run([cmake, "--build", str(build_dir), "--parallel", jobs], log_file, log)
        return build_dir

    @staticmethod
    def _build_dir(attempt: str) -> Path:
        # One build directory per interpreter, torch and attempt, reused across
        # builds so that rebuilding after an edit only recompiles what changed.
        import torch

        key = hashlib.sha1(f"{sys.executable}|{torch.__version__}".encode()).hexdigest()[:10]
        base = Path(os.environ.get("FXCOMPRESS_OPS_BUILD_DIR") or ROOT / "build").resolve()
        return base / (f"ops-{key}" if attempt == "full" else f"ops-{key}-{attempt}")

    @staticmethod
    def _run(cmd, log_file, log: Path):
        """Runs cmd, its output to the console and the log; OpsBuildFailed if it fails."""
        header = "+ " + " ".join(shlex.quote(c) for c in cmd)
        print(header, flush=True)
        log_file.write(header + "\n")
        lines = []
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace")
        except OSError as e:
            raise OpsBuildFailed(f"cannot run {cmd[0]}: {e}", log) from e
        for line in proc.stdout:
            sys.stdout.write(line)
            log_file.write(line)
            lines.append(line.rstrip("\n"))
        if proc.wait() != 0:
            sys.stdout.flush()
            raise OpsBuildFailed(_first_error(lines), log)


setup(packages=PACKAGES, ext_modules=[CMakeExtension(OPS_LIBRARY)], cmdclass={"build_ext": BuildOps})
