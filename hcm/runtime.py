"""What every Lightning run (a training stage, an evaluation) sets up around its Trainer: the
precision, the loggers and callbacks of the config, and the W&B run closed at the end."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


def precision_for(requested: str) -> str:
    """`trainer.precision` as it runs here: auto = bf16-mixed on CUDA, fp32 on CPU."""
    if requested != "auto":
        return requested
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def resolve_precision(cfg: DictConfig) -> None:
    if cfg.trainer.get("precision") == "auto":
        with open_dict(cfg):
            cfg.trainer.precision = precision_for("auto")


def make_loggers(cfg: DictConfig) -> list:
    loggers = []
    for c in (cfg.get("logger") or {}).values():
        if not c:
            continue
        if str(c.get("_target_")).endswith("WandbLogger") and wandb_disabled():
            # WandbLogger's offline mode would overwrite WANDB_MODE and write an offline run
            log.info("WANDB_MODE=disabled: no W&B logger")
            continue
        loggers.append(instantiate(c))
    for lg in loggers:
        if type(lg).__name__ == "CSVLogger":
            keep_csv(Path(lg.log_dir))
    return loggers


def wandb_disabled() -> bool:
    return os.environ.get("WANDB_MODE", "").lower() == "disabled"


def keep_csv(folder: Path) -> None:
    """Lightning's CSVLogger deletes an existing metrics.csv: a rerun (a resume) would lose the
    first run's rows. Keep them as metrics-<time>.csv beside the new file (hcm.curves.read_log
    reads the parts as one log)."""
    old = folder / "metrics.csv"
    if old.is_file() and rank_zero_only.rank == 0:  # DDP: every rank makes its loggers
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(old.stat().st_mtime))
        kept, n = folder / f"metrics-{stamp}.csv", 1
        while kept.exists():
            kept, n = folder / f"metrics-{stamp}-{n}.csv", n + 1
        old.rename(kept)
        log.info("kept the earlier run's %s as %s", old, kept.name)


def make_callbacks(cfg: DictConfig) -> list:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]


def finish_loggers(loggers: list) -> None:
    """Close W&B runs so that multirun jobs never share one."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb  # optional heavy dependency: only runs with a W&B logger need it

            wandb.finish()
