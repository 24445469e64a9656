"""Non-finite losses, rewards and gradients never reach the weights (hcm/nonfinite.py).

SFT (automatic optimization) and GRPO (manual, a NaN reward) on the tiny model: a poisoned step
leaves the weights and the optimizer's state as they were, is counted in train/skipped_steps,
and training goes on; too many in a row stop the run with an error and a checkpoint holding the
weights of the last good step.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from helpers import letter_e
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger

from hcm.modules.sft import SFTModule
from hcm.nonfinite import STOP_CHECKPOINT, NonFiniteError, NonFiniteGuard, nonfinite
from hcm.rewards import REWARDS

FAST = ["trainer.limit_val_batches=0", "model.max_patches=1"]
GRPO_FAST = [
    "experiment=tiny_grpo",
    "prompt.user='Original <image> Generated <image> Answer:'",
    "module.sampling.max_new_tokens=6",
    "+module.rewards.letter_e=1.0",
    "+module.rewards.poison=1.0",
]
POISON: set[int] = set()  # the global steps whose loss / reward is made NaN


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    POISON.clear()
    yield
    torch.set_num_threads(threads)


class Recorder(Logger):
    name, version = "recorder", "0"

    def __init__(self):
        super().__init__()
        self.metrics: list[dict[str, float]] = []

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def series(self, key: str) -> list[float]:
        return [m[key] for m in self.metrics if key in m]


class Snapshots(L.Callback):
    """The trainable weights before and after each training batch."""

    def __init__(self):
        self.before: list[dict] = []
        self.after: list[dict] = []

    @staticmethod
    def weights(module) -> dict[str, torch.Tensor]:
        return {
            k: p.detach().clone() for k, p in module.model.named_parameters() if p.requires_grad
        }

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before.append(self.weights(module))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after.append(self.weights(module))

    def moved(self) -> list[bool]:
        return [
            any(not torch.equal(b[k], a[k]) for k in b)
            for b, a in zip(self.before, self.after, strict=True)
        ]


def fit(cfg, tmp_path, steps: int, guard: NonFiniteGuard):
    dm = instantiate(cfg.data, _convert_="all")
    module = instantiate(cfg.module, _convert_="all")
    recorder, snaps = Recorder(), Snapshots()
    trainer = instantiate(
        cfg.trainer,
        logger=recorder,
        callbacks=[snaps, guard],  # snapshots first: the guard may raise
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=steps,
        default_root_dir=str(tmp_path),
    )
    return trainer, module, dm, recorder, snaps


@pytest.fixture
def poisoned_sft(monkeypatch):
    train_step = SFTModule.training_step

    def poisoned(self, batch, batch_idx):
        loss = train_step(self, batch, batch_idx)
        return loss * float("nan") if self.global_step in POISON else loss

    monkeypatch.setattr(SFTModule, "training_step", poisoned)


def test_nonfinite_names_the_bad_values():
    values = {"loss": torch.tensor(1.0), "kl": float("inf"), "grad": torch.tensor([0.0, math.nan])}
    assert nonfinite(values) == ["kl", "grad"]
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        NonFiniteGuard(0)


@pytest.mark.slow
def test_sft_skips_nonfinite_steps_and_trains_on(compose_cfg, tmp_path, poisoned_sft):
    POISON.update({1, 2})
    cfg = compose_cfg("train", ["experiment=tiny_sft", *FAST])
    trainer, module, dm, recorder, snaps = fit(cfg, tmp_path, 5, NonFiniteGuard(3))
    trainer.fit(module, datamodule=dm)
    assert snaps.moved() == [True, False, False, True, True]
    assert recorder.series("train/skipped_steps") == [0, 1, 2, 2, 2]
    norms = recorder.series("train/grad_norm")
    assert [math.isfinite(n) for n in norms] == [True, False, False, True, True]
    opt = trainer.optimizers[0]
    assert {int(s["step"]) for s in opt.state.values()} == {3}  # Adam's moments saw 3 steps
    assert all(torch.isfinite(p).all() for p in module.model.parameters())


@pytest.mark.slow
def test_consecutive_skips_stop_with_the_last_good_weights(compose_cfg, tmp_path, poisoned_sft):
    POISON.update(range(2, 10))
    cfg = compose_cfg("train", ["experiment=tiny_sft", *FAST])
    trainer, module, dm, _, snaps = fit(cfg, tmp_path, 8, NonFiniteGuard(2))
    with pytest.raises(NonFiniteError, match=r"2 optimizer steps in a row.*last good step"):
        trainer.fit(module, datamodule=dm)
    assert snaps.moved() == [True, True, False, False]
    saved = torch.load(tmp_path / "checkpoints" / STOP_CHECKPOINT, weights_only=False)
    for name, value in snaps.after[1].items():  # step 1: the last good one
        torch.testing.assert_close(saved["state_dict"][f"model.{name}"], value, rtol=0, atol=0)
    assert saved["callbacks"]["NonFiniteGuard"] == {"skipped": 2, "consecutive": 2}


@pytest.mark.slow
def test_grpo_skips_a_nan_reward(compose_cfg, tmp_path, monkeypatch):
    steps = []  # the global step of each rollout, to poison its rewards

    def poison(completion: str) -> float:
        return float("nan") if steps[-1] in POISON else 0.0

    monkeypatch.setitem(REWARDS, "letter_e", letter_e)
    monkeypatch.setitem(REWARDS, "poison", poison)
    POISON.add(1)
    cfg = compose_cfg("train", [*GRPO_FAST, *FAST])
    trainer, module, dm, recorder, snaps = fit(cfg, tmp_path, 3, NonFiniteGuard(2))
    generate = module.generate
    monkeypatch.setattr(
        module, "generate", lambda batch: steps.append(module.global_step) or generate(batch)
    )
    trainer.fit(module, datamodule=dm)
    assert steps == [0, 1, 2]
    assert snaps.moved() == [True, False, True]
    assert recorder.series("train/skipped_steps") == [0, 1, 1]
    rewards = recorder.series("train/reward/total")
    assert [math.isnan(r) for r in rewards] == [False, True, False]  # logged, not hidden
