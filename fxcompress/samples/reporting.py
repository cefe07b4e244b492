"""What a sample run reports and writes: console lines, progress bars, the per-epoch compression
statistics, a CSV log, TensorBoard scalars (when installed), checkpoints and the final plot.

Only rank 0 prints or writes; the other ranks get a RunLog that does nothing but iterate.
"""
from __future__ import annotations

import csv
import json
import pathlib
import sys

import torch
from tqdm import tqdm


def _tensorboard_writer(log_dir: pathlib.Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the tensorboard package is optional
        return None
    return SummaryWriter(str(log_dir))


def summary_table(statistics) -> str:
    """One line per algorithm with its summary values (current level, target, ...): what changes
    from epoch to epoch. The full per-layer tables are written to the log directory."""
    lines = []
    for algorithm, section in statistics.to_dict().items():
        values = {k: v for k, v in section.items() if k not in ("layers", "skipped")}
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        lines.append(f"  {algorithm:<20} {shown}")
    return "\n".join(lines)


class RunLog:
    """Console and files of one run; ``log_dir`` None writes no files (test, export)."""

    def __init__(self, log_dir: pathlib.Path | None, main: bool = True):
        self.main = main
        self.log_dir = pathlib.Path(log_dir) if (log_dir is not None and main) else None
        self.writer = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.writer = _tensorboard_writer(self.log_dir)

    def line(self, text: str):
        if self.main:
            print(text, flush=True)

    def progress(self, iterable, description: str):
        # Bars only on a terminal and only on rank 0: logs redirected to files stay readable.
        return tqdm(iterable, desc=description, leave=False, dynamic_ncols=True,
                    disable=not (self.main and sys.stderr.isatty()))

    def epoch(self, row: dict, statistics, metric_name: str, epochs: int):
        if not self.main:
            return
        levels = "".join(f", {k} {v:.3f}" for k, v in row.items() if k.endswith("_level"))
        self.line(f"epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f}, {metric_name} {row['metric']:.4f}, "
                  f"lr {row['lr']:.3g}{levels} ({row['seconds']:.1f} s)")
        table = summary_table(statistics)
        if table:  # nothing for a run without compression (fp32 training)
            self.line(table)
        if self.log_dir is None:
            return
        (self.log_dir / "statistics.txt").write_text(f"after epoch {row['epoch']}\n{statistics}\n")
        self._append_csv(row)
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch":
                    self.writer.add_scalar(key if key != "metric" else metric_name, value, row["epoch"])
            self.writer.flush()

    def _append_csv(self, row: dict):
        path = self.log_dir / "log.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def checkpoint(self, state: dict, is_best: bool):
        if self.log_dir is None:
            return
        # Written to a temporary name first, so an interrupted save never leaves a broken last.pth.
        temporary = self.log_dir / "last.pth.tmp"
        torch.save(state, temporary)
        temporary.replace(self.log_dir / "last.pth")
        if is_best:
            torch.save(state, self.log_dir / "best.pth")

    def finish(self, result: dict, history: list[dict]):
        if not self.main:
            return
        name = result["metric_name"]
        self.line(f"final {name}: {result['metric']:.4f} (fp32 {result['fp32_metric']:.4f}, "
                  f"change {result['metric'] - result['fp32_metric']:+.4f})")
        if self.log_dir is None:
            return
        (self.log_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        if history:
            plot_history(history, name, result["fp32_metric"], self.log_dir / "history.png")
        if self.writer is not None:
            self.writer.close()
        self.line(f"log, checkpoints and plot in {self.log_dir}")


def plot_history(history: list[dict], metric_name: str, fp32_metric: float, path: pathlib.Path):
    """The metric and every compression level per epoch (matplotlib, when installed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    figure = Figure(figsize=(7, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    epochs = [row["epoch"] for row in history]
    axes.plot(epochs, [row["metric"] for row in history], marker="o", color="tab:blue", label=metric_name)
    axes.axhline(fp32_metric, color="tab:green", linestyle="--", label=f"fp32 {metric_name}")
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(metric_name)
    level_keys = [k for k in history[-1] if k.endswith("_level")]
    if level_keys:
        levels = axes.twinx()
        for key in level_keys:
            levels.plot(epochs, [row.get(key, 0.0) for row in history], marker="s", linestyle=":", label=key)
        levels.set_ylabel("compression level")
        levels.set_ylim(0, 1)
        levels.legend(loc="lower right", fontsize="small")
    axes.legend(loc="lower left", fontsize="small")
    axes.set_title(f"{metric_name} and compression level per epoch")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path
