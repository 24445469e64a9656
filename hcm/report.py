"""A paper table from a finished sweep: `python -m hcm.report <multirun dir or W&B group>`.

Each sweep (sweeps/<table>.yaml) carries its table's layout under `report:`: the label and score
columns, and one entry per paper row saying which job fills it (`match`: the job's config-group
choices or command-line overrides, e.g. {experiment: hcm_2b} or {data.composition: all}) and, for
a pipeline with several evaluations, which eval stage (`stage`, default: the only one). Scores are
read from the `metrics.json` that evaluation writes in each job, never from logs. A row whose job
is absent says "missing"; a job without results (crashed, or still running) says "failed".

Written beside the table (default: into the multirun folder): <table>.md, <table>.csv and, when
the jobs logged GRPO curves (CSV logger), <table>_curves.png with every run's reward and KL.
`--wandb` also logs the table (and the figure) to W&B; a W&B group instead of a folder reads the
eval runs of that group (tagged by the sweep) with the layout from sweeps/<group>.yaml.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from hcm.curves import Panel, draw, read_curve
from hcm.data.hard_cases import HardCaseSet

log = logging.getLogger(__name__)

PREFIX = "test/score/"
SWEEPS_DIR = Path(__file__).resolve().parents[1] / "sweeps"
CURVES = (("train/reward/total", "reward"), ("train/kl", "KL"))


@dataclass
class Job:
    """One sweep job: what it was (config choices and overrides) and what it produced."""

    name: str
    identity: dict[str, str]
    evals: dict[str | None, dict]  # eval stage name (None: the job itself) -> metrics.json
    counts: dict[str, int] = field(default_factory=dict)  # hard/easy/all from mining
    curves: Path | None = None  # a GRPO stage's CSV log


@dataclass
class Row:
    labels: list[str]
    values: dict[str, float | None]
    deltas: dict[str, float | None]
    status: str  # ok | missing | failed | section
    job: str = ""


# -- reading a multirun folder ------------------------------------------------------------------
def _override_items(overrides: Iterable[str]) -> dict[str, str]:
    items = {}
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep:
            items[key.lstrip("+~")] = value
    return items


def read_job(job_dir: Path) -> Job:
    hydra = OmegaConf.load(job_dir / ".hydra" / "hydra.yaml").hydra
    identity = {k: str(v) for k, v in (hydra.runtime.choices or {}).items() if v is not None}
    identity.update(_override_items(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")))
    evals: dict[str | None, dict] = {}
    if (job_dir / "metrics.json").is_file():
        evals[None] = json.loads((job_dir / "metrics.json").read_text())
    counts: dict[str, int] = {}
    curves = None
    for stage in sorted(p for p in (job_dir / "stages").glob("*") if p.is_dir()):
        if (stage / "metrics.json").is_file():
            evals[stage.name] = json.loads((stage / "metrics.json").read_text())
        if (stage / "hard_cases.json").is_file() and not counts:
            cases = HardCaseSet.load(stage / "hard_cases.json")
            hard, easy = len(cases.hard_ids), len(cases.easy_ids)
            counts = {"hard": hard, "easy": easy, "all": hard + easy}
        log_csv = stage / "csv" / "metrics.csv"
        if curves is None and log_csv.is_file() and CURVES[0][0] in log_csv.open().readline():
            curves = log_csv
    return Job(job_dir.name, identity, evals, counts, curves)


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


# -- building the table ----------------------------------------------------------------------------
def matches(job: Job, match: dict) -> bool:
    return all(job.identity.get(k) == str(v) for k, v in match.items())


def eval_of(job: Job, stage: str | None) -> dict | None:
    """The metrics.json of a job's evaluation: `stage`, else the job's own or its only one."""
    if stage is not None:
        return job.evals.get(stage)
    if None in job.evals:
        return job.evals[None]
    if "eval" in job.evals:
        return job.evals["eval"]
    return next(iter(job.evals.values())) if len(job.evals) == 1 else None


def _random_values(columns: Sequence[str], jobs: Sequence[Job]) -> dict[str, float | None]:
    """The random-guess expectation (section 5.1) that each screening evaluation reports."""
    for job in jobs:
        for payload in job.evals.values():
            m = payload["metrics"]
            if PREFIX + "random_baseline" in m:
                keys = {c: "random_baseline" + ("" if c == "overall" else "/" + c) for c in columns}
                return {c: m.get(PREFIX + k) for c, k in keys.items()}
    return dict.fromkeys(columns)


def fill_row(entry: dict, columns: Sequence[str], jobs: Sequence[Job], fallback: dict) -> Row:
    """One paper row from the first matching job that finished; "{hard}"-style placeholders in
    its labels take that job's mining counts (or another job's, when it mined none)."""
    labels = [str(x) for x in entry.get("labels", [])]
    if entry.get("random"):
        return Row(labels, _random_values(columns, jobs), {}, "ok")
    found = [j for j in jobs if matches(j, entry["match"])]
    done = [(j, p) for j in found if (p := eval_of(j, entry.get("stage"))) is not None]
    if done:
        (job, payload), status = done[0], "ok"
        if len(done) > 1:
            log.warning("row %s: %d jobs match; using job %s", labels, len(done), job.name)
        values = {c: payload["metrics"].get(PREFIX + c) for c in columns}
    else:
        job, status = (found[0] if found else None), ("failed" if found else "missing")
        values = dict.fromkeys(columns)
    counts = (job.counts if job is not None else {}) or fallback
    placeholders = {k: counts.get(k, "?") for k in ("hard", "easy", "all")}
    labels = [label.format(**placeholders) for label in labels]
    return Row(labels, values, {}, status, job.name if job is not None else "")


def add_deltas(rows: Sequence[Row], sections: Sequence[int], baselines: dict, columns, spec):
    """ "(+x.xx)" to the section's baseline row, as the paper writes its ablations."""
    for row, section in zip(rows, sections, strict=True):
        base = baselines.get(section)
        if row.status != "ok" or base is None or base.status != "ok":
            continue
        if row is base and not spec.get("baseline_delta"):
            continue
        row.deltas = {
            c: row.values[c] - base.values[c]
            if row.values.get(c) is not None and base.values.get(c) is not None
            else None
            for c in columns
        }


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


def cell(row: Row, column: str, decimals: int) -> str:
    if row.status in ("missing", "failed"):
        return row.status
    value = row.values.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{value:.{decimals}f}"
    delta = row.deltas.get(column)
    return text + (f" ({delta:+.{decimals}f})" if delta is not None else "")


def to_markdown(spec: dict, rows: Sequence[Row]) -> str:
    columns, decimals = spec["columns"], int(spec.get("decimals", 2))
    head = [*spec["label_columns"], *columns.values()]
    lines = [f"**{spec['title']}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row.status == "section":
            cells = [f"*{row.labels[0]}*"] + [""] * (len(head) - 1)
        else:
            cells = [*row.labels, *(cell(row, c, decimals) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(spec: dict, rows: Sequence[Row]) -> str:
    columns = list(spec["columns"])
    out = io.StringIO()
    writer = csv.writer(out)
    header = [*spec["label_columns"]]
    for c in columns:
        header += [c, f"{c}_delta"]
    writer.writerow([*header, "status", "job"])
    for row in rows:
        if row.status == "section":
            continue
        values = []
        for c in columns:
            v, d = row.values.get(c), row.deltas.get(c)
            values += ["" if v is None else f"{v:.4f}", "" if d is None else f"{d:.4f}"]
        writer.writerow([*row.labels, *values, row.status, row.job])
    return out.getvalue()


# -- curves ----------------------------------------------------------------------------------------
def plot_curves(spec: dict, rows: Sequence[Row], jobs: Sequence[Job], path: Path) -> Path | None:
    """Reward and KL of the table's GRPO runs on one figure; None when there is none."""
    by_name = {j.name: j for j in jobs}
    runs, group = [], ""
    for row, entry in zip(rows, spec["rows"], strict=True):
        if row.status == "section" or entry.get("baseline"):
            group = row.labels[0]  # "+GRPO" alone is ambiguous: name its model too
        job = by_name.get(row.job)
        if job is not None and job.curves is not None:
            label = " ".join(x for x in row.labels if x)
            runs.append((label if row.labels[0] == group else f"{group} {label}".strip(), job))
    panels = [
        Panel(f"{title} ({key})", "step", [(lb, *read_curve(job.curves, key)) for lb, job in runs])
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
    import wandb

    path = f"{entity}/{project}" if entity else project
    return jobs_from_runs(wandb.Api().runs(path, filters={"group": group}))


def log_to_wandb(spec: dict, rows: Sequence[Row], name: str, project: str, image: Path | None):
    import wandb

    from hcm.config import wandb_offline

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
    source: str,
    out: str | None = None,
    sweep: str | None = None,
    wandb_log: bool = False,
    project: str = "hcm",
    entity: str | None = None,
) -> str:
    """Write <name>.md/.csv (and the curves) and return the Markdown table."""
    folder = Path(source)
    if folder.is_dir():
        spec, name, jobs = read_multirun(folder)
        out_dir = Path(out) if out else folder
    else:
        name = sweep or source
        spec, jobs = load_sweep_spec(name), read_wandb_group(source, project, entity)
        out_dir = Path(out) if out else Path.cwd()
    rows = build_rows(spec, jobs)
    markdown = to_markdown(spec, rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text(markdown)
    (out_dir / f"{name}.csv").write_text(to_csv(spec, rows))
    image = plot_curves(spec, rows, jobs, out_dir / f"{name}_curves.png")
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
        "source", help="a multirun folder (outputs/multirun/<table>/<date>) or a W&B group"
    )
    parser.add_argument(
        "--out", help="where to write the table (default: the multirun folder, or .)"
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
