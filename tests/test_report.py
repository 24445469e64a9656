"""hcm.report on hand-made multirun folders with the paper's numbers: the layouts, deltas,
missing and failed rows, the random-guess row, hard-case counts, curves and the W&B source."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from hcm.data.hard_cases import HardCaseSet
from hcm.report import build_rows, jobs_from_runs, load_sweep_spec, main, report

TABLE6 = {  # experiment -> the paper's Table 6 score
    "paper_cot_sft_1b": 45.94,
    "grpo_1b": 53.85,
    "dpa_grpo_1b": 55.56,
    "paper_cot_sft_2b": 53.63,
    "grpo_2b": 58.55,
    "hcm_2b": 64.74,
}


def make_job(
    root: Path,
    num: int,
    choices: dict,
    overrides: list[str],
    evals: dict[str | None, dict] | None = None,
) -> Path:
    """A job folder as Hydra and the pipelines leave it: .hydra/, stages/<stage>/metrics.json."""
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "hydra.yaml").write_text(
        OmegaConf.to_yaml({"hydra": {"runtime": {"choices": choices}}})
    )
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    for stage, metrics in (evals or {}).items():
        folder = job if stage is None else job / "stages" / stage
        folder.mkdir(parents=True, exist_ok=True)
        payload = {"metrics": {f"test/score/{k}": v for k, v in metrics.items()}}
        (folder / "metrics.json").write_text(json.dumps(payload))
    return job


def make_multirun(root: Path, sweep: str) -> Path:
    root.mkdir(parents=True)
    cfg = {"task_name": sweep, "report": load_sweep_spec(sweep)}
    (root / "multirun.yaml").write_text(OmegaConf.to_yaml(cfg))
    return root


def test_table6_layout_deltas_missing_and_failed(tmp_path):
    root = make_multirun(tmp_path / "t6", "table6")
    for num, (exp, score) in enumerate(TABLE6.items()):
        make_job(
            root, num, {"experiment": exp}, [f"experiment={exp}"], {"eval": {"overall": score}}
        )
    # dpa_grpo_2b ran but left no results; hcm_1b never ran
    make_job(root, 7, {"experiment": "dpa_grpo_2b"}, ["experiment=dpa_grpo_2b"])
    curve = root / "5" / "stages" / "grpo" / "csv"
    curve.mkdir(parents=True)
    (curve / "metrics.csv").write_text(
        "step,train/reward/total,train/kl\n0,0.5,0.0\n1,0.75,0.01\n2,1.0,0.02\n"
    )
    markdown = report(str(root))
    assert markdown.splitlines()[:3] == [
        "**Table 6: Comparison among different GRPO paradigms.**",
        "",
        "| Models | Overall Score |",
    ]
    body = markdown.splitlines()[4:]
    assert body == [
        "| InternVL3-1B-CoT | 45.94 |",
        "| +GRPO | 53.85 (+7.91) |",
        "| +DPA-GRPO | 55.56 (+9.62) |",
        "| +HCM-GRPO | missing |",
        "| InternVL3-2B-CoT | 53.63 |",
        "| +GRPO | 58.55 (+4.92) |",
        "| +DPA-GRPO | failed |",
        "| +HCM-GRPO | 64.74 (+11.11) |",
    ]
    csv_lines = (root / "table6.csv").read_text().splitlines()
    assert csv_lines[0] == "Models,overall,overall_delta,status,job"
    assert csv_lines[4] == "+HCM-GRPO,,,missing,"
    assert csv_lines[7] == "+DPA-GRPO,,,failed,7"
    assert csv_lines[8] == "+HCM-GRPO,64.7400,11.1100,ok,5"
    assert (root / "table6.md").read_text() == markdown
    assert (root / "table6_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_table3_random_row_prompts_and_sections(tmp_path):
    root = make_multirun(tmp_path / "t3", "table3")
    dims = {
        "appearance_deformation": 27.61,
        "physical_shadow": 31.46,
        "placement_layout": 29.49,
        "extension_rationality": 27.25,
    }
    metrics = {"overall": 18.59, **{d: 10.0 for d in dims}, "random_baseline": 34.27}
    metrics.update({f"random_baseline/{d}": v for d, v in dims.items()})
    choices = {"experiment": "api_gpt4o", "prompt": "direct"}
    make_job(root, 0, choices, ["experiment=api_gpt4o", "prompt=direct"], {None: metrics})
    lines = report(str(root)).splitlines()
    assert lines[2].startswith("| Models | Prompt Type | Overall Score | Appearance Deformation")
    assert lines[4] == "| Random | - | 34.27 | 27.61 | 31.46 | 29.49 | 27.25 |"
    assert lines[5] == "| *API-based models* |  |  |  |  |  |  |"
    assert lines[6] == "| GPT4o | Direct | 18.59 | 10.00 | 10.00 | 10.00 | 10.00 |"
    assert lines[7] == "| GPT4o | CoT | missing | missing | missing | missing | missing |"
    assert (
        lines[-1]
        == "| HCM-GRPO-2B (Ours) | CoT | missing | missing | missing | missing | missing |"
    )


def test_table7_counts_in_row_names_and_the_baseline_delta(tmp_path):
    root = make_multirun(tmp_path / "t7", "table7")
    scores = {
        "hard_only": 58.76,
        "easy_only": 59.40,
        "all": 59.83,
        "all_plus_random": 60.90,
        "all_plus_hard": 64.74,
    }
    for num, (composition, score) in enumerate(scores.items()):
        overrides = ["experiment=hcm_2b", f"data.composition={composition}"]
        job = make_job(root, num, {"experiment": "hcm_2b"}, overrides, {"eval": {"overall": score}})
        if composition != "all":  # "all" never mines
            hard = [f"h{i}" for i in range(434)]
            easy = [f"e{i}" for i in range(610)]
            cases = HardCaseSet(hard, easy, "m", "f", "0" * 64, {"k": 1})
            cases.save(job / "stages" / "grpo" / "hard_cases.json")
    lines = report(str(root)).splitlines()[4:]
    assert lines == [
        "| *InternVL3-2B-CoT* |  |",
        "| 434 Hard Cases Only | 58.76 (-1.07) |",
        "| 610 Easy Cases Only | 59.40 (-0.43) |",
        "| All 1044 Samples (DPA-GRPO) | 59.83 (+0.00) |",
        "| All 1044 Samples + 434 Random Samples | 60.90 (+1.07) |",
        "| All 1044 Samples + 434 Hard Cases (HCM-GRPO) | 64.74 (+4.91) |",
    ]


def test_benchmark_table_picks_eval_stages_and_the_twin_inherits_the_layout(tmp_path):
    spec = load_sweep_spec("table10_tiny")
    assert spec == load_sweep_spec("table10")
    root = make_multirun(tmp_path / "t10", "table10")
    make_job(root, 0, {"experiment": "bench_base_2b"}, [], {"eval": {"overall": 40.18}})
    make_job(root, 1, {"experiment": "bench_hcm_2b"}, [], {"eval": {"overall": 49.10}})
    lines = report(str(root)).splitlines()
    assert "| InternVL3-2B | 40.18 |" in lines and "| +SFT, +HCM-GRPO | 49.10 (+8.92) |" in lines
    assert lines.count("| +SFT, +GRPO | missing |") == 2


def test_jobs_from_wandb_runs_use_tags_and_run_names():
    def run(name, tags, summary, job_type="eval"):
        return SimpleNamespace(id=name, name=name, tags=tags, summary=summary, job_type=job_type)

    runs = [
        run("table4/eval_direct", ["experiment=paper_base_1b"], {"test/score/overall": 30.13}),
        run("table4/eval_cot", ["experiment=paper_base_1b"], {"test/score/overall": 25.85}),
        run("table4/sft", ["experiment=paper_direct_sft_1b"], {"train/loss": 1.0}, "sft"),
        run("table4/eval", ["experiment=paper_direct_sft_1b"], {"test/score/overall": 36.75}),
        run("table4/eval", ["experiment=paper_base_grpo_1b"], {}),  # crashed: no summary
    ]
    rows = build_rows(load_sweep_spec("table4"), jobs_from_runs(runs))
    values = [(r.labels[0], r.labels[1], r.values["overall"], r.status) for r in rows[:4]]
    assert values == [
        ("InternVL3-1B", "Direct", 30.13, "ok"),
        ("InternVL3-1B", "CoT", 25.85, "ok"),
        ("+SFT", "Direct", 36.75, "ok"),
        ("+GRPO", "CoT", None, "failed"),
    ]
    assert rows[4].status == "missing"


def test_not_a_multirun_folder_and_help(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"multirun\.yaml"):
        report(str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "multirun folder" in capsys.readouterr().out
