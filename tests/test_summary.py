"""hcm.summary on hand-made stage folders: which stages get a row, the intervals, which earlier
stage each one is compared with, the table, and the curves (skipped where a log is missing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hcm.screening import DIMENSIONS
from hcm.stats import difference_interval, wilson_interval
from hcm.summary import curve_panels, read_stage, to_markdown, write_summary

DIMS = dict(zip(DIMENSIONS, (40.0, 50.0, 60.0, 70.0), strict=True))
SIZES = {"N": 10.0, "1": 40.0, "2": 30.0, "3": 10.0, "4": 5.0, "invalid": 5.0}


def scores(prefix: str, overall: float, count: int = 100) -> dict[str, float]:
    m = {"overall": overall, "count": count, "exact_match": overall / 2, "mean_dpa": overall / 3}
    m |= {"valid_rate": 90.0, "random_baseline": 34.0, **DIMS}
    m |= {f"random_baseline/{d}": 30.0 + i for i, d in enumerate(DIMENSIONS)}
    m |= {"judgement/balanced": overall - 5, "judgement/left_out_unacceptable": overall}
    m |= {"judgement/kept_acceptable": overall - 10, "verdicts_stated": 80.0, "faithful": 75.0}
    m |= {f"answer_size/{k}": v for k, v in SIZES.items()}
    return {prefix + k: v for k, v in m.items()}


def train_stage(
    run: Path, name: str, kind: str, metrics: dict, log: list[dict] | None = None, **marker
) -> Path:
    folder = run / "stages" / name
    folder.mkdir(parents=True)
    done = {
        "kind": kind,
        "model_dir": str(folder / "model"),
        "config": {"data": {"eval_split": "test"}},
        "metrics": {"train/loss": 1.0, **metrics},
        **marker,
    }
    (folder / "stage.json").write_text(json.dumps(done))
    if log:
        keys = sorted({k for row in log for k in row})
        lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in log]
        (folder / "csv").mkdir()
        (folder / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
    return folder


def eval_stage(
    run: Path, name: str, model: Path, metrics: dict, right: dict[str, bool] | None = None
) -> Path:
    """An evaluation folder; with `right` (id -> correct), its predictions.jsonl."""
    folder = run / "stages" / name
    folder.mkdir(parents=True)
    payload = {"metrics": metrics, "model": str(model), "split": "test"}
    (folder / "metrics.json").write_text(json.dumps(payload))
    if right is not None:
        rows = [json.dumps({"id": i, "correct": c}) for i, c in right.items()]
        (folder / "predictions.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture
def run(tmp_path) -> Path:
    """SFT 50/100 -> GRPO 60/100 (final validation) -> eval of the GRPO model 62/100, plus a
    stage that never validated and an evaluation on another number of samples."""
    run = tmp_path / "run"
    sft_log = [{"step": s, "epoch": 0, "train/loss": 3.0 - s} for s in range(3)]
    sft_log.append({"step": 2, "epoch": 0, "val/score/overall": 50.0})
    train_stage(run, "sft", "sft", scores("val/score/", 50.0), sft_log)
    train_stage(run, "no_val", "sft", {})
    grpo_log = [
        {"step": s, "epoch": s // 2, "train/reward/total": 0.1 * s, "train/kl": 0.01 * s}
        for s in range(4)
    ]
    grpo_log += [{"step": 1, "epoch": 0, "val/score/overall": 55.0}]
    grpo_log += [{"step": 3, "epoch": 1, "val/score/overall": 60.0}]
    grpo = train_stage(run, "grpo", "grpo", scores("val/score/", 60.0), grpo_log)
    eval_stage(run, "eval", grpo / "model", scores("test/score/", 62.0))
    eval_stage(run, "eval_small", grpo / "model", scores("test/score/", 50.0, count=16))
    return run


def test_summary_rows_intervals_and_deltas(run, capsys):
    summary = write_summary(run, ["sft", "no_val", "grpo", "eval", "eval_small", "absent"])
    assert json.loads((run / "summary.json").read_text()) == summary
    stages = summary["stages"]
    assert list(stages) == ["sft", "grpo", "eval", "eval_small"]  # no held-out score: no row
    assert summary["random_baseline"] == 34.0
    assert summary["random_baseline_dimensions"] == {d: 30.0 + i for i, d in enumerate(DIMENSIONS)}
    for name, overall in (("sft", 50.0), ("grpo", 60.0), ("eval", 62.0)):
        row = stages[name]
        assert (row["overall"], row["count"], row["exact_match"]) == (overall, 100, overall / 2)
        assert (row["mean_dpa"], row["valid_rate"]) == (overall / 3, 90.0)
        assert {d: row[d] for d in DIMENSIONS} == DIMS
        assert row["judgement"] == {
            "balanced": overall - 5,
            "left_out_unacceptable": overall,
            "kept_acceptable": overall - 10,
        }
        assert (row["verdicts_stated"], row["faithful"], row["answer_size"]) == (80.0, 75.0, SIZES)
        lo, hi = wilson_interval(overall, 100)
        assert row["overall_ci"] == pytest.approx([100 * lo, 100 * hi])
    assert stages["sft"]["kind"] == "sft" and stages["eval"]["kind"] == "eval"
    assert "delta_vs_previous" not in stages["sft"]
    # GRPO against the SFT model it started from
    d, lo, hi = difference_interval(50, 100, 60, 100)
    delta = stages["grpo"]["delta_vs_previous"]
    assert delta["stage"] == "sft" and delta["overall"] == pytest.approx(100 * d)
    assert delta["overall_ci"] == pytest.approx([100 * lo, 100 * hi])
    assert delta["interval"] == "unpaired"  # a validation writes no predictions
    # the evaluation scored the GRPO model: compared with SFT, not with GRPO's own validation
    assert stages["eval"]["delta_vs_previous"]["stage"] == "sft"
    assert stages["eval"]["delta_vs_previous"]["overall"] == pytest.approx(12.0)
    # 16 samples are not the same held-out set as 100: nothing to compare with
    assert "delta_vs_previous" not in stages["eval_small"]

    table = (run / "summary.md").read_text()
    assert table in capsys.readouterr().out  # printed as written
    lines = table.splitlines()
    assert lines[2].startswith("| Random | - | 34.00 | 16 |")
    assert lines[3].startswith(
        "| sft | sft, last validation | 50.00 [40.38, 59.62] | 100 | 25.00 | 45.00 | 75.00 |"
    )
    assert lines[5].startswith("| eval | test of grpo | 62.00 [")
    assert lines[4].endswith("| +10.00 [-3.79, +23.39] vs sft (unpaired) |")
    sizes = table.split("(% of answers):\n\n")[1].splitlines()
    assert sizes[0] == "| Stage | N | 1 | 2 | 3 | 4 | invalid | CoT states all four verdicts |"
    assert sizes[2] == "| sft | 10.00 | 40.00 | 30.00 | 10.00 | 5.00 | 5.00 | 80.00 |"
    assert (run / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_chain_the_stages_and_skip_missing_logs(run):
    folders = [run / "stages" / n for n in ("sft", "no_val", "grpo", "eval")]
    panels = {p.title.split(" (")[0]: p for p in curve_panels(folders, 34.0)}
    assert panels["SFT loss"].series == [("sft", [0.0, 1.0, 2.0], [3.0, 2.0, 1.0])]
    assert panels["GRPO reward"].series == [
        ("grpo", [0.0, 1.0, 2.0, 3.0], pytest.approx([0.0, 0.1, 0.2, 0.3]))
    ]
    assert panels["GRPO KL"].series[0][0] == "grpo"
    # per epoch, each training stage after the previous one; the random level as a reference
    held_out = panels["held-out score"]
    assert held_out.series == [("sft", [0.0], [50.0]), ("grpo", [1.0, 2.0], [55.0, 60.0])]
    assert held_out.hline == ("random", 34.0)


def grpo_log(steps: range, per_epoch: int) -> list[dict]:
    """A GRPO stage's CSV rows as Lightning writes them: the steps and epochs it counted, a
    validation at each epoch's last step."""
    rows = [{"step": s, "epoch": s // per_epoch, "train/reward/total": 0.1 * s} for s in steps]
    ends = [r for r in rows if r["step"] % per_epoch == per_epoch - 1]
    return rows + [
        {"step": r["step"], "epoch": r["epoch"], "val/score/overall": 40.0} for r in ends
    ]


def test_a_continued_stage_follows_on_the_stage_it_continued(tmp_path):
    """grpo continues grpo_all's checkpoint (continue_from): Lightning restores the step and
    epoch counters, so its log starts at grpo_all's end (step 8, epoch 2) and its curves must
    follow on grpo_all's, not be shifted past grpo_all's length a second time. The stages are
    links into the stage store, as in a pipeline; init_ckpt names the store's folder."""
    store, run = tmp_path / "store", tmp_path / "run"
    train_stage(store, "sft-1", "sft", {}, [{"step": 0, "epoch": 0, "val/score/overall": 30.0}])
    first = train_stage(store, "grpo_all-2", "grpo", {}, grpo_log(range(8), per_epoch=4))
    ckpt = first / "checkpoints" / "last.ckpt"
    train_stage(
        store, "grpo-3", "grpo", {}, grpo_log(range(8, 16), per_epoch=4), init_ckpt=str(ckpt)
    )
    (run / "stages").mkdir(parents=True)
    for name, folder in (("sft", "sft-1"), ("grpo_all", "grpo_all-2"), ("grpo", "grpo-3")):
        (run / "stages" / name).symlink_to(store / "stages" / folder)
    folders = [run / "stages" / n for n in ("sft", "grpo_all", "grpo")]
    panels = {p.title.split(" (")[0]: p for p in curve_panels(folders, None)}
    reward = {name: xs for name, xs, _ in panels["GRPO reward"].series}
    assert reward == {
        "grpo_all": list(map(float, range(8))),
        "grpo": list(map(float, range(8, 16))),
    }
    held_out = {name: xs for name, xs, _ in panels["held-out score"].series}
    assert held_out == {"sft": [0.0], "grpo_all": [1.0, 2.0], "grpo": [3.0, 4.0]}


@pytest.mark.parametrize(("composition", "switch"), [("all_plus_hard", 8.0), ("all", None)])
def test_the_reward_panel_has_epoch_means_and_the_switch(tmp_path, composition, switch):
    """Over the per-step reward: each epoch's mean at its middle step, and a line where the
    hard cases start (the first step of data.switch_epoch; none when the data stays `all`)."""
    run = tmp_path / "run"
    data = {"eval_split": "test", "switch_epoch": 2}
    first = train_stage(
        run, "grpo_all", "grpo", {}, grpo_log(range(8), per_epoch=4), config={"data": data}
    )
    data = {**data, "composition": composition}
    ckpt = str(first / "checkpoints" / "last.ckpt")
    log = grpo_log(range(8, 16), per_epoch=4)
    train_stage(run, "grpo", "grpo", {}, log, init_ckpt=ckpt, config={"data": data})
    (reward,) = [p for p in curve_panels([first, run / "stages" / "grpo"], None) if p.trends]
    assert reward.title.startswith("GRPO reward")
    assert [(name, xs) for name, xs, _ in reward.trends] == [
        ("grpo_all", [1.5, 5.5]),
        ("grpo", [9.5, 13.5]),
    ]
    assert [ys for _, _, ys in reward.trends] == [
        pytest.approx([0.15, 0.55]),
        pytest.approx([0.95, 1.35]),
    ]
    want = None if switch is None else (f"switch epoch 2: {composition}", switch)
    assert reward.vline == want


def test_no_logs_no_figure_and_no_scores_no_summary(tmp_path):
    run = tmp_path / "run"
    train_stage(run, "sft", "sft", scores("val/score/", 50.0))  # no CSV log
    summary = write_summary(run, ["sft"])
    assert list(summary["stages"]) == ["sft"] and not (run / "summary.png").exists()
    assert write_summary(tmp_path / "empty", ["sft"]) == {}
    assert not (tmp_path / "empty" / "summary.json").exists()


def test_read_stage_needs_a_held_out_score(tmp_path):
    folder = train_stage(tmp_path, "s", "sft", {"val/score/overall": 1.0})  # no count
    assert read_stage(folder) is None
    assert read_stage(tmp_path / "missing") is None


def test_table_without_earlier_stage_has_no_delta():
    summary = {
        "random_baseline": 35.0,
        "random_baseline_dimensions": dict.fromkeys(DIMENSIONS, 35.0),
        "stages": {
            "eval": {"kind": "eval", "model": "/m", "overall": 0.0, "overall_ci": [0.0, 19.36],
                     "count": 16, "exact_match": 0.0, "mean_dpa": 0.0, "valid_rate": 0.0,
                     **dict.fromkeys(DIMENSIONS, 0.0), "judgement": {"balanced": 50.0},
                     "faithful": None, "verdicts_stated": 0.0, "answer_size": SIZES},
        },
    }  # fmt: skip
    last = to_markdown(summary).splitlines()[-1]
    assert last == "| eval | 10.00 | 40.00 | 30.00 | 10.00 | 5.00 | 5.00 | 0.00 |"
    row = to_markdown(summary).split("\n\n")[0].splitlines()[-1]
    assert row == "| eval | test of m | 0.00 [0.00, 19.36] | 16 | 0.00 | 50.00 | n/a | 0.00 | " + (
        "0.00 | 0.00 | 0.00 | 0.00 | 0.00 | - |"
    )


def test_a_dimension_without_samples_gets_no_score(tmp_path):
    """The CPU setting has no appearance defects: that column says n/a, not a score of 0."""
    run = tmp_path / "run"
    absent, present = DIMENSIONS[0], DIMENSIONS[1:]
    metrics = scores("test/score/", 70.0) | {f"test/score/{absent}": 0.0}
    metrics |= {f"test/score/count/{absent}": 0.0}
    metrics |= {f"test/score/count/{d}": 40.0 for d in present}
    eval_stage(run, "eval", run / "model", metrics)
    summary = write_summary(run, ["eval"])
    assert summary["stages"]["eval"][absent] is None
    assert summary["random_baseline_dimensions"][absent] is None
    assert all(summary["stages"]["eval"][d] is not None for d in present)
    random_row = to_markdown(summary).splitlines()[2].split(" | ")
    assert random_row[9] == "n/a" and random_row[10] == "31.00"


def test_two_evaluations_of_the_same_samples_are_paired(tmp_path):
    """SFT right on ids 0-49, GRPO on 5-64: 5 samples only SFT got right, 15 only GRPO."""
    run = tmp_path / "run"
    ids = [f"t{i:03d}" for i in range(100)]
    sft = {i: k < 50 for k, i in enumerate(ids)}
    grpo = {i: 5 <= k < 65 for k, i in enumerate(ids)}
    metrics = scores("test/score/", 50.0)
    del metrics["test/score/faithful"]  # no CoT stated all four verdicts: the metric has none
    eval_stage(run, "sft_eval", run / "sft", metrics, sft)
    eval_stage(run, "grpo_eval", run / "grpo", scores("test/score/", 60.0), grpo)
    # a third model whose predictions hold other ids: the unpaired interval, labelled so
    other = {f"x{k}": k < 60 for k in range(100)}
    eval_stage(run, "other_eval", run / "other", scores("test/score/", 60.0), other)
    summary = write_summary(run, ["sft_eval", "grpo_eval", "other_eval"])
    stages = summary["stages"]
    assert stages["sft_eval"]["faithful"] is None
    delta = stages["grpo_eval"]["delta_vs_previous"]
    # Bonett-Price on b = 5, c = 15 of 100 (tests/test_stats.py): [+0.99, +18.61]
    assert (delta["stage"], delta["interval"], delta["discordance"]) == ("sft_eval", "paired", 20.0)
    assert delta["overall"] == pytest.approx(10.0)
    assert delta["overall_ci"] == pytest.approx([0.99424, 18.6136], abs=1e-3)
    unpaired = stages["other_eval"]["delta_vs_previous"]
    _, lo, hi = difference_interval(60, 100, 60, 100)
    assert (unpaired["stage"], unpaired["interval"]) == ("grpo_eval", "unpaired")
    assert unpaired["overall_ci"] == pytest.approx([100 * lo, 100 * hi])
    assert "discordance" not in unpaired
    lines = (run / "summary.md").read_text().splitlines()
    assert lines[3].split(" | ")[6] == "n/a"  # faithful of sft_eval
    assert lines[4].endswith("| +10.00 [+0.99, +18.61] vs sft_eval (paired, 20.00% discordant) |")
    assert lines[5].endswith(" vs grpo_eval (unpaired) |")
