"""hcm.archive: a run's results small enough to commit, from which its summary is rebuilt."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hcm.archive import archive


def fake_job(root: Path) -> Path:
    """A job folder whose stage lives in a stage store (a symlink), with weights and images."""
    job, stage = root / "job", root / "store" / "eval-123"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    (job / "summary.json").write_text("{}")
    (stage / "csv").mkdir(parents=True)
    (stage / "model").mkdir()
    (stage / "model" / "model.safetensors").write_bytes(b"\0" * 1000)
    (stage / "checkpoints").mkdir()
    (stage / "checkpoints" / "last.ckpt").write_bytes(b"\0" * 1000)
    (stage / "metrics.json").write_text('{"metrics": {"test/score/overall": 50.0}}')
    (stage / "csv" / "metrics.csv").write_text("step,epoch\n0,0\n")
    # a part a resume kept (hcm.curves.log_parts)
    (stage / "csv" / "metrics-20261203-011500.csv").write_text("step,epoch\n")
    record = {"id": "test-0", "label": "A", "parsed": "A", "correct": True, "dpa": 1.0}
    full = record | {"completion": "<think>...</think><answer>A</answer>", "images": ["a.png"]}
    (stage / "predictions.jsonl").write_text(json.dumps(full) + "\n")
    (job / "stages").mkdir()
    (job / "stages" / "eval").symlink_to(stage, target_is_directory=True)
    return job


def test_an_archived_job_keeps_what_summary_and_report_read_and_drops_the_rest(tmp_path):
    job = fake_job(tmp_path)
    (written,) = archive(job, tmp_path / "archived")
    stage = written / "stages" / "eval"
    assert not stage.is_symlink()  # the store's folder itself, not a link to it
    kept = {str(p.relative_to(written)) for p in written.rglob("*") if p.is_file()}
    assert kept == {
        ".hydra/overrides.yaml",
        "summary.json",
        "stages/eval/metrics.json",
        "stages/eval/csv/metrics.csv",
        "stages/eval/csv/metrics-20261203-011500.csv",
        "stages/eval/predictions.jsonl",
    }
    (record,) = [json.loads(line) for line in (stage / "predictions.jsonl").open()]
    assert record == {"id": "test-0", "label": "A", "parsed": "A", "correct": True, "dpa": 1.0}


def test_a_multirun_is_archived_job_by_job_with_its_layout(tmp_path):
    multirun = tmp_path / "multirun"
    multirun.mkdir()
    (multirun / "multirun.yaml").write_text("report: {}\n")
    fake_job(tmp_path).rename(multirun / "0")
    written = archive(multirun, tmp_path / "archived")
    assert [p.name for p in written] == ["0"]
    assert (tmp_path / "archived" / "multirun.yaml").read_text() == "report: {}\n"
    assert (tmp_path / "archived" / "0" / "stages" / "eval" / "metrics.json").is_file()


def test_an_eval_output_is_archived_as_one_stage(tmp_path):
    stage = fake_job(tmp_path) / "stages" / "eval"
    (written,) = archive(stage, tmp_path / "archived")
    assert (written / "metrics.json").is_file() and not (written / "model").exists()
    assert "completion" not in (written / "predictions.jsonl").read_text()


def test_a_training_stage_of_the_store_is_archived_as_one_stage(tmp_path):
    """A training stage has no metrics.json: its stage.json says what it is."""
    stage = tmp_path / "sft-123"
    (stage / "csv").mkdir(parents=True)
    (stage / "model").mkdir()
    (stage / "stage.json").write_text('{"config_hash": "123"}')
    (stage / "csv" / "metrics.csv").write_text("step,epoch\n0,0\n")
    (written,) = archive(stage, tmp_path / "archived")
    assert (written / "stage.json").is_file() and (written / "csv" / "metrics.csv").is_file()
    assert not (written / "model").exists()


def test_a_store_keeps_each_stage_once_and_jobs_link_to_it(tmp_path):
    """Two jobs (two tables of a seed) that ran the same stage: one copy, two links, and the
    job reads through its link what it read through the stage store's."""
    job = fake_job(tmp_path)
    other = tmp_path / "other"
    (other / ".hydra").mkdir(parents=True)
    (other / "stages").mkdir()
    (other / "stages" / "eval").symlink_to(tmp_path / "store" / "eval-123")
    store = tmp_path / "results" / "stages"
    archive(job, tmp_path / "results" / "table6", store)
    archive(other, tmp_path / "results" / "table7", store)
    assert [p.name for p in store.iterdir()] == ["eval-123"]
    for table in ("table6", "table7"):
        link = tmp_path / "results" / table / "stages" / "eval"
        assert link.is_symlink() and not Path(os.readlink(link)).is_absolute()
        assert json.loads((link / "metrics.json").read_text())["metrics"] == {
            "test/score/overall": 50.0
        }
    assert not (store / "eval-123" / "model").exists()
