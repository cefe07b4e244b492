"""Build script: maps passes/ to fxcompress.passes and builds the C++ op library.

The op library (csrc/, CMakeLists.txt) is built with CMake against the torch
that is already installed (hence `pip install --no-build-isolation`), in a
build directory under build/ that is reused across builds (incremental), and
copied to fxcompress/ops/_lib/libfxcompress_ops.so: into the source tree for
`pip install -e .` and `python setup.py build_ext --inplace`, into the wheel
for `pip install .`.

Environment: FXCOMPRESS_SKIP_OPS_BUILD=1 skips the library (the package then
uses its pure-PyTorch reference kernels); CMAKE_BUILD_PARALLEL_LEVEL sets the
number of compile jobs (default: all cores); CMAKE_ARGS adds CMake arguments.
"""
import hashlib
import os
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


class CMakeExtension(Extension):
    """A shared library built by CMakeLists.txt rather than by setuptools."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _tool(name: str):
    """`name` from this interpreter's environment (pip's cmake / ninja), else from PATH."""
    here = shutil.which(name, path=str(Path(sys.executable).parent))
    return here or shutil.which(name)


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
        cmake = _tool("cmake")
        if cmake is None:
            raise RuntimeError("building the fxcompress op library needs CMake >= 3.22: `pip install cmake` "
                               "(or set FXCOMPRESS_SKIP_OPS_BUILD=1 to use the pure-PyTorch kernels)")
        build_dir = self._build_dir()
        configure = [cmake, "-S", str(ROOT), "-B", str(build_dir), f"-DPython_EXECUTABLE={sys.executable}",
                     "-DCMAKE_BUILD_TYPE=Release"]
        ninja = _tool("ninja")
        if ninja and not (build_dir / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        configure += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        self._run(configure)
        self._run([cmake, "--build", str(build_dir), "--parallel", jobs])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build_dir / "libfxcompress_ops.so", target)
        # For in-place and editable builds setuptools then copies the library into
        # the source tree, whose _lib/ folder is not in git (the library is ignored).
        (ROOT / Path(*OPS_LIBRARY.split(".")[:-1])).mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _build_dir() -> Path:
        # One build directory per interpreter and torch, reused across builds so
        # that rebuilding after an edit only recompiles what changed.
        import torch

        key = hashlib.sha1(f"{sys.executable}|{torch.__version__}".encode()).hexdigest()[:10]
        return ROOT / "build" / f"ops-{key}"

    @staticmethod
    def _run(cmd):
        print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)


setup(packages=PACKAGES, ext_modules=[CMakeExtension(OPS_LIBRARY)], cmdclass={"build_ext": BuildOps})
