"""Crash and resume, proven by fault injection (hcm/faults.py).

The one-command pipeline (SFT -> hard-case mining + HCM-GRPO) is SIGKILLed at each named point in
turn, each time rerun with the same command, and must end exactly where an uninterrupted run
with the same seed ends: the same per-step metrics after each resume point, the same hard set
and bit-identical exported weights. Deterministic on CPU with one thread. Then the checks a
resume makes of the checkpoints it finds: temporaries of interrupted writes removed, a corrupt
last.ckpt replaced by the previous one with a warning, no whole checkpoint an error.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import toy_reward_site
from omegaconf import OmegaConf

from hcm.checkpoints import AtomicCheckpointIO, CheckpointError, checkpoint_problem, rank_seed
from hcm.data.sampler import ResumableSampler
from hcm.evaluate import evaluate
from hcm.modules.base import scheduled_steps, warmup_cosine
from hcm.stages import last_checkpoint

REPO = Path(__file__).resolve().parents[1]

# GRPO needs rewards that vary for the random tiny model, or its weights never move and a
# broken resume could still match: a reward for the letter e, registered at interpreter start.
SITE = toy_reward_site()
PIPELINE = [
    "experiment=tiny_hcm",
    "pipeline.sft_1_1=null",
    "pipeline.sft_1_2.init_from=null",
    "pipeline.eval=null",
    # SFT checkpoints at epoch ends (the default), GRPO after every step
    "pipeline.grpo.overrides=['data.composition=all_plus_hard','+module.rewards.letter_e=1.0',"
    "'checkpoint_every_n_steps=1']",
    "trainer.limit_train_batches=3",  # 2 epochs x 3 steps per stage; GRPO switches at epoch 1
    "trainer.limit_val_batches=0",
    "callbacks.progress_bar=null",
]
STEPS = 6
# Each run dies at a point; the next one resumes (counts are per process).
FAULTS = [
    ("sft_step:5", "SFT, mid-epoch 1: resumes from epoch 0's checkpoint"),
    ("ckpt_write:1", "SFT, writing epoch 1's checkpoint: resumes from epoch 0's again"),
    ("answer:2", "GRPO, during hard-case mining (SFT finishes first)"),
    ("grpo_step:5", "GRPO, mid-step 4 in the hard-case epoch: resumes after step 3"),
]


# Table 7's split: a shared first stage that stops at the switch (grpo), and an arm that
# continues from its checkpoint (arm); tiny_grpo switches after epoch 0 of 2.
SPLIT = [
    "experiment=tiny_hcm",
    "pipeline.sft_1_1=null",
    "pipeline.sft_1_2.init_from=null",
    "pipeline.eval=null",
    "pipeline.grpo.overrides=['+module.rewards.letter_e=1.0']",
    "+pipeline.grpo.fixed=['data.composition=all','module.stop_at_switch=true']",
    "+pipeline.arm={experiment:tiny_grpo,continue_from:grpo,"
    "overrides:['+module.rewards.letter_e=1.0','data.composition=all_plus_hard']}",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "callbacks.progress_bar=null",
]


def train_cli(
    run: Path, site: Path, fault: str | None = None, pipeline: list[str] = PIPELINE
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONUNBUFFERED": "1"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("HCM_FAULT", None)
    env["HCM_STAGE_STORE"] = str(run.with_name(run.name + "-stages"))  # ref's and run's apart
    if fault:
        env["HCM_FAULT"] = fault
    args = [sys.executable, str(REPO / "train.py"), *pipeline, f"hydra.run.dir={run}"]
    return subprocess.run(
        args, cwd=run.parent, env=env, capture_output=True, text=True, timeout=600
    )


def logged(stage: Path, pattern: str = "metrics*.csv") -> dict[tuple[int, str], str]:
    """(step, key) -> value as written, over the stage's CSV files (time keys left out)."""
    values: dict[tuple[int, str], str] = {}
    for path in sorted((stage / "csv").glob(pattern)):
        with path.open() as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if value and key != "step" and not key.startswith("train/time/"):
                        values[(int(row["step"]), key)] = value
    return values


@pytest.mark.slow
def test_killed_pipeline_resumes_to_the_uninterrupted_result(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = train_cli(ref, site)
    assert r.returncode == 0, r.stderr[-3000:]

    for fault, where in FAULTS:
        r = train_cli(run, site, fault)
        assert r.returncode == -signal.SIGKILL, (
            f"{fault} ({where}) did not fire: {r.stderr[-2000:]}"
        )
        if fault.startswith("ckpt_write"):  # the write died before its rename: last.ckpt whole
            folder = run / "stages" / "sft_1_2" / "checkpoints"
            assert list(folder.glob(".last.ckpt.tmp-*"))
            assert checkpoint_problem(folder / "last.ckpt") is None
            assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 3
    r = train_cli(run, site)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout + r.stderr  # GRPO continued from its checkpoint

    for stage, resumed_at in (("sft_1_2", 3), ("grpo", 4)):
        want, got = logged(ref / "stages" / stage), logged(run / "stages" / stage)
        assert {s for s, _ in want} == set(range(STEPS)), stage
        # the last run of each stage logged only the steps after its resume point ...
        last = logged(run / "stages" / stage, "metrics.csv")
        assert {s for s, _ in last} == set(range(resumed_at, STEPS)), stage
        # ... and every value any run logged is the uninterrupted run's
        assert got and {k: want.get(k) for k in got} == got, stage
        for name in ("model.safetensors", "config.json"):
            a = (ref / "stages" / stage / "model" / name).read_bytes()
            assert a == (run / "stages" / stage / "model" / name).read_bytes(), (stage, name)
        leftovers = list((run / "stages" / stage / "checkpoints").glob(".*"))
        assert not leftovers, leftovers
    hard = [json.loads((d / "stages/grpo/hard_cases.json").read_text()) for d in (ref, run)]
    assert hard[0]["content"]["hard_ids"] == hard[1]["content"]["hard_ids"]

    # GRPO's LR schedule spans the 6 limited steps (not the full epochs' 12 + 12 + hard ones)
    lrs = [
        float(v) for (s, k), v in sorted(logged(ref / "stages" / "grpo").items()) if k == "train/lr"
    ]
    assert lrs == pytest.approx([1e-4 * warmup_cosine(s, STEPS, 0, 0.0) for s in range(STEPS)])
    kls = [float(v) for (_, k), v in logged(ref / "stages" / "grpo").items() if k == "train/kl"]
    assert max(kls) > 0  # the policy moved: weights and optimizer state matter to the check


@pytest.mark.slow
def test_a_split_stage_killed_after_its_switch_ends_as_an_uninterrupted_one(tmp_path):
    """Killed after the switch-epoch checkpoint, while exporting, and before stage.json: each
    rerun resumes the shared first stage at the switch, trains nothing more, and writes the
    metrics the uninterrupted run wrote; the arm that continues from it ends identical."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = train_cli(ref, site, pipeline=SPLIT)
    assert r.returncode == 0, r.stderr[-3000:]
    for fault in ("switch:1", "export:1", "marker:1"):
        r = train_cli(run, site, fault, pipeline=SPLIT)
        assert r.returncode == -signal.SIGKILL, f"{fault} did not fire: {r.stderr[-2000:]}"
    r = train_cli(run, site, pipeline=SPLIT)
    assert r.returncode == 0, r.stderr[-3000:]

    metrics = [
        json.loads((d / "stages/grpo/stage.json").read_text())["metrics"] for d in (ref, run)
    ]
    untimed = [{k: v for k, v in m.items() if not k.startswith("train/time/")} for m in metrics]
    assert "val/score/overall" in untimed[0] and untimed[1] == untimed[0]
    for stage in ("grpo", "arm"):
        want, got = logged(ref / "stages" / stage), logged(run / "stages" / stage)
        assert {s for s, _ in got} == {s for s, _ in want}, stage  # no epoch trained twice
        assert {k: want.get(k) for k in got} == got, stage
    a, b = (d / "stages/arm/model/model.safetensors" for d in (ref, run))
    assert a.read_bytes() == b.read_bytes()
    # the prefix keeps the checkpoint the arm continued from; the finished arm keeps none
    assert (run / "stages/grpo/checkpoints/last.ckpt").is_file()
    assert not (run / "stages/arm/checkpoints").exists()


# An arm whose epochs after the switch are longer than the stage it continues (all data twice as
# many batches as the first stage's all-data epochs): its schedule spans more steps.
LONGER_ARM = [
    "experiment=tiny_hcm",
    "pipeline.sft_1_1=null",
    "pipeline.sft_1_2=null",
    "pipeline.eval=null",
    "pipeline.grpo.init_from=null",
    "+pipeline.grpo.fixed=['data.composition=all','module.stop_at_switch=true']",
    "+pipeline.arm={experiment:tiny_grpo,continue_from:grpo,"
    "overrides:['data.composition=all_plus_hard']}",
    "trainer.limit_train_batches=1.0",
    "trainer.limit_val_batches=0",
    "data.batch_size=8",
    "callbacks.progress_bar=null",
]


# The same arm drawing twice the prompts a step and training on those in a difficulty band (the
# selection sweep's online arms): its epochs take half the steps, the epochs it continues did not.
BAND_ARM = [
    o.replace(
        "'data.composition=all_plus_hard'",
        "'data.composition=all_plus_hard','module.difficulty_band={low:0.0,high:1.0,oversample:2}'",
    )
    for o in LONGER_ARM
]


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", [LONGER_ARM, BAND_ARM], ids=["longer", "band"])
def test_a_continued_arm_steps_at_its_own_schedule_from_its_first_step(tmp_path, pipeline):
    """The arm resumes the shared stage's checkpoint, whose optimizer holds the LR of the shared
    stage's schedule (other total steps); the arm's first step must already take its own, and
    the epochs it continues count as they ran (a band arm once counted them at its own batch
    size: fewer steps than had run, so its schedule had ended and its LR was 0)."""
    site = tmp_path / "site"
    site.mkdir()
    run = tmp_path / "run"
    r = train_cli(run, site, pipeline=pipeline)
    assert r.returncode == 0, r.stderr[-3000:]
    lrs = {s: float(v) for (s, k), v in logged(run / "stages" / "arm").items() if k == "train/lr"}
    first, total = min(lrs), max(lrs) + 1  # the arm continues at the switch, to its own end
    shared = len({s for s, k in logged(run / "stages" / "grpo") if k == "train/lr"})
    assert first == shared and total > (2 if pipeline is LONGER_ARM else 1) * shared
    want = {s: 1e-4 * warmup_cosine(s, total, 0, 0.0) for s in lrs}  # tiny_grpo: lr 1e-4, cosine
    assert lrs == pytest.approx(want)


# -- what a resume checks ---------------------------------------------------------------------
def ckpt_cfg(path="last"):
    return OmegaConf.create({"ckpt_path": path})


def write(io: AtomicCheckpointIO, path: Path, step: int) -> None:
    io.save_checkpoint({"state_dict": {"w": torch.full((4096,), float(step))}, "step": step}, path)


def test_atomic_writes_keep_the_previous_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    io = AtomicCheckpointIO()
    for step in (1, 2, 3):
        write(io, folder / "last.ckpt", step)
    assert sorted(p.name for p in folder.iterdir()) == ["last-prev.ckpt", "last.ckpt"]
    assert torch.load(folder / "last.ckpt")["step"] == 3
    assert torch.load(folder / "last-prev.ckpt")["step"] == 2
    io.remove_checkpoint(folder / "last.ckpt")
    assert not list(folder.iterdir())


def test_resume_falls_back_to_the_previous_checkpoint_and_never_restarts_silently(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    io = AtomicCheckpointIO()
    write(io, folder / "last.ckpt", 1)
    write(io, folder / "last.ckpt", 2)
    (folder / ".last.ckpt.tmp-123").write_bytes(b"half a checkpoint")  # an interrupted write
    assert last_checkpoint(ckpt_cfg(), tmp_path) == str(folder / "last.ckpt")
    assert not (folder / ".last.ckpt.tmp-123").exists()

    data = (folder / "last.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(data[: len(data) // 2])  # truncated
    with caplog.at_level(logging.WARNING):
        assert last_checkpoint(ckpt_cfg(), tmp_path) == str(folder / "last-prev.ckpt")
    assert "resuming from" in caplog.text and "truncated or corrupt" in caplog.text

    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF  # one flipped byte inside the tensor data
    (folder / "last-prev.ckpt").write_bytes(bytes(flipped))
    assert "CRC" in checkpoint_problem(folder / "last-prev.ckpt")
    with pytest.raises(
        CheckpointError, match=r"last\.ckpt is unusable.*last-prev\.ckpt is unusable"
    ):
        last_checkpoint(ckpt_cfg(), tmp_path)
    with pytest.raises(CheckpointError, match="CRC"):
        last_checkpoint(ckpt_cfg(str(folder / "last-prev.ckpt")), tmp_path)
    assert last_checkpoint(ckpt_cfg(None), tmp_path) is None  # ckpt_path=null: start over
    assert last_checkpoint(ckpt_cfg(), tmp_path / "fresh") is None  # nothing written yet


@pytest.mark.parametrize(
    ("per_epoch", "limit", "max_steps", "per_batch", "expected"),
    [
        ([12, 18], 1.0, -1, 1, 30),  # everything
        ([12, 18], 4, -1, 1, 8),  # limit_train_batches=4 cuts each epoch
        ([12, 18], 0.5, -1, 1, 15),  # a fraction of each epoch
        ([12, 18], 1.0, 20, 1, 20),  # max_steps caps the whole fit
        ([12, 18], 1.0, 20, 4, 5),  # ... in optimizer steps: mu = 4 per rollout
        ([12, 18], 1.0, 21, 4, 6),  # a last rollout that is cut short still runs
    ],
)
def test_scheduled_steps(per_epoch, limit, max_steps, per_batch, expected):
    assert scheduled_steps(per_epoch, limit, max_steps, per_batch) == expected


def test_resumable_sampler_skips_what_its_epoch_trained_on():
    sampler = ResumableSampler(range(10), num_replicas=2, rank=1, shuffle=True, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    assert len(full) == len(sampler) == 5
    sampler.set_start(2)
    assert list(sampler) == full[2:] and len(sampler) == 5  # len stays the epoch's count
    sampler.set_epoch(2)  # Lightning sets the same epoch again after resuming: offset kept
    assert list(sampler) == full[2:]
    sampler.set_epoch(3)  # the next epoch starts from its beginning, in another order
    assert sampler.start == 0 and len(list(sampler)) == 5 and list(sampler) != full


def test_eval_names_a_corrupt_checkpoint(compose_cfg, tmp_path):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    cfg = compose_cfg("eval", ["experiment=tiny_eval", f"ckpt_path={bad}"])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        evaluate(cfg)


def test_rank_seeds_are_distinct_fixed_and_not_another_runs():
    seeds = {(s, r): rank_seed(s, r) for s in range(4) for r in range(8)}
    assert len(set(seeds.values())) == len(seeds)  # seed + rank would give (0, 1) == (1, 0)
    assert rank_seed(3, 5) == seeds[(3, 5)]  # a function of (seed, rank) alone
    assert all(0 <= v < 2**32 for v in seeds.values())  # a valid torch.manual_seed
