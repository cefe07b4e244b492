"""Optional plot of a HAWQ choice (needs matplotlib; nothing else imports it).

Left: the average Hessian trace per layer (log scale, execution order), bars
coloured by the chosen bit width. Right (when the candidates are known): every
monotone candidate's compression ratio against its total sensitivity, the
chosen one marked (NNCF's ``dump_metric_flops``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

__all__ = ["plot_traces_and_bits"]

_COLORS = {2: "#d62728", 3: "#ff7f0e", 4: "#ffbf00", 5: "#bcbd22", 6: "#2ca02c", 7: "#17becf", 8: "#1f77b4"}


def plot_traces_and_bits(path, layers: Sequence[str], traces: Sequence[float], bits: Sequence[int],
                         selection=None) -> Path:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    path = Path(path)
    panels = 2 if selection is not None and selection.candidate_ratios else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 + 0.25 * len(layers) + 4 * (panels - 1), 4.5), squeeze=False)
    ax = axes[0][0]
    heights = [max(abs(t), 1e-12) for t in traces]
    ax.bar(range(len(layers)), heights, color=[_COLORS.get(b, "gray") for b in bits])
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=75, fontsize=7)
    ax.set_ylabel("average Hessian trace")
    ax.set_title("traces and chosen bits")
    ax.legend(handles=[Patch(color=_COLORS.get(b, "gray"), label=f"{b}-bit") for b in sorted(set(bits))],
              fontsize=8)
    if panels == 2:
        ax2 = axes[0][1]
        ax2.scatter(selection.candidate_ratios, selection.candidate_sensitivities, s=8, alpha=0.5,
                    label="monotone candidates")
        ax2.scatter([selection.compression_ratio], [selection.sensitivity], s=60, color="red", label="chosen")
        ax2.set_xlabel("compression ratio (vs all 8-bit)")
        ax2.set_ylabel("total sensitivity")
        ax2.set_yscale("symlog")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
