"""Build script: maps passes/ to fxcompress.passes and builds the C++ op library."""
from setuptools import find_packages, setup

# passes/ is imported as fxcompress.passes (DESIGN.md); pyproject.toml maps the folder.
PACKAGES = (["fxcompress"] + [f"fxcompress.{p}" for p in find_packages("fxcompress")]
            + ["fxcompress.passes"] + [f"fxcompress.passes.{p}" for p in find_packages("passes")])

setup(packages=PACKAGES)
