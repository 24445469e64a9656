"""The tiny twin of every paper-table sweep through Hydra's real multirun (`train.py -m` /
`eval.py -m`, in-process), then the report: every paper row filled from the jobs' metrics.json."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from test_api_eval import SECRET, StubEndpoint
from test_benchmarks import write_all_fixtures

from hcm.report import build_rows, read_multirun, report

REPO = Path(__file__).resolve().parents[1]

# The paper's rows (first label column), table by table.
PAPER_ROWS = {
    "table3": [
        "Random", "API-based models", "GPT4o", "GPT4o", "Qwen-VL-Max", "Qwen-VL-Max",
        "Qwen-VL-Plus", "Qwen-VL-Plus", "Open-source MLLMs", "GLM-4.5V", "GLM-4.5V",
        "Qwen3-VL-30B-A3B-Instruct", "Qwen3-VL-30B-A3B-Instruct", "Qwen3-VL-8B-Instruct",
        "Qwen3-VL-8B-Instruct", "Qwen2.5-VL-72B-Instruct", "Qwen2.5-VL-72B-Instruct",
        "InternVL3.5-30B-A3B", "InternVL3.5-30B-A3B", "InternVL3.5-38B", "InternVL3.5-38B",
        "InternVL3-78B", "InternVL3-78B", "InternVL3-38B", "InternVL3-38B",
        "HCM-GRPO-1B (Ours)", "HCM-GRPO-2B (Ours)",
    ],
    "table4": [
        "InternVL3-1B", "InternVL3-1B", "+SFT", "+GRPO",
        "InternVL3-2B", "InternVL3-2B", "+SFT", "+GRPO",
    ],
    "table5": [
        "InternVL3-1B", "Exp1", "Exp2", "Exp3", "Exp4",
        "InternVL3-2B", "Exp1", "Exp2", "Exp3", "Exp4",
    ],
    "table6": [
        "InternVL3-1B-CoT", "+GRPO", "+DPA-GRPO", "+HCM-GRPO",
        "InternVL3-2B-CoT", "+GRPO", "+DPA-GRPO", "+HCM-GRPO",
    ],
    "table7": [
        "InternVL3-2B-CoT", "{hard} Hard Cases Only", "{easy} Easy Cases Only",
        "All {all} Samples (DPA-GRPO)", "All {all} Samples + {hard} Random Samples",
        "All {all} Samples + {hard} Hard Cases (HCM-GRPO)",
    ],
    "table8": ["InternVL3-2B", "+SFT", "+SFT, +GRPO", "+SFT, +HCM-GRPO"],
    "table9": ["InternVL3-1B", "+SFT", "+SFT, +GRPO", "+SFT, +HCM-GRPO"],
    "table10": [
        "InternVL3-1B", "+SFT", "+SFT, +GRPO", "+SFT, +HCM-GRPO",
        "InternVL3-2B", "+SFT", "+SFT, +GRPO", "+SFT, +HCM-GRPO",
    ],
}  # fmt: skip


@pytest.fixture
def one_thread():
    """Tiny models are overhead-bound: one thread each avoids contention on small CI machines."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def multirun(script: str, sweep: str, sweep_dir: Path, *overrides: str, fails: bool = False):
    """`python <script> -m +sweeps=<sweep> ...` in this process (imports are paid once).

    Hydra runs every job and exits non-zero at the end when one failed: `fails` expects that.
    """
    argv = [
        str(REPO / script),
        "-m",
        f"hydra.searchpath=[file://{REPO}]",  # sweeps/ as the `sweeps` config group
        f"+sweeps={sweep}",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    ]
    saved = sys.argv
    GlobalHydra.instance().clear()
    try:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        assert bool(e.code) == fails, f"{script} -m +sweeps={sweep} exited with {e.code}"
    else:
        assert not fails, f"{script} -m +sweeps={sweep} succeeded; a failed job was expected"
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()


def check_table(table: str, sweep_dir: Path, failed: tuple[int, ...] = ()) -> list:
    """The report's rows are the paper's, all filled but the `failed` ones; returns them."""
    markdown = report(str(sweep_dir))
    spec, name, jobs = read_multirun(sweep_dir)
    rows = build_rows(spec, jobs)
    counts = next((j.counts for j in jobs if j.counts), {})
    expected = [label.format(**counts) for label in PAPER_ROWS[table]]
    assert [r.labels[0] for r in rows] == expected, markdown
    statuses = [r.status for r in rows]
    assert [i for i, st in enumerate(statuses) if st == "failed"] == list(failed), markdown
    assert set(statuses) <= {"ok", "section", "failed"}, markdown
    assert (sweep_dir / f"{name}.md").read_text() == markdown
    csv_rows = (sweep_dir / f"{name}.csv").read_text().splitlines()[1:]
    assert [line.rsplit(",", 2)[1] for line in csv_rows] == [
        r.status for r in rows if r.status != "section"
    ]
    for row in rows:  # every number comes from a metrics.json on the tiny test subset
        if row.status == "ok" and row.job:
            job = next(j for j in jobs if j.name == row.job)
            counted = {p["metrics"].get("test/score/count") for p in job.evals.values()}
            assert counted == {4.0}, (row.labels, counted)
    return rows


def stage_config(sweep_dir: Path, job: int, stage: str) -> dict:
    return json.loads((sweep_dir / str(job) / "stages" / stage / "stage.json").read_text())


def stage_folder(sweep_dir: Path, job: int, stage: str) -> Path:
    """The shared folder a job's stages/<stage> links to (the stage store)."""
    link = sweep_dir / str(job) / "stages" / stage
    assert link.is_symlink(), link
    return link.resolve()


def store_snapshot(store: Path) -> dict[str, str]:
    """Each finished stage in the store and when it finished: what a rerun must leave alone."""
    return {
        marker.parent.name: json.loads(marker.read_text())["finished_at"]
        for marker in store.glob("*/stage.json")
    }


def rerun_trains_nothing(sweep: str, sweep_dir: Path, store: Path, **kw) -> None:
    before = store_snapshot(store)
    multirun("train.py", sweep, sweep_dir.with_name(sweep_dir.name + "-rerun"), **kw)
    assert store_snapshot(store) == before


@pytest.mark.slow
def test_table3_twin_api_and_local_models(tmp_path, hcm_root, monkeypatch, one_thread):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("DASHSCOPE_API_KEY", SECRET + "-dashscope")
    with StubEndpoint(reply="<think>fine</think><answer>A</answer>") as stub:
        for var in ("OPENAI_BASE_URL", "DASHSCOPE_BASE_URL", "HCM_OPEN_MODELS_BASE_URL"):
            monkeypatch.setenv(var, stub.url)
        multirun("eval.py", "table3_tiny", tmp_path / "t3")
    rows = check_table("table3", tmp_path / "t3")
    # 7 API models x 2 prompts x 4 questions; the key each provider's experiment names
    auth = [r["auth"] for r in stub.requests]
    assert len(auth) == 56
    assert auth.count(f"Bearer {SECRET}") == 8 and auth.count(f"Bearer {SECRET}-dashscope") == 16
    assert auth.count(None) == 32
    by_label = {tuple(r.labels): r for r in rows}
    # The stub answers A: the score is the share of the 4 test questions where A is acceptable.
    test_split = next((hcm_root / "data").glob("synthetic-*/test.jsonl"))
    answers = [json.loads(line)["answer"] for line in test_split.open()][:4]
    expected = 100.0 * sum("A" in a for a in answers) / 4
    for prompt in ("Direct", "CoT"):
        assert by_label[("GPT4o", prompt)].values["overall"] == pytest.approx(expected)
    assert by_label[("Random", "-")].values["overall"] == pytest.approx(
        100.0 * sum(len(a) for a in answers) / 4 / 5
    )
    for f in (tmp_path / "t3").rglob("*"):
        if f.is_file() and f.suffix in (".json", ".yaml", ".log", ".jsonl", ".md", ".csv"):
            assert SECRET not in f.read_text(errors="ignore"), f


@pytest.mark.slow
def test_table4_twin(tmp_path, one_thread):
    multirun("train.py", "table4_tiny", tmp_path / "t4")
    check_table("table4", tmp_path / "t4")
    sft = stage_config(tmp_path / "t4", 1, "sft")["config"]
    assert sft["data"]["sft_sources"] == ["direct"] and sft["prompt"]["name"] == "direct"
    grpo = stage_config(tmp_path / "t4", 2, "grpo")["config"]
    assert grpo["module"]["rewards"] == {"format": 1.0, "accuracy": 1.0, "dpa": 0.0}


@pytest.mark.slow
def test_table5_twin(tmp_path, one_thread):
    multirun("train.py", "table5_tiny", tmp_path / "t5")
    rows = check_table("table5", tmp_path / "t5")
    assert rows[1].deltas["overall"] == rows[1].values["overall"] - rows[0].values["overall"]
    sources = [
        stage_config(tmp_path / "t5", j, "sft")["config"]["data"]["sft_sources"] for j in (1, 2, 3)
    ]
    assert sources == [["weak_cot"], ["caption", "weak_cot"], ["answer_cot"]]
    exp4 = stage_config(tmp_path / "t5", 4, "sft_1_2")
    assert Path(exp4["init_model"]).parent.name.startswith("sft_1_1-")  # in the stage store


@pytest.mark.slow
def test_table6_twin(tmp_path, stage_store, one_thread):
    """Every row of a model size starts from one SFT model, trained once; +DPA-GRPO and
    +HCM-GRPO share their first epochs; a rerun of the sweep trains nothing."""
    t6 = tmp_path / "t6"
    multirun("train.py", "table6_tiny", t6)
    check_table("table6", t6)
    rewards = [stage_config(t6, j, "grpo")["config"]["module"]["rewards"] for j in (1, 2, 3)]
    assert [r["accuracy"] for r in rewards] == [1.0, 0.0, 0.0]
    assert [r["dpa"] for r in rewards] == [0.0, 1.0, 1.0]
    for jobs in ((0, 1, 2, 3), (4, 5, 6, 7)):  # InternVL3-1B's rows, then -2B's
        assert len({stage_folder(t6, j, "sft_1_2") for j in jobs}) == 1
        sft = stage_folder(t6, jobs[0], "sft_1_2") / "model"
        inits = [stage_config(t6, j, "grpo")["init_model"] for j in jobs[1:]]
        assert inits == [str(sft)] * 3, inits
        dpa, hcm = jobs[2], jobs[3]
        assert stage_folder(t6, dpa, "grpo_all") == stage_folder(t6, hcm, "grpo_all")
        assert (stage_folder(t6, hcm, "grpo_all") / "hard_cases.json").is_file()
        starts = {stage_config(t6, j, "grpo")["init_ckpt"] for j in (dpa, hcm)}
        assert starts == {str(stage_folder(t6, hcm, "grpo_all") / "checkpoints/last.ckpt")}
    assert len(list(stage_store.glob("sft_1_1-*/stage.json"))) <= 2
    assert (t6 / "table6_tiny_curves.png").stat().st_size > 0
    rerun_trains_nothing("table6_tiny", t6, stage_store)


@pytest.mark.slow
def test_table7_twin(tmp_path, stage_store, one_thread):
    """The five arms share one SFT model, one hard set and one checkpoint at the switch, each
    trained once. The random tiny model answers every training question wrongly: no easy cases,
    so the easy-only job fails (the sampler refuses an empty set) and its row says so."""
    multirun("train.py", "table7_tiny", tmp_path / "t7", fails=True)
    arms = (0, 2, 3, 4)  # job 1, easy_only, failed
    assert len({stage_folder(tmp_path / "t7", j, "grpo_all") for j in range(5)}) == 1
    for stage in ("sft_1_1", "sft_1_2", "grpo_all"):  # trained once for the five arms
        assert len(list(stage_store.glob(f"{stage}-*/stage.json"))) == 1, stage
    first = [stage_config(tmp_path / "t7", j, "grpo") for j in arms]
    assert len({(m["init_model"], m["init_ckpt"]) for m in first}) == 1
    hard_sets = {json.dumps(m["hard_cases"]) for m in first}
    assert len(hard_sets) == 1 and json.loads(hard_sets.pop())["count"] == 24
    rows = check_table("table7", tmp_path / "t7", failed=(2,))
    assert [r.labels[0] for r in rows[1:3]] == ["24 Hard Cases Only", "0 Easy Cases Only"]
    compositions = [
        stage_config(tmp_path / "t7", j, "grpo")["config"]["data"]["composition"]
        for j in (0, 2, 3, 4)
    ]
    assert compositions == ["hard_only", "all", "all_plus_random", "all_plus_hard"]
    baseline = rows[3]
    assert baseline.deltas == {"overall": 0.0} and "(+0.00)" in report(str(tmp_path / "t7"))
    assert "| 0 Easy Cases Only | failed |" in report(str(tmp_path / "t7"))
    rerun_trains_nothing("table7_tiny", tmp_path / "t7", stage_store, fails=True)


@pytest.mark.slow
@pytest.mark.parametrize("table", ["table8", "table9", "table10"])
def test_benchmark_twins(table, tmp_path, hcm_root, one_thread):
    write_all_fixtures(hcm_root / "data")
    multirun("train.py", f"{table}_tiny", tmp_path / table)
    check_table(table, tmp_path / table)
    grpo = stage_config(tmp_path / table, 2, "grpo")["config"]
    assert grpo["module"]["rewards"]["choice"] == 1.0 and grpo["module"]["rewards"]["dpa"] == 0.0
    assert grpo["data"]["benchmark"] == {"table8": "realworldqa", "table9": "muirbench"}.get(
        table, "blink"
    )
    assert (tmp_path / table / "3" / "stages" / "grpo" / "hard_cases.json").is_file()
