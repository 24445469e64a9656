"""Config checks at start-up and the project's OmegaConf resolvers.

A wrong override should fail before any model is loaded, naming the key: G < 2, beta < 0,
clip_eps outside (0, 1), switch_epoch past the last epoch, an unknown composition...
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

COMPOSITIONS = ("all", "hard_only", "easy_only", "all_plus_hard", "all_plus_random")


class ConfigError(ValueError):
    """A config value out of range, naming the key."""


def wandb_offline() -> bool:
    """Offline unless a W&B login is configured (API key in the environment or ~/.netrc)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("hcm.wandb_offline"):
        OmegaConf.register_new_resolver("hcm.wandb_offline", wandb_offline)


def _check(cfg: DictConfig, key: str, ok, expected: str) -> None:
    value = OmegaConf.select(cfg, key, default=None)
    if value is not None and not ok(value):
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: expected {expected}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def validate(cfg: DictConfig) -> None:
    """Reject wrong types and out-of-range values before anything heavy starts."""
    _check(cfg, "seed", _is_int, "an integer")
    _check(cfg, "data.batch_size", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    _check(cfg, "data.eval_batch_size", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    _check(cfg, "data.composition", lambda v: v in COMPOSITIONS, f"one of {COMPOSITIONS}")
    _check(cfg, "data.switch_epoch", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _check(cfg, "trainer.max_epochs", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    _check(cfg, "module.group_size", lambda v: _is_int(v) and v >= 2, "an integer >= 2 (G)")
    _check(cfg, "module.beta", lambda v: _is_num(v) and v >= 0, "a number >= 0")
    _check(cfg, "module.clip_eps", lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1)")
    _check(cfg, "module.clip_eps_high", lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1)")
    _check(cfg, "module.num_iterations", lambda v: _is_int(v) and v >= 1, "an integer >= 1 (mu)")
    _check(cfg, "module.sampling.temperature", lambda v: _is_num(v) and v > 0, "a number > 0")
    _check(cfg, "module.sampling.top_p", lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]")
    _check(cfg, "module.sampling.top_k", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _check(cfg, "module.optimizer.lr", lambda v: _is_num(v) and v >= 0, "a number >= 0")
    switch = OmegaConf.select(cfg, "data.switch_epoch", default=None)
    epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    mode = OmegaConf.select(cfg, "data.mode", default=None)
    if mode == "grpo" and _is_int(switch) and _is_int(epochs) and switch > epochs:
        raise ConfigError(
            f"config key 'data.switch_epoch' = {switch} is past 'trainer.max_epochs' = {epochs}"
        )
