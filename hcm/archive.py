"""A run's results, small enough to commit: what `hcm.summary` and `hcm.report` read, without the
weights, checkpoints, images and completions (a sweep is split across sessions, and the next
session may start on a machine without `outputs/`).

    python -m hcm.archive outputs/cpu_paper docs/results/science_cpu_v2/runs/cpu_paper-s0
    python -m hcm.archive multirun/2026-12-03/01-00-00 docs/results/table6/part0
    python -m hcm.archive multirun/table7/<time> results/runs/table7-s0 --store results/runs/stages

A job folder (one with `.hydra/`) is copied as one job, a stage folder (the stage store's, with its
`stage.json`, or `eval.py`'s output, with its `metrics.json`) as one stage; any other folder as a
multirun, each job folder under it (and its `multirun.yaml`). Per job: `.hydra/`, `summary.json`,
`summary.md`, `metrics.json`, and per stage (symlinks into the stage store followed):
`stage.json`, `metrics.json`, `hard_cases.json`, the CSV logs, and `predictions.jsonl` with each
record's `completion` and `images` left out (the per-sample `correct`, `dpa`, `faithful` and
`parsed` answer are what paired differences and judgement read). About 300 kB per evaluated
2,048 samples. `--store DIR` keeps each stage once in DIR, named as in the stage store, and links
it from every job that ran it: a sweep's arms share their SFT and first GRPO stages, and the
tables of one seed share more.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from hcm.curves import log_parts

JOB_FILES = ("summary.json", "summary.md", "metrics.json")
STAGE_FILES = ("stage.json", "metrics.json", "hard_cases.json", "table.md")
DROPPED = ("completion", "images")  # what a prediction keeps only for the gallery


def slim_predictions(src: Path, dest: Path) -> None:
    with src.open() as f, dest.open("w") as out:
        for line in f:
            if line.strip():
                record = {k: v for k, v in json.loads(line).items() if k not in DROPPED}
                out.write(json.dumps(record) + "\n")


def archive_job(job: Path, dest: Path, store: Path | None = None) -> None:
    shutil.copytree(job / ".hydra", dest / ".hydra", dirs_exist_ok=True)
    for name in JOB_FILES:
        if (job / name).is_file():
            shutil.copy2(job / name, dest / name)
    for stage in sorted(p for p in (job / "stages").glob("*") if p.is_dir()):
        if store is None or not stage.is_symlink():  # (a stage without a store: the job's own)
            archive_stage(stage, dest / "stages" / stage.name)
            continue
        # once per stage folder of the store (`<name>-<hash>`, shared by jobs, tables and
        # seeds' reruns), linked from the job as the live run links into its stage store
        kept = store / stage.resolve().name
        if not (kept / "csv").is_dir():
            archive_stage(stage, kept)
        link = dest / "stages" / stage.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(kept, link.parent), target_is_directory=True)


def archive_stage(stage: Path, dest: Path) -> None:
    (dest / "csv").mkdir(parents=True, exist_ok=True)
    for name in STAGE_FILES:
        if (stage / name).is_file():
            shutil.copy2(stage / name, dest / name)
    for log in log_parts(stage / "csv" / "metrics.csv"):  # every part that readers read
        shutil.copy2(log, dest / "csv" / log.name)
    if (stage / "predictions.jsonl").is_file():
        slim_predictions(stage / "predictions.jsonl", dest / "predictions.jsonl")


def archive(src: Path, dest: Path, store: Path | None = None) -> list[Path]:
    """Copy the job folder `src`, every job folder of the multirun `src`, or the single stage
    `src` (a stage store's folder, or an `eval.py` output: no `.hydra/`) into `dest`; returns
    the job (or stage) folders written. With `store`, each job's stages are kept there once per
    stage folder and linked from the job (relative symlinks)."""
    if (src / ".hydra").is_dir():
        archive_job(src, dest, store)
        return [dest]
    if (src / "stage.json").is_file() or (src / "metrics.json").is_file():
        archive_stage(src, dest)
        return [dest]
    jobs = sorted(p for p in src.iterdir() if (p / ".hydra").is_dir())
    if not jobs:
        raise FileNotFoundError(
            f"{src} is neither a job folder, a multirun nor a stage "
            "(no .hydra/, stage.json or metrics.json)"
        )
    dest.mkdir(parents=True, exist_ok=True)
    if (src / "multirun.yaml").is_file():
        shutil.copy2(src / "multirun.yaml", dest / "multirun.yaml")
    for job in jobs:
        archive_job(job, dest / job.name, store)
    return [dest / job.name for job in jobs]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hcm.archive", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("src", type=Path, help="a job folder or a multirun folder")
    parser.add_argument("dest", type=Path, help="where the slim copy goes (e.g. docs/results/..)")
    parser.add_argument(
        "--store",
        type=Path,
        help="keep each stage once here (shared by the jobs, tables and seeds archived into it) "
        "and link it from its jobs",
    )
    args = parser.parse_args(argv)
    written = archive(args.src, args.dest, args.store)
    size = sum(f.stat().st_size for f in args.dest.rglob("*") if f.is_file())
    print(f"{len(written)} folder(s) archived in {args.dest} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
