"""A report row over training seeds: the runs that fill it, its value and 95% interval per
column, and its difference from its section's baseline row.

`seed` is a sweep axis like any other override (`python train.py -m +sweeps=table6 ... seed=0,1,2`):
the finished jobs that match one row of a table's layout and differ only in their `seed` are the
row's runs, one per seed. Per score column:
- several runs: the mean of their held-out scores and the 95% Student-t interval of that mean over
  seeds (n - 1 degrees of freedom, `hcm.stats.mean_interval`): how far training randomness moves
  the score. The table writes `mean ± half-width`; the CSV the mean, both ends, each seed's score;
- one run: its score, as before, and in the CSV the Wilson interval of that one score (k right of
  n held-out questions, `hcm.stats.wilson_interval`): how far the sampled questions move it.
A difference from the baseline row is the mean of per-seed differences, paired by seed, with their
t interval when both rows ran the same 2 or more seeds; otherwise the difference of the two rows'
values, without an interval. Every run's own score and Wilson interval go to <table>_runs.csv.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from hcm.curves import log_parts
from hcm.stats import mean_interval, paired_interval, wilson_interval

log = logging.getLogger(__name__)

PREFIX = "test/score/"
SEED = "seed"
CAPTION = (
    "Cells: mean over seeds ± half-width of its 95% Student-t interval (n - 1 degrees of freedom); "
    "a difference in brackets is the mean of per-seed differences from the baseline row, paired "
    "by seed. Seeds: runs per row; a row of one run shows its score alone."
)


@dataclass
class Run:
    """One job's evaluation in a report row: its seed ("" when the sweep set none)."""

    job: Any  # hcm.report.Job
    seed: str
    payload: dict  # the evaluation's metrics.json
    stage: str | None  # that evaluation's stage (None: the job itself)

    @property
    def folder(self) -> Path | None:
        """The evaluation's folder (None: a run read from W&B)."""
        if self.job.folder is None:
            return None
        return self.job.folder if self.stage is None else self.job.folder / "stages" / self.stage

    @cached_property
    def curves(self) -> list[Path] | None:
        """The CSV logs of the GRPO training behind this evaluation: the stage whose model it
        scored and the stage that one continued (`init_ckpt`); None when that model is not a
        GRPO stage's (an SFT row). Without stage.json files (W&B) the job's GRPO logs."""
        marker = self.folder / "stage.json" if self.folder is not None else None
        if marker is None or not marker.is_file():
            return self.job.curves
        scored = Path(json.loads(marker.read_text())["config"]["model"]["name_or_path"]).parent
        logs = []
        while (scored / "stage.json").is_file():
            trained = json.loads((scored / "stage.json").read_text())
            if trained.get("kind") != "grpo":
                break
            logs.append(scored / "csv" / "metrics.csv")
            if not trained.get("init_ckpt"):
                break
            scored = Path(trained["init_ckpt"]).parent.parent  # <stage>/checkpoints/last.ckpt
        return [p for p in logs if log_parts(p)] or None

    def score(self, column: str) -> float | None:
        value = self.payload["metrics"].get(PREFIX + column)
        return None if value is None or math.isnan(value) else float(value)

    def questions(self, column: str) -> float | None:
        """How many held-out samples the column's score is a percentage of."""
        key = "count" if column == "overall" else f"count/{column}"
        return self.payload["metrics"].get(PREFIX + key)

    def wilson(self, column: str) -> tuple[float, float] | None:
        """The Wilson 95% interval of this run's score, in percent."""
        score, n = self.score(column), self.questions(column)
        if score is None or not n:
            return None
        lo, hi = wilson_interval(round(score * n / 100), n)
        return 100 * lo, 100 * hi


def markdown_table(head: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(rows + ["| " + " | ".join(cells) + " |" for cells in lines]) + "\n"


def _without_seed(identity: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in identity.items() if k != SEED}


def _seed_key(run: Run) -> tuple:
    return (not run.seed.isdigit(), int(run.seed) if run.seed.isdigit() else 0, run.seed)


def row_runs(
    done: Sequence[tuple[Any, str | None, dict]], failed: Sequence[Any], name: Any
) -> list[Run]:
    """The runs of one row, in seed order: the first finished job and the finished jobs that
    differ from it only in `seed`, one per seed. Other matching jobs are left out, with a
    warning, as are the seeds whose job left no results."""
    first = _without_seed(done[0][0].identity)
    runs: dict[str, Run] = {}
    for job, stage, payload in done:
        seed = job.identity.get(SEED, "")
        if _without_seed(job.identity) == first and seed not in runs:
            runs[seed] = Run(job, seed, payload, stage)
    if len(runs) < len(done):
        used = [r.job.name for r in runs.values()]
        log.warning("row %s: %d jobs match; using jobs %s", name, len(done), used)
    lost = [j.identity.get(SEED, "") for j in failed if _without_seed(j.identity) == first]
    if lost:
        log.warning("row %s: seed(s) %s left no results; averaging %d", name, lost, len(runs))
    return sorted(runs.values(), key=_seed_key)


def row_values(runs: Sequence[Run], columns: Sequence[str]) -> tuple[dict, dict]:
    """(value, (low, high)) per column: the mean over seeds and its t interval, or one run's
    score (as metrics.json has it) and its Wilson interval."""
    values: dict[str, float | None] = {}
    intervals: dict[str, tuple[float, float]] = {}
    for c in columns:
        if len(runs) == 1:
            values[c] = runs[0].payload["metrics"].get(PREFIX + c)
            if (wilson := runs[0].wilson(c)) is not None:
                intervals[c] = wilson
            continue
        scores = [s for r in runs if (s := r.score(c)) is not None]
        if len(scores) >= 2:
            values[c], *bounds = mean_interval(scores)
            intervals[c] = (bounds[0], bounds[1])
        else:
            values[c] = scores[0] if scores else None
    return values, intervals


def paired_delta(runs: Sequence[Run], base: Sequence[Run], column: str) -> tuple | None:
    """(mean of per-seed differences, low, high) when both rows hold scores of the same 2 or
    more seeds; None otherwise."""
    mine = {r.seed: s for r in runs if (s := r.score(column)) is not None}
    theirs = {r.seed: s for r in base if (s := r.score(column)) is not None}
    if len(mine) < 2 or mine.keys() != theirs.keys():
        return None
    return paired_interval([mine[s] for s in mine], [theirs[s] for s in mine])


def plus_minus(value: float, interval: tuple[float, float], decimals: int, sign: str = "") -> str:
    """A value and the half-width of its (symmetric) interval.

    >>> plus_minus(46.0, (41.0317, 50.9683), 2), plus_minus(6.0, (3.5159, 8.4841), 2, "+")
    ('46.00 ± 4.97', '+6.00 ± 2.48')
    """
    return f"{value:{sign}.{decimals}f} ± {(interval[1] - interval[0]) / 2:.{decimals}f}"


def cell(row: Any, column: str, decimals: int) -> str:
    """A table cell: the value, `± half-width` over seeds, and "(+delta)" from the baseline."""
    if row.status in ("missing", "failed"):
        return row.status
    value = row.values.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{value:.{decimals}f}"
    if len(row.runs) > 1 and column in row.intervals:  # a single run's Wilson: in the CSV only
        text = plus_minus(value, row.intervals[column], decimals)
    delta = row.deltas.get(column)
    if delta is not None and column in row.delta_intervals:
        return f"{text} ({plus_minus(delta, row.delta_intervals[column], decimals, '+')})"
    return text + (f" ({delta:+.{decimals}f})" if delta is not None else "")


# -- CSV -----------------------------------------------------------------------------------------
def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def interval_header(columns: Sequence[str]) -> list[str]:
    """The CSV columns a table with intervals adds before `status` and `job`."""
    header = []
    for c in columns:
        header += [f"{c}_lo", f"{c}_hi", f"{c}_delta_lo", f"{c}_delta_hi", f"{c}_per_seed"]
    return [*header, "n_seeds", "seeds", "interval"]


def interval_fields(row: Any, columns: Sequence[str]) -> list[str]:
    """A row's interval columns: each seed's score joined by ";" in the `seeds` order; the
    interval is "t" over several seeds, "wilson" for one run."""
    fields = []
    for c in columns:
        lo, hi = row.intervals.get(c, (None, None))
        dlo, dhi = row.delta_intervals.get(c, (None, None))
        per_seed = ";".join(_num(r.score(c)) for r in row.runs)
        fields += [_num(lo), _num(hi), _num(dlo), _num(dhi), per_seed]
    kind = "t" if len(row.runs) > 1 else "wilson" if row.runs else ""
    return [*fields, str(len(row.runs)), ";".join(r.seed for r in row.runs), kind]


def table_csv(spec: dict, rows: Sequence[Any]) -> str:
    """<table>.csv: a line per row with each column's value and difference from the baseline;
    once some row has an interval, also its ends, the difference's, and the per-seed scores."""
    columns = list(spec["columns"])
    out = io.StringIO()
    writer = csv.writer(out)
    header = [*spec["label_columns"]]
    for c in columns:
        header += [c, f"{c}_delta"]
    spread = any(r.intervals for r in rows)  # without any, the columns of before
    writer.writerow([*header, *(interval_header(columns) if spread else []), "status", "job"])
    for row in rows:
        if row.status == "section":
            continue
        values = []
        for c in columns:
            values += [_num(row.values.get(c)), _num(row.deltas.get(c))]
        values += interval_fields(row, columns) if spread else []
        writer.writerow([*row.labels, *values, row.status, row.job])
    return out.getvalue()


def runs_csv(spec: dict, rows: Sequence[Any]) -> str:
    """<table>_runs.csv: one line per run of every row, with each column's score, the number of
    held-out questions it is a percentage of, and its Wilson 95% interval."""
    columns = list(spec["columns"])
    out = io.StringIO()
    writer = csv.writer(out)
    header = [*spec["label_columns"], "seed", "job", "stage"]
    for c in columns:
        header += [c, f"{c}_n", f"{c}_lo", f"{c}_hi"]
    writer.writerow(header)
    for row in rows:
        for run in row.runs:
            fields = []
            for c in columns:
                lo, hi = run.wilson(c) or (None, None)
                n = run.questions(c)
                fields += [_num(run.score(c)), "" if n is None else str(int(n)), _num(lo), _num(hi)]
            writer.writerow([*row.labels, run.seed, run.job.name, run.stage or "", *fields])
    return out.getvalue()
