"""The stage store (hcm/stages.py): which config keys make a stage another stage, the guard on
continuing stages, and the lock that keeps two jobs from training one stage twice."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import subprocess
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from hcm import fingerprints, stages
from hcm.config import ConfigError
from hcm.files import folder_lock

REPO = Path(__file__).resolve().parents[1]


def grpo(compose_cfg, *overrides: str):
    return compose_cfg("train", ["experiment=tiny_grpo", *overrides])


@pytest.mark.parametrize(
    ("override", "same_stage"),
    [
        ("seed=1", False),
        ("module.beta=0.0", False),
        ("module.optimizer.lr=0.5", False),
        ("data.composition=all_plus_hard", False),  # a GRPO stage's schedule
        ("trainer.max_epochs=7", False),
        ("max_completion_length=12", False),
        ("logger=none", True),
        ("task_name=elsewhere", True),
        ("data.num_workers=3", True),
        ("checkpoint_every_n_steps=5", True),
        ("paths.output_dir=/somewhere/else", True),
        ("++trainer.enable_progress_bar=false", True),
        ("module.log_completions_every_n_steps=7", True),
    ],
)
def test_what_makes_another_grpo_stage(compose_cfg, override, same_stage):
    base = stages.config_hash(grpo(compose_cfg))
    assert (stages.config_hash(grpo(compose_cfg, override)) == base) == same_stage


@pytest.mark.parametrize(
    ("override", "same_stage"),
    [
        ("data.composition=hard_only", True),  # no SFT stage reads GRPO's data schedule
        ("data.switch_epoch=2", True),
        ("data.sft_sources=[caption]", False),
        ("seed=3", False),
    ],
)
def test_sft_stages_ignore_grpo_only_keys(compose_cfg, override, same_stage):
    sft = ["experiment=tiny_sft", "trainer.max_epochs=3"]
    base = stages.config_hash(compose_cfg("train", sft))
    assert (stages.config_hash(compose_cfg("train", [*sft, override])) == base) == same_stage


def test_a_continuation_may_change_only_its_data_and_how_it_selects(compose_cfg):
    first = grpo(compose_cfg, "module.stop_at_switch=true", "data.composition=all")
    then = grpo(compose_cfg, "data.composition=hard_only", "init_ckpt=/x/last.ckpt")
    assert stages.continuation_changes(first, then) == []
    band = "module.difficulty_band={low:0.25,high:0.75,oversample:2}"
    online = grpo(compose_cfg, "data.composition=all_plus_random", band)
    assert stages.continuation_changes(first, online) == []  # a selection rule after the switch
    redraws = grpo(compose_cfg, "data.composition=all", "module.resample_zero_variance=2")
    assert stages.continuation_changes(first, redraws) == []
    lr = grpo(compose_cfg, "data.composition=hard_only", "module.optimizer.lr=0.5")
    assert stages.continuation_changes(first, lr) == ["module.optimizer.lr"]


def test_pipeline_refuses_a_continuation_that_changes_more(compose_cfg):
    from hcm.train import compose_stages

    bad = "pipeline.grpo.overrides=['data.composition=all_plus_hard','module.beta=0.1']"
    cfg = compose_cfg("train", ["experiment=cpu_hcm", bad])
    with pytest.raises(ConfigError, match=r"differs from it in module\.beta"):
        compose_stages(cfg)


def _hold(folder: str, seconds: float, started) -> None:
    with stages.claim(Path(folder)):
        started.set()
        time.sleep(seconds)


def _crash_holding(folder: str, started) -> None:
    with stages.claim(Path(folder)):
        started.set()
        time.sleep(30)  # killed here, never releasing by itself


def test_claim_waits_for_the_owner_and_outlives_a_crashed_one(tmp_path):
    ctx = mp.get_context("spawn")
    folder = tmp_path / "store" / "sft-0123"
    started = ctx.Event()
    owner = ctx.Process(target=_hold, args=(str(folder), 2.0, started))
    owner.start()
    assert started.wait(60)
    t0 = time.monotonic()
    with stages.claim(folder):
        waited = time.monotonic() - t0
    owner.join()
    assert waited > 0.5, waited  # it waited for the owner to finish

    started = ctx.Event()
    crashed = ctx.Process(target=_crash_holding, args=(str(folder), started))
    crashed.start()
    assert started.wait(60)
    crashed.kill()
    crashed.join()
    t0 = time.monotonic()
    with stages.claim(folder):  # the OS dropped the dead owner's lock: taken over at once
        assert time.monotonic() - t0 < 5


def test_a_rank_follows_only_its_own_live_rank_zero(tmp_path):
    """A rank > 0 of a DDP launch waits for its rank 0's token in the held lock: a token left
    by a dead holder (the lock is free) is not taken for it, and a rank 0 that has exited, or
    that never takes a lock nobody holds, ends the wait with an error instead of a hang."""
    folder = tmp_path / "store" / "grpo-0123"
    dead = subprocess.Popen(["true"])
    dead.wait()
    token = f"{dead.pid}:0ab1"
    folder.parent.mkdir(parents=True)
    (folder.parent / "grpo-0123.lock").write_text(token)  # its holder died: nobody holds it
    with pytest.raises(RuntimeError, match=f"pid {dead.pid}\\) exited"):
        stages.wait_for_rank_zero(folder, token, poll_s=0.01)
    alive = f"{os.getpid()}:0ab1"
    (folder.parent / "grpo-0123.lock").write_text(alive)
    with pytest.raises(RuntimeError, match="nobody has held"):
        stages.wait_for_rank_zero(folder, alive, poll_s=0.01, idle_s=0.2)
    with folder_lock(folder, token=alive):  # held with this launch's token: go
        stages.wait_for_rank_zero(folder, alive, poll_s=0.01, idle_s=0.2)


def test_link_points_a_job_at_the_shared_folder(tmp_path):
    shared, link = tmp_path / "store" / "grpo-abc", tmp_path / "job" / "stages" / "grpo"
    stages.link(link, shared)
    assert link.is_symlink() and link.resolve() == shared.resolve()
    other = tmp_path / "store" / "grpo-def"
    stages.link(link, other)  # the stage's config changed: the job now shows the new one
    assert link.resolve() == other.resolve() and shared.is_dir()
    real = tmp_path / "job" / "stages" / "sft"
    real.mkdir()
    with pytest.raises(ConfigError, match="not a link"):
        stages.link(real, tmp_path / "store" / "sft-1")


def test_auto_settings_count_as_they_resolve_here(compose_cfg):
    """A CPU stage and a GPU stage of one config compute different numbers: `auto` precision,
    dtype and attention enter a stage's identity resolved, not as the word 'auto'."""
    base = stages.config_hash(grpo(compose_cfg))  # auto everywhere; on this CPU: fp32, sdpa
    cpu = ["trainer.precision=32-true", "model.dtype=fp32", "model.attn_implementation=sdpa"]
    assert stages.config_hash(grpo(compose_cfg, *cpu)) == base
    assert stages.config_hash(grpo(compose_cfg, "trainer.precision=bf16-mixed")) != base
    assert stages.config_hash(grpo(compose_cfg, "model.dtype=bf16")) != base


def test_a_stage_after_a_changed_one_is_another_stage_even_without_the_store(compose_cfg):
    """With paths.stage_store=null the folders are fixed (`<job>/stages/<name>`), and a stage's
    config names its start by that fixed path: the hash of what it starts from must count."""
    from hcm.train import compose_stages

    def hashes(*overrides: str) -> dict[str, str]:
        cfg = compose_cfg("train", ["experiment=tiny_hcm", "paths.stage_store=null", *overrides])
        return {name: stages.config_hash(c) for name, _, c in compose_stages(cfg)}

    base = hashes()
    changed = hashes("pipeline.sft_1_2.overrides=['data.sft_sources=[answer_cot]','seed=5']")
    assert changed["sft_1_1"] == base["sft_1_1"]
    for name in ("sft_1_2", "grpo", "eval"):  # the changed stage and every stage after it
        assert changed[name] != base[name], name


def finished_stage(compose_cfg, tmp_path, **marker) -> tuple:
    cfg = compose_cfg("train", ["experiment=tiny_sft", f"paths.output_dir={tmp_path / 'sft'}"])
    key = stages.config_hash(cfg)
    (tmp_path / "sft").mkdir()
    stages.write_marker(tmp_path / "sft", cfg, key, metrics={"val/x": 1.0}, **marker)
    return cfg, key


def test_a_finished_stage_is_refused_when_a_file_it_read_changed(compose_cfg, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"id": "a", "answer": "AC"}\n')
    inputs = fingerprints.inputs([data], "unused", built=True, cache=tmp_path / "h.json")
    cfg, _ = finished_stage(compose_cfg, tmp_path, inputs=inputs)
    assert stages.previous_run(cfg)[1] == {"val/x": 1.0}  # unchanged: reused
    data.write_text('{"id": "a", "answer": "N"}\n')
    with pytest.raises(ConfigError, match=f"changed since: {data.resolve()}"):
        stages.previous_run(cfg)


def test_a_stage_made_by_other_code_warns_or_is_refused(compose_cfg, tmp_path, caplog):
    cfg, _ = finished_stage(compose_cfg, tmp_path)
    marker = json.loads((tmp_path / "sft" / stages.MARKER).read_text())
    now = fingerprints.code_version(REPO)
    assert marker["code"] == now and now["commit"]  # (the tests run in a git checkout)
    marker["code"]["commit"] = "0" * 40
    (tmp_path / "sft" / stages.MARKER).write_text(json.dumps(marker))
    with caplog.at_level(logging.WARNING, logger="hcm.stages"):
        assert stages.previous_run(cfg)[1] == {"val/x": 1.0}
    assert "made by hcm commit 000000000000" in caplog.text
    with open_dict(cfg):
        cfg.on_code_change = "refuse"
    with pytest.raises(ConfigError, match="on_code_change=refuse"):
        stages.previous_run(cfg)


@pytest.mark.parametrize(
    ("override", "reaches"),
    [
        ("module.beta=0.1", {"grpo_all", "grpo"}),  # GRPO's knob: SFT and eval have no beta
        ("module.mining.correct=exact", {"grpo_all", "grpo"}),  # README's example
        ("+module.rewards.letter_e=1.0", {"grpo_all", "grpo"}),  # +key: where its parent is
        ("seed=3", {"sft", "sft_eval", "grpo_all", "grpo", "grpo_eval"}),
        ("module.optimizer.lr=0.5", {"sft", "grpo_all", "grpo"}),  # every trained stage
    ],
)
def test_a_pipeline_override_reaches_the_stages_that_have_its_key(compose_cfg, override, reaches):
    from hcm.train import compose_stages

    cfg = compose_cfg("train", ["experiment=cpu_hcm", override])
    key, value = override.lstrip("+").split("=")
    got = {name for name, _, c in compose_stages(cfg) if str(OmegaConf.select(c, key)) == value}
    assert got == reaches


def test_a_pipeline_override_no_stage_has_is_refused_naming_it(compose_cfg, caplog):
    from hcm.train import compose_stages

    # an SFT-only pipeline: its stages have no GRPO fast-path settings
    cfg = compose_cfg("train", ["experiment=paper_cot_sft_1b", "+module.fast.cache=static"])
    with pytest.raises(ConfigError, match=r"module\.fast\.cache=static: no stage of this"):
        compose_stages(cfg)
    # ++ (set it where it exists) is what a sweep shares across pipelines: a warning only
    cfg = compose_cfg("train", ["experiment=paper_cot_sft_1b", "++module.fast.cache=static"])
    with caplog.at_level("WARNING", logger="hcm.train"):
        compose_stages(cfg)
    assert "++module.fast.cache=static" in caplog.text and "no stage of this" in caplog.text
