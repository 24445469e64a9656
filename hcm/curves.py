"""Training curves from the CSV logger's `metrics.csv`, drawn as one PNG of panels.

Used by the sweep report (every run's GRPO reward and KL) and by a pipeline's summary (SFT loss,
GRPO reward and KL, held-out score per epoch). A panel without data is left out; without
matplotlib (`pip install matplotlib`) there is no figure, with a warning.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


def read_curve(path: Path, key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x values, `key` values) of the rows of a metrics.csv that log `key`."""
    xs, values = [], []
    with Path(path).open() as f:
        for record in csv.DictReader(f):
            if record.get(key) not in (None, ""):
                xs.append(float(record.get(x) or len(xs)))
                values.append(float(record[key]))
    return xs, values


@dataclass
class Panel:
    title: str
    xlabel: str
    series: list[tuple[str, list[float], list[float]]] = field(default_factory=list)  # label, x, y
    hline: tuple[str, float] | None = None  # (label, y): a reference level, e.g. random guessing


def draw(panels: Sequence[Panel], path: Path, title: str) -> Path | None:
    """The panels that hold data, two a row, saved to `path`; None when nothing was drawn."""
    panels = [p for p in panels if any(y for _, _, y in p.series)]
    if not panels:
        return None
    try:  # optional dependency: without matplotlib, no curves
        import matplotlib

        matplotlib.use("Agg")  # no display needed: a file only
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no curves (pip install matplotlib)")
        return None
    cols = min(2, len(panels))  # two panels a row: readable at a page's width
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.remove()
    for ax, panel in zip(axes.flat, panels, strict=False):
        for label, xs, ys in panel.series:
            if ys:
                ax.plot(xs, ys, marker="." if len(ys) < 20 else None, label=label)
        if panel.hline is not None:
            ax.axhline(panel.hline[1], color="grey", linestyle="--", label=panel.hline[0])
        ax.set_title(panel.title)
        ax.set_xlabel(panel.xlabel)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
