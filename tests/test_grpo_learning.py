"""GRPO learns: on the random tiny model, Trainer.fit with the module's real training_step raises
a toy reward well above its start, while the same run with learning rate 0 stays where it began.

The toy reward is the fraction of the completion's characters that are "e": random completions
score ~0.1 and differ within a group, so eq. 2's advantages carry a signal from step 1, and a
policy that writes "e"-rich tokens scores higher. A flipped advantage or ratio sign drives the
reward towards 0 instead (checked by hand when this test was written), so this test fails.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import letter_e
from hydra.utils import instantiate

from hcm.rewards import REWARDS

SEED = 0
STEPS = 30
K = 5  # steps averaged at each end
FAST = [
    "experiment=tiny_grpo",
    "prompt.user='Original <image> Generated <image> Answer:'",  # short prompts: fast steps
    "model.max_patches=1",
    "module.sampling.max_new_tokens=6",
    "module.beta=0.0",  # no reference forward: the KL is not what is tested here
    "~module.rewards",
    "+module.rewards={letter_e:1.0}",
    "module.scheduler.warmup_ratio=0.0",
    "trainer.max_epochs=100",  # max_steps ends the run
    "trainer.limit_train_batches=null",
    "trainer.limit_val_batches=0",
]


class RewardTrace(L.Callback):
    def __init__(self):
        self.rewards: list[float] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        self.rewards.append(float(trainer.callback_metrics["train/reward/total"]))


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def rewards_of_run(compose_cfg, lr: float, seed: int = SEED, steps: int = STEPS) -> list[float]:
    cfg = compose_cfg("train", [*FAST, f"module.optimizer.lr={lr}", f"seed={seed}"])
    L.seed_everything(seed)
    dm = instantiate(cfg.data, _convert_="all")
    module = instantiate(cfg.module, _convert_="all")
    trace = RewardTrace()
    trainer = instantiate(
        cfg.trainer,
        logger=False,
        callbacks=[trace],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=steps,
    )
    trainer.fit(module, datamodule=dm)
    assert len(trace.rewards) == steps
    return trace.rewards


@pytest.fixture
def toy_reward(monkeypatch):
    monkeypatch.setitem(REWARDS, "letter_e", letter_e)
    # Tiny matmuls on shared cores: intra-op threads only add contention (7x slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_grpo_raises_the_reward_and_lr_zero_does_not(compose_cfg, toy_reward):
    learned = rewards_of_run(compose_cfg, lr=3e-3)
    frozen = rewards_of_run(compose_cfg, lr=0.0)
    assert learned[0] == frozen[0]  # same seed, same weights: the same first rollout
    # The initial policy's mean reward: every step of the lr-0 run (~0.1 on the tiny model).
    start = mean(frozen)
    end = mean(learned[-K:])
    assert end > start + 0.15 and end > 2.5 * start, (learned, start)
    assert end > mean(learned[:K]) + 0.1, learned
    assert abs(mean(frozen[-K:]) - mean(frozen[:K])) < 0.06, frozen
    assert max(frozen) < 0.25, frozen
