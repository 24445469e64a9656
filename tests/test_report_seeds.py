"""hcm.report over seeds (hcm.aggregate) and its science sections (hcm.science), on hand-made
multirun folders with known scores: means, t intervals, paired differences, the CSVs, the
figure, per-dimension scores, detection rates per defect family and zero-variance groups."""

from __future__ import annotations

import csv
import doctest
import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_report import make_job, make_multirun

import hcm.aggregate
import hcm.curves
import hcm.report
import hcm.science
import hcm.stats
from hcm.data.manifest import manifest_hash
from hcm.report import report
from hcm.science import detection_counts

# Table 6's 1B rows over seeds; 2B rows one run each, as before. experiment -> {seed: score}
SEEDED = {
    "paper_cot_sft_1b": {0: 44.0, 1: 46.0, 2: 48.0},
    "grpo_1b": {0: 50.0, 1: 53.0, 2: 53.0},  # per-seed differences 6, 7, 5
    "dpa_grpo_1b": {0: 50.0},  # one run: its score alone, Wilson in the CSV
    "hcm_1b": {0: 60.0, 1: 62.0},  # other seeds than the baseline's: no paired difference
    "paper_cot_sft_2b": {None: 53.63},  # no seed override at all
    "hcm_2b": {None: 64.74},
}


def seeded_table6(root: Path) -> Path:
    root = make_multirun(root, "table6")
    num = 0
    for exp, scores in SEEDED.items():
        for seed, score in scores.items():
            overrides = [f"experiment={exp}", *([f"seed={seed}"] if seed is not None else [])]
            metrics = {"overall": score, "count": 100}
            make_job(root, num, {"experiment": exp}, overrides, {"eval": metrics})
            num += 1
    # a fourth grpo_1b seed that crashed: the row averages the three that finished
    make_job(root, num, {"experiment": "grpo_1b"}, ["experiment=grpo_1b", "seed=3"])
    return root


def test_a_sweep_split_by_seeds_reports_as_one(tmp_path):
    """Seeds run in different sessions (two multirun folders of one sweep) give the table one
    multirun of all of them gives."""
    whole = report(str(seeded_table6(tmp_path / "whole")), out=str(tmp_path / "a"))
    parts = [make_multirun(tmp_path / f"part{i}", "table6") for i in (0, 1)]
    for job in sorted((tmp_path / "whole").iterdir()):
        if job.is_dir():  # seed 0 (and the runs without a seed) in one part, the rest in the other
            overrides = (job / ".hydra" / "overrides.yaml").read_text()
            seed0 = "seed=" not in overrides or "seed=0" in overrides
            shutil.copytree(job, parts[0 if seed0 else 1] / job.name)
    split = report([str(p) for p in parts], out=str(tmp_path / "b"))
    assert split.splitlines()[:14] == whole.splitlines()[:14]
    other = make_multirun(tmp_path / "t7", "table7")
    with pytest.raises(ValueError, match="another sweep"):
        report([str(parts[0]), str(other)])


def test_seeds_are_averaged_with_t_intervals_and_paired_deltas(tmp_path):
    root = seeded_table6(tmp_path / "t6")
    lines = report(str(root)).splitlines()
    assert lines[2] == "| Models | Overall Score | Seeds |"
    assert lines[4:13] == [
        # mean 46, sd 2, se 1.1547, t(2) = 4.3027: half-width 4.97
        "| InternVL3-1B-CoT | 46.00 ± 4.97 | 3 |",
        # sd sqrt(3), se 1: 4.30; differences 6, 7, 5: sd 1, se 0.5774: 2.48
        "| +GRPO | 52.00 ± 4.30 (+6.00 ± 2.48) | 3 |",
        "| +DPA-GRPO | 50.00 (+4.00) | 1 |",  # one run: as before, no interval
        # t(1) = 12.7062, se 1; seeds {0, 1} are not the baseline's {0, 1, 2}: unpaired, no ±
        "| +HCM-GRPO | 61.00 ± 12.71 (+15.00) | 2 |",
        "| InternVL3-2B-CoT | 53.63 | 1 |",
        "| +GRPO | missing | - |",
        "| +DPA-GRPO | missing | - |",
        "| +HCM-GRPO | 64.74 (+11.11) | 1 |",
        "",
    ]
    assert lines[13].startswith("Cells: mean over seeds ± half-width of its 95% Student-t")

    table = list(csv.DictReader((root / "table6.csv").open()))
    assert list(table[0]) == [
        "Models", "overall", "overall_delta", "overall_lo", "overall_hi", "overall_delta_lo",
        "overall_delta_hi", "overall_per_seed", "n_seeds", "seeds", "interval", "status", "job",
    ]  # fmt: skip
    base, grpo, dpa, hcm = table[:4]
    assert (base["overall"], base["overall_lo"], base["overall_hi"]) == (
        "46.0000", "41.0317", "50.9683"
    )  # fmt: skip
    assert base["overall_per_seed"] == "44.0000;46.0000;48.0000"
    assert (base["n_seeds"], base["seeds"], base["interval"], base["job"]) == (
        "3",
        "0;1;2",
        "t",
        "0;1;2",
    )
    assert (grpo["overall_delta"], grpo["overall_delta_lo"], grpo["overall_delta_hi"]) == (
        "6.0000", "3.5159", "8.4841"
    )  # fmt: skip
    assert (grpo["n_seeds"], grpo["seeds"], grpo["status"]) == ("3", "0;1;2", "ok")
    # one run of 100 questions, 50 right: Wilson [0.4038, 0.5962] (tests/test_stats.py)
    assert (dpa["overall_lo"][:5], dpa["overall_hi"][:5], dpa["interval"]) == (
        "40.38",
        "59.61",
        "wilson",
    )
    assert (dpa["overall_delta"], dpa["overall_delta_lo"]) == ("4.0000", "")
    assert (hcm["overall"], hcm["overall_delta"], hcm["overall_delta_lo"]) == (
        "61.0000",
        "15.0000",
        "",
    )

    runs = list(csv.DictReader((root / "table6_runs.csv").open()))
    assert [(r["Models"], r["seed"], r["overall"]) for r in runs[:4]] == [
        ("InternVL3-1B-CoT", "0", "44.0000"),
        ("InternVL3-1B-CoT", "1", "46.0000"),
        ("InternVL3-1B-CoT", "2", "48.0000"),
        ("+GRPO", "0", "50.0000"),
    ]
    assert len(runs) == 11
    dpa_run = runs[6]
    assert (dpa_run["stage"], dpa_run["overall_n"], dpa_run["overall_lo"][:5]) == (
        "eval",
        "100",
        "40.38",
    )
    assert (root / "table6_scores.png").read_bytes()[:4] == b"\x89PNG"


def test_jobs_that_differ_in_more_than_their_seed_are_not_averaged(tmp_path, caplog):
    root = make_multirun(tmp_path / "t6", "table6")
    jobs = [  # the second one also changed beta: another experiment, not another seed
        (["seed=0"], 50.0),
        (["seed=1", "module.beta=0.1"], 70.0),
        (["seed=1"], 54.0),
    ]
    for num, (overrides, score) in enumerate(jobs):
        overrides = ["experiment=grpo_1b", *overrides]
        make_job(root, num, {"experiment": "grpo_1b"}, overrides, {"eval": {"overall": score}})
    lines = report(str(root)).splitlines()
    assert "| +GRPO | 52.00 ± 25.41 | 2 |" in lines  # 50 and 54: se 2, t(1) 12.706
    assert "row ['+GRPO']: 3 jobs match; using jobs ['0', '2']" in caplog.text


# -- science sections --------------------------------------------------------------------------
ARMS = {
    "title": "Arms",
    "label_columns": ["Arm"],
    "columns": {"overall": "Overall"},
    "decimals": 1,
    "delta": True,
    "rows": [
        {"labels": ["SFT"], "match": {"experiment": "cpu_sft"}, "baseline": True},
        {"labels": ["+HCM-GRPO"], "match": {"experiment": "cpu_hcm"}},
    ],
}
# one test sample; candidates A (floating), B (clean), C (floating + extra_object), D (clean)
CANDIDATES = [
    {"letter": "A", "defects": [{"family": "floating", "dimension": "placement_layout"}]},
    {"letter": "B", "defects": []},
    {
        "letter": "C",
        "defects": [
            {"family": "floating", "dimension": "placement_layout"},
            {"family": "extra_object", "dimension": "extension_rationality"},
        ],
    },
    {"letter": "D", "defects": []},
]


JUDGEMENT_KEYS = ("exact_match", "judgement/balanced", "faithful", "answer_size/1")
# experiment -> per seed: exact match, balanced, faithful (None: no CoT stated all four verdicts),
# names 1 option, and whether each of the 4 test samples was right
JUDGED = {
    "cpu_sft": [(20.0, 50.0, None, 10.0, [1, 0, 0, 0]), (30.0, 60.0, 80.0, 20.0, [1, 1, 0, 0])],
    "cpu_hcm": [(40.0, 70.0, 90.0, 50.0, [1, 1, 1, 0]), (50.0, 80.0, 100.0, 70.0, [1, 1, 0, 1])],
}


def science_run(tmp_path: Path, digest_ok: bool = True) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    manifest = data / "test.jsonl"
    manifest.write_text(json.dumps({"id": "s0", "meta": {"candidates": CANDIDATES}}) + "\n")
    digest = manifest_hash(manifest) if digest_ok else "0" * 64
    root = tmp_path / "multirun"
    root.mkdir()
    (root / "multirun.yaml").write_text(OmegaConf.to_yaml({"task_name": "arms", "report": ARMS}))
    # experiment -> per seed: (overall, physical_shadow, parsed answer, zero-variance per step)
    arms = {
        "cpu_sft": [(40.0, 30.0, None, None), (50.0, 40.0, "N", None)],
        "cpu_hcm": [(70.0, 60.0, "BC", [0.5, 0.25, 0.0, 0.25]), (80.0, 80.0, "B", [0.5, 0.5])],
    }
    num = 0
    for exp, seeds in arms.items():
        for seed, (overall, shadow, parsed, zero_var) in enumerate(seeds):
            judged = JUDGED[exp][seed]
            metrics = {
                "overall": overall,
                "count": 100,
                "physical_shadow": shadow,
                "count/physical_shadow": 50,
                "appearance_deformation": 0.0,  # what the metric writes for no sample
                "count/appearance_deformation": 0,
                "random_baseline": 34.5,
                **{k: v for k, v in zip(JUDGEMENT_KEYS, judged[:4], strict=True) if v is not None},
            }
            job = make_job(root, num, {"experiment": exp}, [f"experiment={exp}", f"seed={seed}"])
            num += 1
            evals = job / "stages" / "eval"
            evals.mkdir(parents=True)
            payload = {
                "metrics": {f"test/score/{k}": v for k, v in metrics.items()},
                "split": "test",
                "manifest_hashes": {"test": digest},
            }
            (evals / "metrics.json").write_text(json.dumps(payload))
            # s0 is the manifest's sample; s1-s3 (not in it) only count for the paired section
            right = judged[-1]
            rows = [{"id": f"s{k}", "parsed": parsed, "correct": c} for k, c in enumerate(right)]
            (evals / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            sft = job / "stages" / "sft"
            sft.mkdir()
            config = {"config": {"data": {"root": str(data)}}}
            (sft / "stage.json").write_text(json.dumps(config))
            if zero_var is not None:  # the GRPO stage's log: two steps an epoch
                log = job / "stages" / "grpo" / "csv"
                log.mkdir(parents=True)
                lines = ["epoch,step,train/reward/total,train/zero_variance_groups"]
                lines += [f"{i // 2},{i},{0.1 * i},{z}" for i, z in enumerate(zero_var)]
                (log / "metrics.csv").write_text("\n".join(lines) + "\n")
    return root


# the bootstrap of the per-sample differences above: mean (.5 + .25) / 2 = .375
_, _LO, _HI = hcm.stats.hierarchical_bootstrap([[0, 1, 1, 0], [0, 0, 0, 1]])
PAIRED = f"+37.5 [{100 * _LO:+.1f}, {100 * _HI:+.1f}]"
# (t(0.975; 1) + t(0.8; 1)) * sqrt(937.5 / 2) = (12.706 + 1.376) * 21.65
MDE = hcm.stats.minimum_detectable_difference(37.5, 0.0, 2, 4)


def test_science_sections_per_dimension_family_and_zero_variance(tmp_path):
    root = science_run(tmp_path)
    text = report(str(root))
    assert text.split("\n\n")[1:] == [
        "| Arm | Overall | Seeds |\n|---|---|---|\n"
        "| SFT | 45.0 ± 63.5 | 2 |\n"  # sd 7.07, se 5, t(1) 12.706
        "| +HCM-GRPO | 75.0 ± 63.5 (+30.0 ± 0.0) | 2 |",  # differences 30, 30
        hcm.aggregate.CAPTION,
        "**Scores per dimension**",
        "| Row | Appearance Deformation | Physical Shadow | Placement Layout | "
        "Extension Rationality |\n|---|---|---|---|---|\n"
        "| SFT | n/a | 35.0 | n/a | n/a |\n"
        "| SFT +HCM-GRPO | n/a | 70.0 | n/a | n/a |",
        "Per-dimension held-out scores, mean over seeds (n/a: no held-out sample has it).",
        "**Judgement**",
        "| Row | Exact match | Balanced | Faithful | Names 1 option |\n|---|---|---|---|---|\n"
        "| SFT | 25.0 | 55.0 | 80.0 | 15.0 |\n"  # faithful: seed 0 has none
        "| SFT +HCM-GRPO | 45.0 | 75.0 | 95.0 | 60.0 |",
        text.split("\n\n")[8],  # the definitions
        "**Paired differences**",
        "| Row | Δ overall, by seed (t) | Δ overall, seeds × samples | Discordance | Seeds |\n"
        "|---|---|---|---|---|\n"
        # per-sample differences: seed 0 (0, +1, +1, 0), mean .5; seed 1 (0, 0, 0, +1), .25;
        # discordant: 2 of 4 and 1 of 4
        f"| SFT +HCM-GRPO | +30.0 [+30.0, +30.0] | {PAIRED} | 37.5 | 2 |",
        text.split("\n\n")[11],
        "**Power**",
        "| Row | Seed sd of the gain | Detectable gain | Seeds for 3 | Design |\n"
        "|---|---|---|---|---|\n"
        # gains 50 and 25 (var 312.5) are all sampling noise at n = 4 (100 * 37.5 / 4 = 937.5)
        f"| SFT +HCM-GRPO | 0.0 | {MDE:.1f} | > 100 | 2 x 4 |",
        text.split("\n\n")[14],
        "**Detection rate per defect family**",
        "| Row | floating (n=2) | extra_object (n=1) | clean (n=2) |\n|---|---|---|---|\n"
        # SFT: seed 0 invalid (nothing detected, nothing kept), seed 1 "N" (all excluded)
        "| SFT | 50.0 | 50.0 | 0.0 |\n"
        # seed 0 "BC": A excluded (1 of 2 floating), C kept; seed 1 "B": A, C excluded;
        # both keep B and drop D (1 of 2 clean)
        "| SFT +HCM-GRPO | 75.0 | 50.0 | 50.0 |",
        text.split("\n\n")[17],  # the definition, checked below
        "**Zero-variance groups**",
        "| Row | Zero-variance groups (%), all GRPO epochs | its own stage's epochs | Seeds |\n"
        "|---|---|---|---|\n"
        "| SFT +HCM-GRPO | 37.5 | 37.5 | 2 |",  # step means 0.25 and 0.5 (one GRPO stage)
        text.split("\n\n")[-1],
    ]
    assert "leaves out" in text.split("\n\n")[17]
    assert "80% power" in text.split("\n\n")[14]
    assert "pooled over all candidates" in text.split("\n\n")[8]
    assert "2000 draws" in text.split("\n\n")[11]
    assert (root / "arms.md").read_text() == text
    assert (root / "arms_scores.png").read_bytes()[:4] == b"\x89PNG"


def test_a_manifest_of_other_data_gives_no_detection_rates(tmp_path):
    text = report(str(science_run(tmp_path, digest_ok=False)))
    assert "**Scores per dimension**" in text
    assert "Detection rate" not in text


def test_reward_per_epoch_is_averaged_over_seeds(tmp_path):
    root = science_run(tmp_path)
    from hcm.report import build_rows, read_multirun

    spec, _, jobs = read_multirun(root)
    hcm_row = build_rows(spec, jobs)[1]
    # seed 0: epochs 0 (0.0, 0.1) and 1 (0.2, 0.3); seed 1: epoch 0 (0.0, 0.1)
    curves = [hcm.science.run_reward(run) for run in hcm_row.runs]
    mean = hcm.science.mean_over_runs(curves)
    assert {k: round(v, 4) for k, v in mean.items()} == {0: 0.05, 1: 0.25}


@pytest.mark.parametrize(
    ("parsed", "expected"),
    [
        ("BD", {"floating": [2, 2], "extra_object": [1, 1], "clean": [2, 2]}),  # all right
        ("ABCD", {"floating": [0, 2], "extra_object": [0, 1], "clean": [2, 2]}),  # keeps all
        ("N", {"floating": [2, 2], "extra_object": [1, 1], "clean": [0, 2]}),  # excludes all
        (None, {"floating": [0, 2], "extra_object": [0, 1], "clean": [0, 2]}),  # invalid
        ("C", {"floating": [1, 2], "extra_object": [0, 1], "clean": [0, 2]}),
    ],
)
def test_detection_counts(parsed, expected):
    counts = detection_counts([{"id": "s0", "parsed": parsed}], {"s0": CANDIDATES})
    assert counts == expected
    assert detection_counts([{"id": "other", "parsed": "A"}], {"s0": CANDIDATES}) == {}


def test_doctests():
    for module, least in ((hcm.science, 4), (hcm.aggregate, 1), (hcm.curves, 1), (hcm.report, 1)):
        failed, attempted = doctest.testmod(module)
        assert attempted >= least and failed == 0


def test_a_grpo_run_split_in_two_stages_reads_as_one_curve(tmp_path):
    """grpo_all logs the epochs before the switch, grpo (continue_from) the rest: one curve."""
    from hcm.curves import read_curve

    first, rest = tmp_path / "grpo_all.csv", tmp_path / "grpo.csv"
    first.write_text("epoch,step,train/reward/total\n0,0,0.1\n0,1,0.2\n1,2,0.3\n")
    rest.write_text("epoch,step,train/reward/total\n2,3,0.5\n2,4,0.6\n")
    assert read_curve([rest, first], "train/reward/total") == (
        [0.0, 1.0, 2.0, 3.0, 4.0],
        [0.1, 0.2, 0.3, 0.5, 0.6],
    )
    assert read_curve(first, "train/reward/total", "epoch")[0] == [0.0, 0.0, 1.0]


def test_a_row_reads_the_grpo_logs_behind_its_own_evaluation(tmp_path):
    """An SFT row of a pipeline job has no GRPO curve; an HCM-GRPO row has its grpo stage's log
    and that of grpo_all, which grpo continued."""
    from hcm.aggregate import Run
    from hcm.report import Job

    store, job_dir = tmp_path / "store", tmp_path / "job"

    def stage(name: str, **marker) -> Path:
        folder = store / name
        (folder / "csv").mkdir(parents=True)
        (folder / "csv" / "metrics.csv").write_text("step,train/reward/total\n0,0.5\n")
        (folder / "stage.json").write_text(json.dumps(marker))
        return folder

    sft = stage("sft-1", kind="sft")
    first = stage("grpo_all-2", kind="grpo", init_ckpt=None)
    rest = stage("grpo-3", kind="grpo", init_ckpt=str(first / "checkpoints" / "last.ckpt"))
    for name, scored in (("sft_eval", sft), ("grpo_eval", rest)):
        folder = job_dir / "stages" / name
        folder.mkdir(parents=True)
        model = {"model": {"name_or_path": str(scored / "model")}}
        (folder / "stage.json").write_text(json.dumps({"kind": "eval", "config": model}))
    job = Job("0", {}, {}, curves=[first / "csv" / "metrics.csv"], folder=job_dir)
    assert Run(job, "0", {}, "sft_eval").curves is None
    assert Run(job, "0", {}, "grpo_eval").curves == [
        rest / "csv" / "metrics.csv",
        first / "csv" / "metrics.csv",
    ]


def test_zero_variance_over_all_grpo_epochs_and_over_the_arms_own(tmp_path):
    """A Table 7 arm's zero-variance share over its own composition epochs leaves out the
    prefix every arm shares; the share over all its GRPO epochs includes it."""
    from hcm.aggregate import Run
    from hcm.report import Job
    from hcm.science import run_zero_variance

    def stage(name: str, shares: list[float], **marker) -> Path:
        folder = tmp_path / name
        (folder / "csv").mkdir(parents=True)
        rows = "".join(f"{i},{v}\n" for i, v in enumerate(shares))
        (folder / "csv" / "metrics.csv").write_text("step,train/zero_variance_groups\n" + rows)
        (folder / "stage.json").write_text(json.dumps({"kind": "grpo", **marker}))
        return folder

    first = stage("grpo_all", [0.6, 0.6, 0.6], init_ckpt=None)
    arm = stage("grpo", [0.2], init_ckpt=str(first / "checkpoints" / "last.ckpt"))
    evaluation = tmp_path / "job" / "stages" / "grpo_eval"
    evaluation.mkdir(parents=True)
    model = {"model": {"name_or_path": str(arm / "model")}}
    (evaluation / "stage.json").write_text(json.dumps({"kind": "eval", "config": model}))
    run = Run(Job("0", {}, {}, folder=tmp_path / "job"), "0", {}, "grpo_eval")
    assert run_zero_variance(run) == pytest.approx(0.5)  # (0.6 * 3 + 0.2) / 4
    assert run_zero_variance(run, own=True) == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("values", "label"),
    [([417], "417"), ([417, 417], "417"), ([417, 297, 97], "270 (97-417)"), ([], "?")],
)
def test_row_labels_carry_each_seeds_mining_count(values, label):
    from hcm.report import count_label

    assert count_label(values) == label
