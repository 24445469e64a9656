"""Config checks at start-up and the project's OmegaConf resolvers.

`validate(cfg)` runs first in `hcm.train.run_stage` and `hcm.evaluate.evaluate`, before any
data or model is touched, so a wrong override fails in a second, naming the key: a wrong type
(`module.group_size=abc`, `module.beta=[1]`, `data.batch_size=2.5`, `null` where a value is
needed, NaN or infinity), a value out of range (G < 2, beta < 0, clip_eps outside (0, 1), ...),
a name that is not one of the choices, `data.switch_epoch` past `trainer.max_epochs`, and a
difficulty band that is empty, combined with DAPO's redraws, or would desynchronise FSDP ranks.

Keys absent from a config are skipped (an SFT stage has no `module.group_size`). Checks are one
table, RULES; the allowed names come from the modules that use them, except the model's dtype
and attention names and LoRA's target layers, copied here so that a config check does not import
transformers or peft (a test pins them to hcm.model.loading's and hcm.model.lora's).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from hcm.data.datasets import SFT_SOURCES
from hcm.data.sampler import COMPOSITIONS
from hcm.data.synthetic import dataset_args, dataset_digest
from hcm.grpo_math import ADVANTAGE_SCALES, AGGREGATIONS, RATIO_LEVELS
from hcm.mining import CORRECTNESS
from hcm.prompts import LAYOUTS
from hcm.rewards import REWARDS

DTYPE_NAMES = ("auto", "bf16", "fp16", "fp32")  # = hcm.model.loading.DTYPES plus auto
ATTN_NAMES = ("auto", "flash_attention_2", "sdpa", "eager")  # = loading.ATTN_IMPLEMENTATIONS
# = hcm.model.lora.LM_TARGETS (the language model's linear layers)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DATA_MODES = ("sft", "grpo", "eval")
BAND_KEYS = ("low", "high", "oversample")  # module.difficulty_band


class ConfigError(ValueError):
    """A config value of the wrong type or out of range, naming the key."""


def wandb_offline() -> bool:
    """Offline unless a W&B login is configured (API key in the environment or ~/.netrc)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


REPO_DIR = Path(__file__).resolve().parents[1]


def synthetic_digest(node: DictConfig) -> str:
    return dataset_digest(*dataset_args(OmegaConf.to_container(node, resolve=True)))


def register_resolvers() -> None:
    """`${hcm.wandb_offline:}`, `${hcm.cwd:}` (the launch folder, also where Hydra's own
    `${hydra:runtime.cwd}` is not yet set: a multirun's sweep dir), `${hcm.repo_dir:}`
    (this checkout, whatever the launch folder: where `sweeps/` is searched) and
    `${hcm.synthetic_digest:${data.synthetic}}` (a short hash of what makes a synthetic dataset:
    its folder's name, so that configs making different data never share a folder)."""
    resolvers = {
        "hcm.wandb_offline": wandb_offline,
        "hcm.cwd": os.getcwd,
        "hcm.repo_dir": lambda: str(REPO_DIR),
        "hcm.synthetic_digest": synthetic_digest,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


# -- checks: a predicate and the words that say what it accepts ----------------------------------
@dataclass(frozen=True)
class Check:
    ok: Callable[[Any], bool]
    expected: str


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    """A finite int or float (not a bool, NaN or infinity)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def int_at_least(low: int) -> Check:
    return Check(lambda v: is_int(v) and v >= low, f"an integer >= {low}")


def num_in(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False):
    """A number in the interval; `high` infinite: only bounded below."""

    def ok(v: Any) -> bool:
        if not is_num(v):
            return False
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below

    if math.isinf(high):
        return Check(ok, f"a number {'>' if low_open else '>='} {low}")
    brackets = "(" if low_open else "[", ")" if high_open else "]"
    return Check(ok, f"a number in {brackets[0]}{low}, {high}{brackets[1]}")


def one_of(choices: tuple[str, ...]) -> Check:
    return Check(lambda v: isinstance(v, str) and v in choices, f"one of {choices}")


BOOL = Check(lambda v: isinstance(v, bool), "true or false")
NON_EMPTY_STR = Check(lambda v: isinstance(v, str) and v != "", "a non-empty string")


def list_of(item: Check, expected: str, min_len: int = 0, max_len: int | None = None) -> Check:
    return Check(
        lambda v: (
            isinstance(v, ListConfig)
            and min_len <= len(v) <= (len(v) if max_len is None else max_len)
            and all(item.ok(x) for x in v)
        ),
        expected,
    )


def mapping_of(keys: tuple[str, ...], value: Check, expected: str) -> Check:
    return Check(
        lambda v: (
            isinstance(v, DictConfig) and all(k in keys and value.ok(x) for k, x in v.items())
        ),
        expected,
    )


@dataclass(frozen=True)
class Rule:
    """A config key's check. `nullable`: null is a meaningful value (e.g. "use the default");
    `why` is said after what the check expects."""

    key: str
    check: Check
    nullable: bool = False
    why: str = ""

    def ok(self, value: Any) -> bool:
        return self.check.ok(value)

    @property
    def expected(self) -> str:
        words = self.check.expected + (" or null" if self.nullable else "")
        return f"{words} ({self.why})" if self.why else words


RULES: tuple[Rule, ...] = (
    Rule("seed", int_at_least(0)),
    Rule("on_code_change", one_of(("warn", "refuse"))),
    Rule("keep_checkpoints", BOOL),
    # model
    Rule("model.name_or_path", NON_EMPTY_STR),
    Rule("model.dtype", one_of(DTYPE_NAMES)),
    Rule("model.attn_implementation", one_of(ATTN_NAMES)),
    Rule("model.gradient_checkpointing", BOOL),
    Rule("model.trust_remote_code", BOOL),
    Rule("model.max_patches", int_at_least(1)),
    Rule("model.image_layout", one_of(LAYOUTS)),
    # data
    Rule("data.mode", one_of(DATA_MODES)),
    Rule("data.image_layout", one_of(LAYOUTS)),
    Rule(
        "data.sft_sources",
        list_of(one_of(tuple(SFT_SOURCES)), f"a non-empty list of {tuple(SFT_SOURCES)}", 1),
    ),
    Rule("data.batch_size", int_at_least(1)),
    Rule("data.eval_batch_size", int_at_least(1)),
    Rule("data.num_workers", int_at_least(0)),
    Rule("data.limit_eval", int_at_least(1), nullable=True),
    Rule("data.skip_invalid", BOOL),
    Rule("data.check_images", BOOL),
    Rule("data.switch_epoch", int_at_least(0)),
    Rule("data.composition", one_of(COMPOSITIONS)),
    # trainer (Lightning checks the rest when the Trainer is built, before any model is loaded)
    Rule("trainer.max_epochs", int_at_least(1), nullable=True),
    # module: both stages
    Rule("module.optimizer.lr", num_in(0)),
    Rule("module.optimizer.weight_decay", num_in(0)),
    Rule(
        "module.optimizer.betas",
        list_of(num_in(0, 1, high_open=True), "a list of two numbers in [0, 1)", 2, 2),
    ),
    Rule("module.scheduler.warmup_ratio", num_in(0, 1)),
    Rule("module.scheduler.min_lr_ratio", num_in(0, 1)),
    Rule("module.freeze.vision_tower", BOOL),
    Rule("module.freeze.projector", BOOL),
    Rule("module.freeze.language_model", BOOL),
    # module: LoRA (conf/lora/; absent: full fine-tuning)
    Rule("module.lora.rank", int_at_least(1), why="r"),
    Rule("module.lora.alpha", num_in(0, low_open=True)),
    Rule("module.lora.dropout", num_in(0, 1, high_open=True)),
    Rule(
        "module.lora.target_modules",
        list_of(one_of(LORA_TARGETS), f"a non-empty list of {LORA_TARGETS}", 1),
    ),
    Rule("module.lora.save_adapter", BOOL),
    Rule("max_completion_length", int_at_least(1)),
    Rule("module.eval_generation.max_new_tokens", int_at_least(1)),
    Rule("generation.max_new_tokens", int_at_least(1)),
    # module: GRPO (eqs. 2-7)
    Rule("module.group_size", int_at_least(2), why="G: GRPO needs a group"),
    Rule("module.beta", num_in(0)),
    Rule("module.kl_clamp", num_in(0, low_open=True), nullable=True),
    Rule("module.clip_eps", num_in(0, 1, low_open=True, high_open=True)),
    Rule("module.clip_eps_high", num_in(0, 1, low_open=True, high_open=True), nullable=True),
    Rule("module.num_iterations", int_at_least(1), why="mu"),
    Rule("module.loss_level", one_of(RATIO_LEVELS)),
    Rule("module.loss_agg", one_of(AGGREGATIONS)),
    Rule("module.advantage_scale", one_of(ADVANTAGE_SCALES)),
    Rule(
        "module.rewards",
        mapping_of(tuple(REWARDS), num_in(0), f"a mapping of {tuple(REWARDS)} to weights >= 0"),
    ),
    Rule("module.sampling.temperature", num_in(0, low_open=True)),
    Rule("module.sampling.top_p", num_in(0, 1, low_open=True)),
    Rule("module.sampling.top_k", int_at_least(0)),
    Rule("module.sampling.max_new_tokens", int_at_least(1)),
    Rule("module.mini_batch_size", int_at_least(1), nullable=True),
    Rule("module.logprob_chunk_size", int_at_least(1)),
    Rule("module.max_grad_norm", num_in(0, low_open=True), nullable=True),
    Rule("module.resample_zero_variance", int_at_least(0)),
    Rule(
        "module.difficulty_band",
        Check(
            lambda v: isinstance(v, DictConfig) and set(v) == set(BAND_KEYS),
            "a mapping of exactly {low, high, oversample}",
        ),
        nullable=True,
        why="null: no online difficulty selection",
    ),
    Rule("module.difficulty_band.low", num_in(0, 1)),
    Rule("module.difficulty_band.high", num_in(0, 1)),
    Rule("module.difficulty_band.oversample", int_at_least(1)),
    Rule("data.oversample", int_at_least(1)),
    Rule("module.mask_truncated_completions", BOOL),
    Rule("module.stop_at_switch", BOOL),
    Rule("module.log_completions_every_n_steps", int_at_least(0), nullable=True),
    Rule("module.mining.k", int_at_least(1)),
    Rule("module.mining.pass_threshold", num_in(0, 1, low_open=True)),
    Rule("module.mining.temperature", num_in(0, low_open=True)),
    Rule("module.mining.correct", one_of(CORRECTNESS)),
    Rule("module.mining.batch_size", int_at_least(1), nullable=True),
)

_ABSENT = object()


def _value(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
    except MissingMandatoryValue:
        raise ConfigError(f"config key '{key}' is missing ('???'): set it") from None
    except InterpolationResolutionError:
        # e.g. ${hydra:...} outside a Hydra run: resolving it later gives OmegaConf's own error
        return _ABSENT


def _show(value: Any) -> str:
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value)
    return repr(value)


def _check_schedule(cfg: DictConfig) -> None:
    """GRPO's HCM schedule (Table 7): all data for switch_epoch epochs, then the composition."""
    if OmegaConf.select(cfg, "data.mode", default=None) != "grpo":
        return  # SFT and evaluation have no schedule
    switch = _value(cfg, "data.switch_epoch")
    epochs = _value(cfg, "trainer.max_epochs")
    composition = _value(cfg, "data.composition")
    if not (is_int(switch) and is_int(epochs)):
        return
    if switch > epochs:
        raise ConfigError(
            f"config key 'data.switch_epoch' = {switch} is past 'trainer.max_epochs' = {epochs}"
        )
    if _value(cfg, "module.stop_at_switch") is True and switch < 1:
        raise ConfigError(
            "config key 'module.stop_at_switch' = True needs 'data.switch_epoch' >= 1 "
            f"(got {switch}): a shared first stage trains the epochs before the switch"
        )
    if switch == epochs and composition not in (_ABSENT, "all"):
        # hard-case mining (a generation pass over the train split) would be wasted
        raise ConfigError(
            f"config key 'data.switch_epoch' = {switch} equals 'trainer.max_epochs': "
            f"data.composition={composition!r} would never be used; lower data.switch_epoch, "
            "raise trainer.max_epochs or set data.composition=all"
        )


def _check_band(cfg: DictConfig) -> None:
    """module.difficulty_band's rules across keys (each key's own range is in RULES)."""
    band = _value(cfg, "module.difficulty_band")
    oversample = _value(cfg, "data.oversample")
    wanted = 1 if band in (None, _ABSENT) else band.oversample
    if oversample is not _ABSENT and oversample != wanted:
        raise ConfigError(
            f"config key 'data.oversample' = {oversample} must equal "
            f"module.difficulty_band.oversample ({wanted}; 1 without a band), which it follows: "
            "set that instead"
        )
    if band in (None, _ABSENT):
        return
    if band.low > band.high:
        raise ConfigError(
            f"config key 'module.difficulty_band' = {_show(band)}: low must be <= high"
        )
    if (_value(cfg, "module.resample_zero_variance") or 0) > 0:
        raise ConfigError(
            "config key 'module.difficulty_band' is set together with "
            "'module.resample_zero_variance' > 0: both choose the groups a step trains on, and a "
            "redraw changes the pass rate the band selected a group by; use one of the two"
        )
    strategy = str(_value(cfg, "trainer.strategy._target_"))
    if "FSDP" in strategy and _value(cfg, "module.mini_batch_size") not in (None, _ABSENT):
        raise ConfigError(
            "config key 'module.difficulty_band' under FSDP needs module.mini_batch_size=null: "
            "the band keeps a different number of groups on each rank, so mini-batches would "
            "give the ranks different numbers of (collective) forward passes"
        )


def validate(cfg: DictConfig, rules: tuple[Rule, ...] = RULES) -> None:
    """Reject wrong types and out-of-range values before anything heavy starts.

    Raises ConfigError naming the first bad key, its value and what was expected.
    """
    for rule in rules:
        value = _value(cfg, rule.key)
        if value is _ABSENT or (value is None and rule.nullable):
            continue
        if value is None or not rule.ok(value):
            raise ConfigError(
                f"config key '{rule.key}' = {_show(value)} is invalid: expected {rule.expected}"
            )
    _check_schedule(cfg)
    _check_band(cfg)
