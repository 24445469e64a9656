"""Training curves from the CSV logger's `metrics.csv`, drawn as one PNG of panels.

Used by the sweep report (every run's GRPO reward and KL; each row's score per seed with its mean
and interval, and its reward per epoch) and by a pipeline's summary (SFT loss, GRPO reward and KL,
held-out score per epoch). A panel without data is left out; without
matplotlib (`pip install matplotlib`) there is no figure, with a warning.

A stage's log is `<stage>/csv/metrics.csv` and the parts earlier runs of the stage left beside it
(hcm.runtime.keep_csv renames the file at each resume): every reader goes through `read_log`,
which joins them.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# metrics-<time>[-n].csv: the time the part was last written, n counting parts kept in one second
KEPT_PART = re.compile(r"metrics-(\d{8}-\d{6})(?:-(\d+))?\.csv")


def log_parts(log: Path) -> list[Path]:
    """The files of one stage's CSV log (its `csv/metrics.csv`) in the order they were written:
    the parts kept at each resume, oldest first, then metrics.csv; [] when there is no log."""
    log = Path(log)
    kept = []
    for path in log.parent.glob("metrics-*.csv"):
        if match := KEPT_PART.fullmatch(path.name):
            kept.append((match.group(1), int(match.group(2) or 0), path))
    return [path for *_, path in sorted(kept)] + ([log] if log.is_file() else [])


def read_log(log: Path) -> list[dict[str, str]]:
    """The rows of one stage's CSV log over all its parts, in order. A resumed run redoes the
    steps since its checkpoint and logs them again: from a part's first step on, its rows
    replace the earlier parts' (the later part wins)."""
    rows: list[dict[str, str]] = []
    for part in log_parts(log):
        with part.open() as f:
            new = list(csv.DictReader(f))
        steps = [float(r["step"]) for r in new if r.get("step")]
        if steps:
            first = min(steps)
            rows = [r for r in rows if not r.get("step") or float(r["step"]) < first]
        rows += new
    return rows


def read_points(
    logs: Path | Sequence[Path], key: str, columns: Sequence[str]
) -> list[tuple[float, ...]]:
    """(the `columns`' values..., `key`'s value) of the rows that log `key`, over one stage's log
    or several (a GRPO run in two pipeline stages: the epochs before the switch, then the rest),
    in the first column's order. A row without the first column counts rows instead; without
    another column, that value is nan."""
    points: list[tuple[float, ...]] = []
    for path in [logs] if isinstance(logs, str | Path) else logs:
        for record in read_log(Path(path)):
            if record.get(key) not in (None, ""):
                first = float(record.get(columns[0]) or len(points))
                rest = (float(record.get(c) or "nan") for c in columns[1:])
                points.append((first, *rest, float(record[key])))
    points.sort(key=lambda p: p[0])  # stable: rows of one x keep their order
    return points


def read_curve(
    logs: Path | Sequence[Path], key: str, x: str = "step"
) -> tuple[list[float], list[float]]:
    """(x values, `key` values) of the rows that log `key`, in x order (see `read_points`)."""
    points = read_points(logs, key, (x,))
    return [p[0] for p in points], [p[1] for p in points]


def per_epoch(epochs: Sequence[float], values: Sequence[float]) -> dict[int, float]:
    """The mean of the values logged in each epoch.

    >>> per_epoch([0, 0, 1, 1, 1], [0.25, 0.75, 1.0, 0.5, 0.0])
    {0: 0.5, 1: 0.5}
    """
    sums: dict[int, list[float]] = {}
    for e, v in zip(epochs, values, strict=True):
        sums.setdefault(int(e), []).append(v)
    return {e: sum(vs) / len(vs) for e, vs in sums.items()}


@dataclass
class Panel:
    title: str
    xlabel: str
    series: list[tuple[str, list[float], list[float]]] = field(default_factory=list)  # label, x, y
    hline: tuple[str, float] | None = None  # (label, y): a reference level, e.g. random guessing
    # drawn bold over the series of the same label (those then faint), e.g. per-epoch means
    trends: list[tuple[str, list[float], list[float]]] = field(default_factory=list)
    vline: tuple[str, float] | None = None  # (label, x): a moment of training, e.g. a switch


@dataclass
class Points:
    """A value per run in each category (dots), and the category's mean with its interval
    (an error bar): e.g. a table row's held-out score per seed."""

    title: str
    ylabel: str
    names: list[str]
    values: list[list[float]]
    means: list[float | None]
    intervals: list[tuple[float, float] | None]
    hline: tuple[str, float] | None = None

    @property
    def series(self) -> list[tuple[str, list[float], list[float]]]:
        return [(n, [], v) for n, v in zip(self.names, self.values, strict=True)]


def _points(ax, panel: Points) -> None:
    for i, (values, mean, interval) in enumerate(
        zip(panel.values, panel.means, panel.intervals, strict=True)
    ):
        spread = [i + 0.08 * (k - (len(values) - 1) / 2) for k in range(len(values))]
        ax.plot(spread, values, "o", color="tab:blue", alpha=0.6, label="run" if i == 0 else None)
        if mean is not None and interval is not None:
            err = [[mean - interval[0]], [interval[1] - mean]]
            ax.errorbar([i], [mean], yerr=err, fmt="_", color="black", capsize=6, markersize=14)
    ax.set_xticks(range(len(panel.names)), panel.names, rotation=30, ha="right", fontsize="small")
    ax.set_ylabel(panel.ylabel)


def _lines(ax, panel: Panel) -> None:
    trends = {label: (xs, ys) for label, xs, ys in panel.trends if ys}
    for label, xs, ys in panel.series:
        if not ys:
            continue
        faint = {"alpha": 0.35, "linewidth": 0.8} if label in trends else {}
        (line,) = ax.plot(xs, ys, marker="." if len(ys) < 20 else None, label=label, **faint)
        if label in trends:  # the same colour: the trend belongs to this series
            tx, ty = trends[label]
            ax.plot(tx, ty, "o-", color=line.get_color(), linewidth=2, label=f"{label}, epoch mean")
    if panel.vline is not None:
        ax.axvline(panel.vline[1], color="black", linestyle=":", label=panel.vline[0])
    ax.set_xlabel(panel.xlabel)


def draw(panels: Sequence[Panel | Points], path: Path, title: str) -> Path | None:
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
        if isinstance(panel, Points):
            _points(ax, panel)
        else:
            _lines(ax, panel)
        if panel.hline is not None:
            ax.axhline(panel.hline[1], color="grey", linestyle="--", label=panel.hline[0])
        ax.set_title(panel.title)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
