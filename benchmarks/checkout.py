"""Run a benchmark script against this checkout from any venv (the torchvision one, NNCF's).

``use_this_checkout()`` puts the repository root first on ``sys.path`` and, when
``fxcompress.passes`` would not come from this checkout (the venv has no fxcompress
installed, or another checkout), maps this checkout's ``passes/`` as
``fxcompress.passes`` (the package's editable install does that mapping otherwise).
Call it before importing fxcompress; it returns the repository root.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def use_this_checkout() -> Path:
    sys.path.insert(0, str(ROOT))
    found = importlib.util.find_spec("fxcompress.passes")
    if found is None or not str(found.origin).startswith(str(ROOT)):
        spec = importlib.util.spec_from_file_location("fxcompress.passes", ROOT / "passes" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "passes")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["fxcompress.passes"] = module
        spec.loader.exec_module(module)
    return ROOT
