"""Keep non-finite values out of the weights: skip the optimizer step, count it, and stop a run
that keeps producing them.

`NonFiniteGuard` (conf/callbacks/default.yaml) sees every loss that is backpropagated and, just
before each optimizer step, the gradients. A non-finite GRPO reward or KL term makes the loss
non-finite (the advantages or the KL penalty carry it), so loss and gradients cover them all. If
any is NaN or infinite, on any rank, the step is skipped on every rank: the gradients are
dropped, so the optimizer leaves the weights and its moments as they were (AdamW skips
parameters without a gradient). The LR schedule and the step counter still advance, as with a
mixed-precision GradScaler's skipped steps. Logged per step: `train/grad_norm` (before
clipping) and `train/skipped_steps` (so far). After `max_consecutive_skips` skipped steps in a
row the run stops with `NonFiniteError`, after writing `nonfinite-stop.ckpt` beside the other
checkpoints: its weights are those of the last good step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)

STOP_CHECKPOINT = "nonfinite-stop.ckpt"


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient."""


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients (0 when none has one)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])  # (n_params,)
    return torch.linalg.vector_norm(norms)


def nonfinite(values: dict[str, torch.Tensor | float]) -> list[str]:
    """The names of the values that are NaN or infinite.

    >>> nonfinite({"loss": torch.tensor(float("nan")), "grad_norm": 1.0})
    ['loss']
    """
    return [k for k, v in values.items() if not torch.isfinite(torch.as_tensor(v)).all()]


class NonFiniteGuard(L.Callback):
    def __init__(self, max_consecutive_skips: int = 5):
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped = 0  # steps skipped in the whole run (restored on resume)
        self.consecutive = 0
        self._loss_finite = True  # over the backward passes of the coming optimizer step

    def on_before_backward(self, trainer: L.Trainer, module: L.LightningModule, loss) -> None:
        self._loss_finite &= bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = grad_norm(params)
        bad = nonfinite({"grad_norm": norm}) + ([] if self._loss_finite else ["loss"])
        self._loss_finite = True
        skip = trainer.strategy.reduce_boolean_decision(bool(bad), all=False)  # any rank
        if skip:
            for p in params:
                p.grad = None
            self.skipped += 1
            self.consecutive += 1
            log.warning(
                "step %d: non-finite %s; optimizer step skipped (%d in a row, %d in all)",
                trainer.global_step,
                " and ".join(bad) or "values on another rank",
                self.consecutive,
                self.skipped,
            )
        else:
            self.consecutive = 0
        module.log("train/grad_norm", norm.item())
        module.log("train/skipped_steps", float(self.skipped))

    def on_train_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx) -> None:
        # Runs before ModelCheckpoint's hook (Lightning orders checkpointing last).
        if self.consecutive < self.max_consecutive_skips:
            return
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        path = Path(folder or Path(trainer.default_root_dir) / "checkpoints") / STOP_CHECKPOINT
        trainer.save_checkpoint(path)
        raise NonFiniteError(
            f"{self.consecutive} optimizer steps in a row had a non-finite loss or gradient "
            f"(up to step {trainer.global_step}; see train/loss, train/reward/*, train/kl and "
            f"train/grad_norm in the logs). None of them reached the weights; those of the last "
            f"good step are saved in {path}. Lower the learning rate, check the data and "
            f"rewards, or raise callbacks.nonfinite.max_consecutive_skips"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped, self.consecutive = state["skipped"], state["consecutive"]
