"""hcm.curves: a stage's CSV log split by resumes (hcm.runtime.keep_csv) reads as the log of a run
that was never interrupted, in every reader of it (summary, report curves, reward per epoch,
zero-variance share)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from hcm.aggregate import Run
from hcm.curves import log_parts, read_curve, read_log
from hcm.report import Job
from hcm.science import run_reward, run_zero_variance
from hcm.summary import curve_panels

# the columns a GRPO stage's CSVLogger writes (a few of them), in its order
KEYS = ["epoch", "lr-AdamW", "step", "train/reward/total", "train/zero_variance_groups"]
KEYS += ["val/score/overall"]


def grpo_rows(steps: range, shift: float = 0.0) -> list[dict]:
    """A GRPO stage's rows, 3 steps an epoch: the LR monitor's row, then the step's own, and a
    validation at each epoch's last step. `shift` changes the values (a redone step on a GPU)."""
    rows = []
    for s in steps:
        epoch = s // 3
        rows.append({"step": s, "lr-AdamW": 1e-4})
        rows.append(
            {
                "epoch": epoch,
                "step": s,
                "train/reward/total": 0.1 * s + shift,
                "train/zero_variance_groups": 0.5 + shift,
            }
        )
        if s % 3 == 2:
            rows.append({"epoch": epoch, "step": s, "val/score/overall": 10.0 * epoch + shift})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, KEYS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def grpo_stage(folder: Path, parts: dict[str, list[dict]]) -> Path:
    """A finished GRPO stage folder whose csv/ holds `parts` (file name -> rows)."""
    for name, rows in parts.items():
        write_csv(folder / "csv" / name, rows)
    (folder / "stage.json").write_text(json.dumps({"kind": "grpo"}))
    return folder / "csv" / "metrics.csv"


@pytest.fixture
def logs(tmp_path) -> tuple[Path, Path]:
    """(the uninterrupted log, the same run's log after a kill at step 5 and a resume from the
    checkpoint after step 2: steps 3 and 4 were logged twice, the second time slightly off)."""
    whole = grpo_stage(tmp_path / "whole" / "grpo", {"metrics.csv": grpo_rows(range(9))})
    killed = grpo_rows(range(3)) + grpo_rows(range(3, 5), shift=0.01)  # steps 3 and 4 redone
    parts = {
        "metrics-20260101-120000.csv": killed,
        "metrics-20260101-120000-1.csv": grpo_rows(range(3, 6)),  # killed again, same second
        "metrics.csv": grpo_rows(range(3, 9)),
    }
    split = grpo_stage(tmp_path / "split" / "grpo", parts)
    return whole, split


def test_parts_in_the_order_written(logs):
    _, split = logs
    assert [p.name for p in log_parts(split)] == [
        "metrics-20260101-120000.csv",
        "metrics-20260101-120000-1.csv",
        "metrics.csv",
    ]
    (split.parent / "metrics-notes.csv").write_text("not a part\n")  # not keep_csv's name
    assert len(log_parts(split)) == 3
    assert log_parts(split.parent / "absent" / "metrics.csv") == []


def test_a_resumed_log_reads_as_the_uninterrupted_one(logs):
    whole, split = logs
    assert read_log(split) == read_log(whole)
    for key, x in (("train/reward/total", "step"), ("val/score/overall", "epoch")):
        assert read_curve(split, key, x) == read_curve(whole, key, x)


def test_every_reader_reads_all_parts(logs):
    whole, split = logs
    panels = [curve_panels([log.parent.parent], None) for log in (whole, split)]
    assert [p.series for p in panels[0]] == [p.series for p in panels[1]]
    assert panels[1][1].series[0][1] == list(map(float, range(9)))  # GRPO reward, every step
    runs = [Run(Job("0", {}, {}, curves=[log], folder=None), "0", {}, None) for log in logs]
    assert run_reward(runs[1]) == run_reward(runs[0]) == pytest.approx({0: 0.1, 1: 0.4, 2: 0.7})
    assert run_zero_variance(runs[1]) == run_zero_variance(runs[0]) == pytest.approx(0.5)
