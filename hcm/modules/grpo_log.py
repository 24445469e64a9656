"""What a GRPO step logs: the rollout's rewards, advantages and lengths, the loss statistics, the
LR, the step's timing and, every N rollouts, a W&B table of completions.

A callback (`GRPOModule.configure_callbacks` adds it) that notes when each step starts, and whose
`log_step` is the last line of `training_step` (not `log`: Lightning binds every callback's
`log` to the module's): the step's Rollout and the statistics of the update's
last pass, with the update's own duration. (Logged inside the step, so that every other
callback's `on_train_batch_end`, the progress bar's included, sees this step's values.) Keys:
`train/reward/total` (eq. 6's weighted sum), `train/reward/<name>` per reward function,
`train/zero_variance_groups` (groups with no learning signal), `train/time/rollout` (sampling,
scoring, advantages and the fixed log-probs) and `train/time/update`; `train/rollouts`, the
completions the step sampled on all ranks (redraws and those the difficulty band left out
included), and `train/rollouts_total`, their sum over the run (kept in checkpoints: a resumed
run goes on counting), the budget arms are compared at; with `module.difficulty_band`,
`train/band_kept`, the share of the drawn prompts kept (rank 0's; 0: nothing trained).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from hcm.grpo_math import zero_variance_groups
from hcm.rollout import Rollout

LOSS_STATS = ("kl", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean")


def step_metrics(rollout: Rollout, stats: dict[str, float], lr: float) -> dict[str, float]:
    """The metrics of one step; `stats` holds the update's loss statistics and "time/update"."""
    lengths = rollout.completion_mask.sum(1).float()  # (B*G,)
    values = {
        "train/loss": stats["loss"],
        "train/reward/total": rollout.rewards.mean(),
        "train/reward/total_std": rollout.rewards.std(),
        "train/advantage_std": rollout.advantages.std(),
        "train/zero_variance_groups": zero_variance_groups(rollout.rewards, rollout.G)
        .float()
        .mean(),
        "train/completion_length/mean": lengths.mean(),
        "train/completion_length/max": lengths.max(),
        "train/completion_length/truncated_frac": rollout.truncated.float().mean(),
        "train/lr": lr,
    }
    for name, r in rollout.per_reward.items():
        values[f"train/reward/{name}"] = r.mean()
        values[f"train/reward/{name}_std"] = r.std()
    values |= {f"train/{k}": stats[k] for k in LOSS_STATS if k in stats}
    return {k: float(v) for k, v in values.items()}


def completion_table(rollout: Rollout, step: int, prompts: int) -> tuple[list[str], list[list]]:
    """(columns, rows): the first `prompts` prompts' G completions with their rewards."""
    n = min(rollout.size, prompts * rollout.G)
    names = list(rollout.per_reward)
    columns = ["step", "prompt", "answer", "completion", "reward", *names]
    data = [
        [
            step,
            r // rollout.G,
            rollout.answers[r],
            rollout.texts[r],
            float(rollout.rewards[r]),
            *(float(rollout.per_reward[k][r]) for k in names),
        ]
        for r in range(n)
    ]
    return columns, data


def all_ranks(module: L.LightningModule, n: int) -> int:
    """`n` summed over the ranks (an all-reduce of one number under DDP/FSDP)."""
    trainer = module.trainer
    if trainer.world_size == 1:
        return n
    total = trainer.strategy.reduce(torch.tensor(float(n), device=module.device), reduce_op="sum")
    return round(float(total))


class GRPOStepLog(L.Callback):
    """Logs each GRPO step (`step_metrics`) and every `every_n_steps` rollouts a table of the
    first `prompts` prompts' completions (0: never)."""

    def __init__(self, every_n_steps: int, prompts: int, log_resampled: bool, log_band: bool):
        self.every_n_steps, self.prompts, self.log_resampled = every_n_steps, prompts, log_resampled
        self.log_band = log_band
        self.rollouts_total = 0  # completions sampled so far, all ranks (in checkpoints)
        self._start: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"rollouts_total": self.rollouts_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollouts_total = state["rollouts_total"]

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        # Before the update: its optimizer steps advance global_step and its last line the LR.
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self._start = {"time": time.perf_counter(), "step": trainer.global_step, "lr": lr}

    def log_step(
        self, module: L.LightningModule, rollout: Rollout, stats: dict[str, float]
    ) -> None:
        """Log the step of `rollout`; `stats`: the update's, with "time/update"."""
        values = step_metrics(rollout, stats, self._start["lr"])
        step_time = time.perf_counter() - self._start["time"]
        values["train/time/rollout"] = step_time - stats["time/update"]
        values["train/time/update"] = stats["time/update"]
        if self.log_resampled:
            values["train/zero_variance_groups_sampled"] = rollout.zero_variance_sampled
        if self.log_band:
            values["train/band_kept"] = rollout.band_kept
        rollouts = all_ranks(module, rollout.generated)
        self.rollouts_total += rollouts
        values["train/rollouts"], values["train/rollouts_total"] = rollouts, self.rollouts_total
        module.log_dict(values, batch_size=rollout.size)
        reward = float(rollout.rewards.mean())
        module.log("train/reward", reward, prog_bar=True, batch_size=rollout.size)
        rollout_step = self._start["step"] // module.num_iterations
        if self.every_n_steps and rollout_step % self.every_n_steps == 0:
            columns, data = completion_table(rollout, self._start["step"], self.prompts)
            for lg in module.loggers:
                if hasattr(lg, "log_table"):
                    lg.log_table(key="train/completions", columns=columns, data=data)
