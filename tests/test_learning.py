"""The method learns the screening task itself, not a toy reward: a reduced `experiment=cpu_hcm`
from the committed base model (models/cpu_base). SFT must lift the held-out section-5.1 score well
above the random baseline, and HCM-GRPO on top must raise its rollout DPA reward and the held-out
score. The test was seen to fail with the advantage's sign flipped, the DPA reward judged against
another prompt's label, the loss's completion mask replaced by all ones (padding in the loss), and
the policy loss's sign flipped.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import pytest

from hcm.train import train

# Sizes of the reduced run; the full one is README's main job (experiment=cpu_hcm).
REDUCED = [
    "experiment=cpu_hcm",
    "data.synthetic.sizes.test=256",
    "pipeline.sft.overrides=['trainer.max_epochs=4','data.synthetic.sizes.train=1024']",
    # GRPO on 256 of those prompts, so that its all-data epochs see the same prompts and their
    # mean rewards compare without prompt-difficulty noise: 3 epochs on all, then 1 with the hard
    # cases; the evaluations read the same 256 test samples from that folder
    *(
        f"pipeline.{stage}.overrides=['trainer.max_epochs=4','data.switch_epoch=3',"
        "'data.synthetic.sizes.train=256']"
        for stage in ("grpo_all", "grpo")
    ),
    *(
        f"+pipeline.{stage}.overrides=['data.synthetic.sizes.train=256']"
        for stage in ("sft_eval", "grpo_eval")
    ),
]


def stage_metrics(stages: Path, name: str) -> dict[str, float]:
    return json.loads((stages / name / "metrics.json").read_text())["metrics"]


def reward_per_epoch(stage: Path, key: str = "train/reward/dpa") -> list[float]:
    by_epoch: dict[int, list[float]] = defaultdict(list)
    with (stage / "csv" / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            if row.get(key):
                by_epoch[int(row["epoch"])].append(float(row[key]))
    return [sum(v) / len(v) for _, v in sorted(by_epoch.items())]


@pytest.mark.slow
def test_sft_then_hcm_grpo_learn_to_screen(compose_cfg):
    cfg = compose_cfg("train", REDUCED)
    train(cfg)
    stages = Path(cfg.paths.output_dir) / "stages"
    sft, grpo = stage_metrics(stages, "sft_eval"), stage_metrics(stages, "grpo_eval")
    assert sft["test/score/count"] == grpo["test/score/count"] == 256
    random = sft["test/score/random_baseline"]
    assert sft["test/score/valid_rate"] > 95, sft
    assert sft["test/score/overall"] >= random + 10, (sft["test/score/overall"], random)

    # epochs 0-2 draw from all of the 256 prompts, epoch 3 adds the hard cases (harder by
    # construction): the reward is compared on the same distribution
    rewards = reward_per_epoch(stages / "grpo_all") + reward_per_epoch(stages / "grpo")
    # (seen on 2-core CPUs, 1 and 2 threads, seeds 0-1: epoch 2 over epoch 0 by +0.04 to +0.06,
    # each epoch's mean having a standard error of ~0.016)
    assert len(rewards) == 4
    assert rewards[2] > rewards[0] + 0.03, rewards
    # and it raises the held-out score (seen: +17 to +24 points on these 256 samples). At this
    # size the rise is conservatism (answers naming one option go from ~47% to 56-85%, exact
    # match does not rise): what the DPA reward pays for when unsure, not better judgement
    # (docs/results/science_cpu_v2.md); greedy evaluation is deterministic
    assert grpo["test/score/overall"] >= sft["test/score/overall"] + 5, (grpo, sft)
