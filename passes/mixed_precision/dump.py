"""Mixed precision's dumps (``dump_init_precision_data``): what HAWQ measured and chose, to files.

``traces_per_layer.pt`` (the traces, readable as ``traces_per_layer_path`` by a later
run), ``bitwidth_per_scope.json`` (the choice as a manual-mode config that reproduces
it), ``hawq_data.json`` (traces, noise, candidates, ratios) and a plot
(``plot.py``) when matplotlib is installed.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .selection import Selection

__all__ = ["write_precision_dump"]


def write_precision_dump(directory, layer_paths: list[str], flops: list[float], traces: list[float] | None,
                         noise: list[dict[int, float]] | None, bits: list[int], ratio: float,
                         selection: Selection | None, plot) -> Path:
    """Write the files above into ``directory`` (created); ``plot(path)`` draws the image."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if traces is not None:
        torch.save(torch.tensor(traces, dtype=torch.float32), directory / "traces_per_layer.pt")
    (directory / "bitwidth_per_scope.json").write_text(
        json.dumps({"bitwidth_per_scope": [[b, path] for b, path in zip(bits, layer_paths)]}, indent=2))
    data = {"layers": list(layer_paths), "flops": list(flops), "traces": traces, "bits": list(bits),
            "noise": [{str(b): v for b, v in n.items()} for n in noise] if noise else None,
            "compression_ratio": ratio}
    if selection is not None:
        data.update({"candidate_ratios": selection.candidate_ratios,
                     "candidate_sensitivities": selection.candidate_sensitivities,
                     "reachable_ratio": list(selection.reachable)})
    (directory / "hawq_data.json").write_text(json.dumps(data, indent=1))
    try:
        plot(directory / "traces_and_bits.png")
    except ImportError:
        warnings.warn("mixed precision: matplotlib is not installed; no plot written "
                      "(pip install matplotlib)", stacklevel=3)
    return directory
