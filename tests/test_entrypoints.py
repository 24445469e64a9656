"""train.py / eval.py through Hydra on the tiny model: SFT learns, stages chain and resume,
eval prints and saves the Table-3 layout, paper experiments compose with the paper's settings."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hcm.config import ConfigError
from hcm.data.hard_cases import HardCaseSet
from hcm.screening import DIMENSIONS
from hcm.stats import wilson_interval
from hcm.train import compose_stages, train

REPO = Path(__file__).resolve().parents[1]


def logged(run_dir: Path, key: str) -> list[float]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


@pytest.mark.slow
def test_sft_training_loss_goes_down(compose_cfg):
    cfg = compose_cfg(
        "train",
        ["experiment=tiny_sft", "trainer.max_epochs=4", "trainer.check_val_every_n_epoch=10"],
    )
    train(cfg)
    losses = logged(Path(cfg.paths.output_dir), "train/loss")
    assert len(losses) == 4 * 6  # 24 samples / batch 4, 4 epochs
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.8 * first, (first, last)
    done = json.loads((Path(cfg.paths.output_dir) / "stage.json").read_text())
    assert done["kind"] == "sft" and set(done["manifest_hashes"]) == {"train", "test"}
    assert (Path(cfg.paths.output_dir) / "model" / "config.json").is_file()


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_train_then_eval_cli(tmp_path, hcm_root):
    out = tmp_path / "sft"
    r = run_cli(
        str(REPO / "train.py"),
        "experiment=tiny_sft",
        "trainer.max_epochs=1",
        "keep_checkpoints=true",  # evaluated from its Lightning checkpoint below
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "model").is_dir()

    ev = tmp_path / "eval"
    r = run_cli(
        str(REPO / "eval.py"),
        "experiment=tiny_eval",
        f"model.name_or_path={out / 'model'}",
        "model.tiny=null",
        "prompt=direct",
        f"hydra.run.dir={ev}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| Models | Prompt Type | Overall Score | Appearance Deformation |" in r.stdout
    assert "| Random | - |" in r.stdout and "| Direct |" in r.stdout
    result = json.loads((ev / "metrics.json").read_text())
    m = result["metrics"]
    assert m["test/score/count"] == 16
    # the random baseline is mean answer length / 5 over the same 16 test samples
    assert 0 < m["test/score/random_baseline"] < 100
    assert result["prompt"] == "direct" and "test" in result["manifest_hashes"]

    ck = tmp_path / "eval_ckpt"
    r = run_cli(
        str(REPO / "eval.py"),
        "experiment=tiny_eval",
        "prompt=direct",
        f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}",
        f"hydra.run.dir={ck}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # the Lightning checkpoint holds the exported model's weights: the same greedy answers
    assert json.loads((ck / "metrics.json").read_text())["metrics"] == m


def test_help_lists_groups_and_experiments(tmp_path):
    r = run_cli(str(REPO / "train.py"), "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for word in ("experiment:", "tiny_hcm", "hcm_2b", "module:", "grpo", "data:", "synthetic"):
        assert word in r.stdout, word


def check_summary(run: Path) -> dict:
    """summary.json at the run's root: a row per stage holding its own files' held-out score."""
    summary = json.loads((run / "summary.json").read_text())
    stages = summary["stages"]
    assert list(stages) == ["sft_1_1", "sft_1_2", "grpo", "eval"]
    test = json.loads((run / "stages" / "eval" / "metrics.json").read_text())["metrics"]
    assert summary["random_baseline"] == test["test/score/random_baseline"]
    for name, row in stages.items():
        folder = run / "stages" / name
        if name == "eval":
            own = {k.removeprefix("test/score/"): v for k, v in test.items()}
        else:
            done = json.loads((folder / "stage.json").read_text())["metrics"]
            own = {k.removeprefix("val/score/"): v for k, v in done.items()}
        keys = ("overall", "count", "exact_match", "mean_dpa", "valid_rate", *DIMENSIONS)
        assert {k: row[k] for k in keys} == {k: own[k] for k in keys}, name
        assert row["count"] == 16 and row["split"] == "test"
        k = round(row["overall"] * 16 / 100)
        assert row["overall_ci"] == [100 * x for x in wilson_interval(k, 16)]
    assert "delta_vs_previous" not in stages["sft_1_1"]
    assert stages["grpo"]["delta_vs_previous"]["stage"] == "sft_1_2"
    assert stages["eval"]["delta_vs_previous"]["stage"] == "sft_1_2"  # eval scores GRPO's model
    mined = HardCaseSet.load(run / "stages" / "grpo" / "hard_cases.json")
    assert stages["grpo"]["hard_cases"] == len(mined.hard_ids)
    assert stages["grpo"]["train_cases"] == len(mined.hard_ids) + len(mined.easy_ids) == 24
    assert (run / "summary.png").is_file() and (run / "summary.md").is_file()
    return summary


@pytest.mark.slow
def test_pipeline_chains_resumes_and_refuses_changed_config(compose_cfg):
    grpo = "'data.composition=all_plus_hard','trainer.max_epochs=2','trainer.limit_train_batches=1'"
    overrides = ["experiment=tiny_hcm", f"pipeline.grpo.overrides=[{grpo}]"]
    cfg = compose_cfg("train", overrides)
    metrics = train(cfg)
    stages = Path(cfg.paths.output_dir) / "stages"
    assert metrics["test/score/count"] == 16
    for name in ("sft_1_1", "sft_1_2", "grpo"):
        assert (stages / name / "stage.json").is_file(), name
        # finished, exported, continued by no stage: its checkpoints (weights and AdamW) are gone
        assert not (stages / name / "checkpoints").exists(), name
    grpo = json.loads((stages / "grpo" / "stage.json").read_text())
    assert grpo["init_model"] == str((stages / "sft_1_2").resolve() / "model")
    hard = json.loads((stages / "grpo" / "hard_cases.json").read_text())
    assert hard  # the mining cache of the initial (SFT 1.2) policy
    mtime = (stages / "grpo" / "model" / "model.safetensors").stat().st_mtime
    summary = check_summary(Path(cfg.paths.output_dir))

    train(compose_cfg("train", overrides))  # a rerun skips the finished stages
    assert (stages / "grpo" / "model" / "model.safetensors").stat().st_mtime == mtime
    # ... and summarises them all the same (the eval stage ran again: same greedy answers)
    assert json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text()) == summary

    # a finished stage is reused only while the files it read are the same: relabel the
    # training split in place (same path, same config) and the stages that read it refuse
    sft = json.loads((stages / "sft_1_2" / "stage.json").read_text())
    manifest = Path(sft["config"]["data"]["root"]) / "train.jsonl"
    original = manifest.read_text()
    relabelled = [json.loads(line) | {"answer": "N"} for line in original.splitlines()]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in relabelled))
    with pytest.raises(ConfigError, match=rf"changed since: {manifest.resolve()}"):
        train(compose_cfg("train", overrides))
    manifest.write_text(original)

    # without the stage store, the job's own folders refuse another config ...
    changed = compose_cfg("train", [*overrides, "seed=1", "paths.stage_store=null"])
    with pytest.raises(ConfigError, match="another config"):
        train(changed)
    # ... with it, another config is another stage folder, and the first one stays as it was
    first = (stages / "grpo").resolve()
    train(compose_cfg("train", [*overrides, "seed=1"]))
    assert (stages / "grpo").resolve() != first
    assert (first / "model" / "model.safetensors").stat().st_mtime == mtime


@pytest.mark.parametrize("size", ["1b", "2b"])
def test_paper_experiments_match_table_2(compose_cfg, size):
    sft = compose_cfg("train", [f"experiment=sft_{size}"])
    assert sft.module.freeze == {"vision_tower": True, "projector": True, "language_model": False}
    assert (sft.data.batch_size, sft.trainer.max_epochs) == (8, 5)
    assert sft.model.name_or_path == f"OpenGVLab/InternVL3-{size.upper()}-hf"
    assert sft.model.trust_remote_code is False

    rl = compose_cfg("train", [f"experiment=rl_{size}"])
    m = rl.module
    assert m.freeze == {"vision_tower": False, "projector": False, "language_model": False}
    assert (m.group_size, m.beta, rl.trainer.max_epochs, rl.data.switch_epoch) == (4, 0.04, 5, 3)
    assert OmegaConf.to_container(m.sampling) | {"max_new_tokens": 0} == {
        "temperature": 1.0,
        "top_k": 3,
        "top_p": 0.8,
        "max_new_tokens": 0,
    }
    assert rl.data.batch_size * m.group_size == 8  # completions per device, as SWIFT/TRL count

    rows = {
        "grpo": ("accuracy", "all"),
        "dpa_grpo": ("dpa", "all"),
        "hcm": ("dpa", "all_plus_hard"),
    }
    for exp, (reward, composition) in rows.items():
        cfg = compose_cfg("train", [f"experiment={exp}_{size}"])
        # compose the stages exactly as the pipeline will, and check what they train
        composed = {name: stage for name, _, stage in compose_stages(cfg)}
        split = exp != "grpo"  # DPA-GRPO and HCM-GRPO: the epochs before the switch apart
        names = ["sft_1_1", "sft_1_2", *(["grpo_all"] if split else []), "grpo", "eval"]
        assert list(composed) == names
        sft_model = str(Path(composed["sft_1_2"].paths.output_dir) / "model")
        assert composed["grpo"].model.name_or_path == sft_model  # the KL reference, the miner
        for name in ("grpo_all", "grpo") if split else ("grpo",):
            stage = composed[name]
            assert stage.module.rewards[reward] == 1.0 and stage.module.rewards.format == 1.0
            other = {"accuracy": "dpa", "dpa": "accuracy"}[reward]
            assert stage.module.rewards[other] == 0.0
            assert stage.trainer.max_epochs == 5 and stage.data.switch_epoch == 3
        assert composed["grpo"].data.composition == composition
        if split:
            first = composed["grpo_all"]
            assert first.data.composition == "all" and first.module.stop_at_switch
            assert composed["grpo"].init_ckpt == str(
                Path(first.paths.output_dir) / "checkpoints/last.ckpt"
            )
        sft11 = compose_cfg(
            "train",
            [f"experiment={cfg.pipeline.sft_1_1.experiment}", *cfg.pipeline.sft_1_1.overrides],
        )
        assert list(sft11.data.sft_sources) == ["caption", "weak_cot"]
