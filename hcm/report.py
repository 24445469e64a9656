"""A paper table from a finished sweep: `python -m hcm.report <multirun dir or W&B group>`.

Each sweep (sweeps/<table>.yaml) carries its table's layout under `report:`: the label and score
columns, and one entry per paper row saying which job fills it (`match`: the job's config-group
choices or command-line overrides, e.g. {experiment: hcm_2b} or {data.composition: all}) and, for
a pipeline with several evaluations, which eval stage (`stage`, default: the only one). Scores are
read from the `metrics.json` that evaluation writes in each job, never from logs. A row whose job
is absent says "missing"; a job without results (crashed, or still running) says "failed".

Seeds (`seed=0,1,2` on the command line): jobs that match one row and differ only in `seed` are
averaged, `mean ± half-width` of the 95% t interval, differences paired by seed (hcm.aggregate).

Written beside the table (default: into the multirun folder): <table>.md (then hcm.science's
sections), <table>.csv, <table>_runs.csv (each run's score and Wilson interval), <table>_scores.png
(scores per seed, reward per epoch) and, when the jobs logged GRPO curves (CSV logger),
<table>_curves.png with every run's reward and KL.
`--wandb` also logs the table (and the figure) to W&B; a W&B group instead of a folder reads the
eval runs of that group (tagged by the sweep) with the layout from sweeps/<group>.yaml.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from hcm import science
from hcm.aggregate import (
    CAPTION,
    PREFIX,
    Run,
    cell,
    markdown_table,
    paired_delta,
    row_runs,
    row_values,
    runs_csv,
    table_csv,
)
from hcm.config import wandb_offline
from hcm.curves import Panel, draw, log_parts, read_curve
from hcm.data.hard_cases import HardCaseSet

log = logging.getLogger(__name__)

SWEEPS_DIR = Path(__file__).resolve().parents[1] / "sweeps"
CURVES = (("train/reward/total", "reward"), ("train/kl", "KL"))


@dataclass
class Job:
    """One sweep job: what it was (config choices and overrides) and what it produced."""

    name: str
    identity: dict[str, str]
    evals: dict[str | None, dict]  # eval stage name (None: the job itself) -> metrics.json
    counts: dict[str, int] = field(default_factory=dict)  # hard/easy/all from mining
    curves: list[Path] | None = None  # the CSV logs of its GRPO stages
    folder: Path | None = None  # the job's folder (None: read from W&B)


@dataclass
class Row:
    labels: list[str]
    values: dict[str, float | None]
    deltas: dict[str, float | None]
    status: str  # ok | missing | failed | section
    job: str = ""  # the jobs filling it, ";"-joined
    runs: list[Run] = field(default_factory=list)  # one per seed
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    delta_intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    base: Row | None = None  # the baseline row its deltas are from


# -- reading a multirun folder ------------------------------------------------------------------
def _override_items(overrides: Iterable[str]) -> dict[str, str]:
    items = {}
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep:
            items[key.lstrip("+~")] = value
    return items


def _header(path: Path) -> str:
    with path.open() as f:
        return f.readline()


def read_job(job_dir: Path) -> Job:
    hydra = OmegaConf.load(job_dir / ".hydra" / "hydra.yaml").hydra
    identity = {k: str(v) for k, v in (hydra.runtime.choices or {}).items() if v is not None}
    identity.update(_override_items(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")))
    evals: dict[str | None, dict] = {}
    if (job_dir / "metrics.json").is_file():
        evals[None] = json.loads((job_dir / "metrics.json").read_text())
    counts: dict[str, int] = {}
    curves: list[Path] = []
    for stage in sorted(p for p in (job_dir / "stages").glob("*") if p.is_dir()):
        if (stage / "metrics.json").is_file():
            evals[stage.name] = json.loads((stage / "metrics.json").read_text())
        if (stage / "hard_cases.json").is_file() and not counts:
            cases = HardCaseSet.load(stage / "hard_cases.json")
            hard, easy = len(cases.hard_ids), len(cases.easy_ids)
            counts = {"hard": hard, "easy": easy, "all": hard + easy}
        log_csv = stage / "csv" / "metrics.csv"
        if any(CURVES[0][0] in _header(part) for part in log_parts(log_csv)):
            curves.append(log_csv)
    return Job(job_dir.name, identity, evals, counts, curves or None, job_dir)


def read_multirun(folder: Path) -> tuple[dict, str, list[Job]]:
    """(the table layout, the sweep's name, its jobs in job order)."""
    multirun = folder / "multirun.yaml"
    if not multirun.is_file():
        raise FileNotFoundError(f"{folder} is no Hydra multirun folder (no multirun.yaml)")
    cfg = OmegaConf.load(multirun)
    if "report" not in cfg:
        raise ValueError(f"{multirun} has no `report:` layout: was the sweep one of sweeps/?")
    spec = OmegaConf.to_container(cfg.report, resolve=False)
    dirs = [p for p in folder.iterdir() if (p / ".hydra" / "hydra.yaml").is_file()]
    jobs = [read_job(p) for p in sorted(dirs, key=lambda p: (len(p.name), p.name))]
    return spec, str(cfg.get("task_name", folder.name)), jobs


def read_multiruns(folders: Sequence[Path]) -> tuple[dict, str, list[Job]]:
    """`read_multirun` over the parts of one sweep run in several multiruns (a sweep split by
    seeds across sessions): one layout, the jobs of all parts."""
    parts = [read_multirun(f) for f in folders]
    spec, name, _ = parts[0]
    for folder, (other, other_name, _) in zip(folders, parts, strict=True):
        if (other, other_name) != (spec, name):
            raise ValueError(f"{folder} is another sweep than {folders[0]} ({other_name})")
    return spec, name, [job for *_, jobs in parts for job in jobs]


# -- building the table ----------------------------------------------------------------------------
def matches(job: Job, match: dict) -> bool:
    return all(job.identity.get(k) == str(v) for k, v in match.items())


def eval_of(job: Job, stage: str | None) -> tuple[str | None, dict] | None:
    """(stage, metrics.json) of a job's evaluation: `stage`, else the job's own or its only one."""
    if stage is None and None not in job.evals:  # not the job's own: its "eval" or its only one
        if "eval" in job.evals:
            stage = "eval"
        elif len(job.evals) == 1:
            stage = next(iter(job.evals))
    return (stage, job.evals[stage]) if stage in job.evals else None


def _random_values(columns: Sequence[str], jobs: Sequence[Job]) -> dict[str, float | None]:
    """The random-guess expectation (section 5.1) that each screening evaluation reports."""
    for job in jobs:
        for payload in job.evals.values():
            m = payload["metrics"]
            if PREFIX + "random_baseline" in m:
                keys = {c: "random_baseline" + ("" if c == "overall" else "/" + c) for c in columns}
                return {c: m.get(PREFIX + k) for c, k in keys.items()}
    return dict.fromkeys(columns)


COUNTED = ("hard", "easy", "all")  # mining's counts, the "{hard}" placeholders of row labels


def count_label(values: Sequence[int]) -> str:
    """A mining count over a row's seeds: the number when they agree, else the mean and range.

    >>> count_label([417]), count_label([417, 297, 97]), count_label([])
    ('417', '270 (97-417)', '?')
    """
    if not values:
        return "?"
    if len(set(values)) == 1:
        return str(values[0])
    return f"{sum(values) / len(values):.0f} ({min(values)}-{max(values)})"


def fill_row(entry: dict, columns: Sequence[str], jobs: Sequence[Job], fallback: dict) -> Row:
    """One paper row from the first matching job that finished and its other seeds; "{hard}"-
    style placeholders in its labels take that job's mining counts (or another's, if none)."""
    labels = [str(x) for x in entry.get("labels", [])]
    if entry.get("random"):
        return Row(labels, _random_values(columns, jobs), {}, "ok")
    found = [j for j in jobs if matches(j, entry["match"])]
    done = [(j, *e) for j in found if (e := eval_of(j, entry.get("stage"))) is not None]
    runs, intervals = [], {}
    if done:
        failed = [j for j in found if all(j is not d for d, _, _ in done)]
        runs = row_runs(done, failed, labels)
        job, status = runs[0].job, "ok"
        values, intervals = row_values(runs, columns)
    else:
        job, status = (found[0] if found else None), ("failed" if found else "missing")
        values = dict.fromkeys(columns)
    per_seed = [r.job.counts for r in runs if r.job.counts]
    if not per_seed:
        per_seed = [(job.counts if job is not None else {}) or fallback]
    placeholders = {k: count_label([c[k] for c in per_seed if k in c]) for k in COUNTED}
    labels = [label.format(**placeholders) for label in labels]
    names = ";".join(r.job.name for r in runs) or (job.name if job is not None else "")
    return Row(labels, values, {}, status, names, runs, intervals)


def add_deltas(rows: Sequence[Row], sections: Sequence[int], baselines: dict, columns, spec):
    """ "(+x.xx)" to the section's baseline row, as the paper writes its ablations; over the
    same seeds, the mean of per-seed differences and its interval."""
    for row, section in zip(rows, sections, strict=True):
        base = baselines.get(section)
        if row.status != "ok" or base is None or base.status != "ok":
            continue
        if row is base and not spec.get("baseline_delta"):
            continue
        row.base = base
        row.deltas = {
            c: row.values[c] - base.values[c]
            if row.values.get(c) is not None and base.values.get(c) is not None
            else None
            for c in columns
        }
        for c in columns:
            if (paired := paired_delta(row.runs, base.runs, c)) is not None:
                row.deltas[c], row.delta_intervals[c] = paired[0], paired[1:]


def build_rows(spec: dict, jobs: Sequence[Job]) -> list[Row]:
    """The table's rows in the paper's order. A `section` entry starts a section; without any,
    each baseline row starts one (Tables 5, 6, 8-10 list 1B then 2B)."""
    columns = list(spec["columns"])
    fallback = next((j.counts for j in jobs if j.counts), {})
    explicit_sections = any("section" in r for r in spec["rows"])
    rows: list[Row] = []
    sections: list[int] = []
    baselines: dict[int, Row] = {}
    section = 0
    for entry in spec["rows"]:
        if "section" in entry or (entry.get("baseline") and not explicit_sections):
            section += 1
        row = (
            Row([entry["section"]], {}, {}, "section")
            if "section" in entry
            else fill_row(entry, columns, jobs, fallback)
        )
        if entry.get("baseline"):
            baselines[section] = row
        rows.append(row)
        sections.append(section)
    if spec.get("delta"):
        add_deltas(rows, sections, baselines, columns, spec)
    return rows


def to_markdown(spec: dict, rows: Sequence[Row]) -> str:
    columns, decimals = spec["columns"], int(spec.get("decimals", 2))
    seeded = any(len(r.runs) > 1 for r in rows)
    head = [*spec["label_columns"], *columns.values(), *(["Seeds"] if seeded else [])]
    lines = []
    for row in rows:
        if row.status == "section":
            cells = [f"*{row.labels[0]}*"] + [""] * (len(head) - 1)
        else:
            cells = [*row.labels, *(cell(row, c, decimals) for c in columns)]
            cells += [str(len(row.runs) or "-")] if seeded else []
        lines.append(cells)
    table = f"**{spec['title']}**\n\n" + markdown_table(head, lines)
    return table + (f"\n{CAPTION}\n" if seeded else "")


# -- curves ----------------------------------------------------------------------------------------
def row_names(spec: dict, rows: Sequence[Row]) -> list[str]:
    """Each row's name on a figure: a "+GRPO"-style label after its model's (alone it is
    ambiguous); other labels as they are."""
    names, group = [], ""
    for row, entry in zip(rows, spec["rows"], strict=True):
        if row.status == "section" or entry.get("baseline"):
            group = row.labels[0]
        label = " ".join(x for x in row.labels if x)
        prefixed = label.startswith("+") and row.labels[0] != group
        names.append(f"{group} {label}".strip() if prefixed else label)
    return names


def plot_curves(spec: dict, rows: Sequence[Row], path: Path) -> Path | None:
    """Reward and KL of the table's GRPO runs on one figure; None when there is none."""
    runs = [
        (name + (f" seed {run.seed}" if len(row.runs) > 1 else ""), run.curves)
        for name, row in zip(row_names(spec, rows), rows, strict=True)
        for run in row.runs
        if run.curves is not None
    ]
    panels = [
        Panel(f"{title} ({key})", "step", [(lb, *read_curve(log, key)) for lb, log in runs])
        for key, title in CURVES
    ]
    return draw(panels, path, spec["title"])


# -- W&B -------------------------------------------------------------------------------------------
def _sweep_report(name: str, folder: Path):
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no sweep {path}")
    cfg = OmegaConf.load(path)
    merged = OmegaConf.create()
    for parent in cfg.get("defaults", []):
        if isinstance(parent, str) and parent != "_self_":
            merged = OmegaConf.merge(merged, _sweep_report(parent, folder))
    if "report" in cfg:
        merged = OmegaConf.merge(merged, {"report": cfg.report})
    return merged


def load_sweep_spec(name: str, folder: Path = SWEEPS_DIR) -> dict:
    """The `report:` layout of sweeps/<name>.yaml, following its `defaults` within sweeps/."""
    merged = _sweep_report(name, folder)
    if "report" not in merged:
        raise ValueError(f"{folder / name}.yaml has no `report:` layout")
    return OmegaConf.to_container(merged.report, resolve=False)


def jobs_from_runs(runs: Iterable[Any]) -> list[Job]:
    """Jobs from W&B eval runs: identity from the sweep's "key=value" tags, the eval stage from
    the run name ("<sweep>/<stage>"), scores from the run summary."""
    jobs: dict[tuple, Job] = {}
    for run in runs:
        if getattr(run, "job_type", "eval") != "eval":
            continue
        identity = _override_items(run.tags)
        key = tuple(sorted(identity.items()))
        job = jobs.setdefault(key, Job(run.id, identity, {}))
        stage = run.name.rsplit("/", 1)[1] if "/" in run.name else None
        metrics = {k: v for k, v in dict(run.summary).items() if k.startswith(PREFIX)}
        if metrics:
            job.evals[stage] = {"metrics": metrics}
    return list(jobs.values())


def read_wandb_group(group: str, project: str, entity: str | None) -> list[Job]:
    import wandb  # optional heavy dependency: only a report read from W&B needs it

    path = f"{entity}/{project}" if entity else project
    return jobs_from_runs(wandb.Api().runs(path, filters={"group": group}))


def log_to_wandb(spec: dict, rows: Sequence[Row], name: str, project: str, image: Path | None):
    import wandb  # optional heavy dependency: only a W&B upload needs it

    columns = list(spec["columns"])
    table = wandb.Table(columns=[*spec["label_columns"], *spec["columns"].values(), "status"])
    for row in rows:
        if row.status != "section":
            decimals = int(spec.get("decimals", 2))
            table.add_data(*row.labels, *(cell(row, c, decimals) for c in columns), row.status)
    run = wandb.init(
        project=project,
        group=name,
        job_type="report",
        name=f"{name}/report",
        mode="offline" if wandb_offline() else "online",
    )
    try:
        payload = {"report/table": table}
        if image is not None:
            payload["report/curves"] = wandb.Image(str(image))
        run.log(payload)
    finally:
        wandb.finish()


# -- entry point -----------------------------------------------------------------------------------
def report(
    source: str | Sequence[str],
    out: str | None = None,
    sweep: str | None = None,
    wandb_log: bool = False,
    project: str = "hcm",
    entity: str | None = None,
) -> str:
    """Write <name>.md/.csv (and the curves) and return the Markdown table. `source`: one or
    more multirun folders of one sweep (its parts, e.g. split by seeds), or a W&B group."""
    sources = [source] if isinstance(source, str) else list(source)
    folders = [Path(s) for s in sources]
    if all(f.is_dir() for f in folders):
        spec, name, jobs = read_multiruns(folders)
        out_dir = Path(out) if out else folders[0]
    else:
        (source,) = sources  # a W&B group: one
        name = sweep or source
        spec, jobs = load_sweep_spec(name), read_wandb_group(source, project, entity)
        out_dir = Path(out) if out else Path.cwd()
    rows = build_rows(spec, jobs)
    names = row_names(spec, rows)
    markdown = to_markdown(spec, rows) + science.sections(spec, rows, names)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text(markdown)
    (out_dir / f"{name}.csv").write_text(table_csv(spec, rows))
    if any(row.runs for row in rows):
        (out_dir / f"{name}_runs.csv").write_text(runs_csv(spec, rows))
    random = _random_values(list(spec["columns"]), jobs)
    science.plot_scores(spec, rows, names, random, out_dir / f"{name}_scores.png")
    image = plot_curves(spec, rows, out_dir / f"{name}_curves.png")
    if wandb_log:
        log_to_wandb(spec, rows, name, project, image)
    return markdown


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hcm.report",
        description="Collect a finished sweep's metrics.json files into its paper table "
        "(Markdown and CSV, plus reward/KL curves) beside them.",
    )
    parser.add_argument(
        "source",
        nargs="+",
        help="a multirun folder (outputs/multirun/<table>/<date>), several parts of one sweep "
        "(e.g. its seeds run in different sessions), or a W&B group",
    )
    parser.add_argument(
        "--out", help="where to write the table (default: the (first) multirun folder, or .)"
    )
    parser.add_argument(
        "--sweep", help="W&B source: the sweeps/<name>.yaml layout (default: the group)"
    )
    parser.add_argument("--wandb", action="store_true", help="also log the table to W&B")
    parser.add_argument("--project", default="hcm", help="W&B project (default: hcm)")
    parser.add_argument("--entity", default=None, help="W&B entity (default: yours)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(report(args.source, args.out, args.sweep, args.wandb, args.project, args.entity))


if __name__ == "__main__":
    main()
