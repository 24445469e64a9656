"""Start-up config validation (issue 7): a wrong type or out-of-range override is rejected before
any data or model is touched, naming the key; `trust_remote_code` is off unless configured.

Cases: 49 rejected values, each naming its key: 14 command-line overrides through Hydra's
parser into `train(cfg)` with instantiation forbidden (wrong types incl. null, NaN, infinity,
bools, a quoted number, an unknown reward; G < 2; switch_epoch > epochs), 29 out-of-range values
and unknown choices (beta < 0, clip_eps outside (0, 1), ...), 2 schedule rules (switch_epoch past
max_epochs; equal to it with a composition that would never run), one through `evaluate(cfg)`,
one checked for its full message, a '???' value, and one through the real CLI (`train.py ...
module.group_size=1`, and a LoRA rank of 0: exit code, key in stderr, no data or model built);
6 bad LoRA values (conf/lora/) in an SFT and a GRPO stage; 11 bad difficulty bands
(module.difficulty_band, data.oversample). Also: every shipped
experiment and pipeline stage validates (14), and trust_remote_code is false in every model
config (3) and reaches every loader, the module and the data module (5).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import hcm.evaluate
import hcm.runtime
import hcm.train
from hcm.config import ATTN_NAMES, DTYPE_NAMES, LORA_TARGETS, ConfigError, validate
from hcm.model import loading, lora

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


@pytest.fixture
def no_instantiate(monkeypatch):
    """Fail the test if anything (data module, module, trainer, loggers) is instantiated."""

    def forbidden(*args, **kwargs):
        raise AssertionError("instantiated before the config was validated")

    monkeypatch.setattr(hcm.train, "instantiate", forbidden)
    monkeypatch.setattr(hcm.evaluate, "instantiate", forbidden)
    monkeypatch.setattr(hcm.runtime, "instantiate", forbidden)
    monkeypatch.setattr(hcm.train.stages, "finished", forbidden)


# Through Hydra's override parser and train(): the types the command line produces.
BAD_OVERRIDES = [
    ("module.group_size=abc", "module.group_size"),
    ("module.group_size=2.5", "module.group_size"),
    ("module.group_size=null", "module.group_size"),
    ("module.group_size=true", "module.group_size"),
    ("module.beta=[1]", "module.beta"),
    ("module.beta=nan", "module.beta"),
    ("module.beta=inf", "module.beta"),
    ("module.optimizer.lr=abc", "module.optimizer.lr"),
    ("data.batch_size=2.5", "data.batch_size"),
    ("data.batch_size='8'", "data.batch_size"),
    ("+module.rewards.bogus=1.0", "module.rewards"),
    ("model.trust_remote_code=yes", "model.trust_remote_code"),
    ("module.group_size=1", "module.group_size"),
    ("data.switch_epoch=3", "data.switch_epoch"),  # tiny_grpo: trainer.max_epochs=2
    ("max_completion_length=0", "max_completion_length"),
    ("module.kl_clamp=0", "module.kl_clamp"),
    ("module.mask_truncated_completions=1", "module.mask_truncated_completions"),
    ("module.mining.correct=lenient", "module.mining.correct"),
]
# LoRA (conf/lora/): refused before the model is loaded, naming the key
BAD_LORA = [
    ("module.lora.rank=0", "module.lora.rank"),
    ("module.lora.alpha=0", "module.lora.alpha"),
    ("module.lora.dropout=1.0", "module.lora.dropout"),
    ("module.lora.target_modules=[q_proj,qkv_proj]", "module.lora.target_modules"),
    ("module.lora.target_modules=[lm_head]", "module.lora.target_modules"),
    ("module.lora.target_modules=[]", "module.lora.target_modules"),
]


@pytest.mark.parametrize(("override", "key"), BAD_OVERRIDES)
def test_bad_override_is_rejected_before_anything_is_built(
    compose_cfg, no_instantiate, override, key
):
    cfg = compose_cfg("train", ["experiment=tiny_grpo", override])
    with pytest.raises(ConfigError, match=f"config key '{re.escape(key)}'"):
        hcm.train.train(cfg)


@pytest.mark.parametrize("experiment", ["tiny_sft", "tiny_grpo"])
@pytest.mark.parametrize(("override", "key"), BAD_LORA)
def test_bad_lora_value_is_rejected_before_anything_is_built(
    compose_cfg, no_instantiate, experiment, override, key
):
    cfg = compose_cfg("train", [f"experiment={experiment}", "lora=default", override])
    with pytest.raises(ConfigError, match=f"config key '{re.escape(key)}'"):
        hcm.train.train(cfg)


@pytest.fixture(scope="module")
def grpo_cfg():
    """tiny_grpo composed once; each range case below edits a copy."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=tiny_grpo"])
    return cfg


OUT_OF_RANGE = [
    ("module.group_size", 1),
    ("module.beta", -0.01),
    ("module.clip_eps", 0),
    ("module.clip_eps", 1.0),
    ("module.clip_eps", -0.2),
    ("module.clip_eps_high", 1.5),
    ("module.num_iterations", 0),
    ("module.loss_level", "sentence"),
    ("module.loss_agg", "mean"),
    ("module.clip_eps_high", -0.1),
    ("module.advantage_scale", "std"),
    ("module.rewards.dpa", -1),
    ("module.sampling.top_p", 0),
    ("module.sampling.temperature", 0),
    ("module.sampling.top_k", -1),
    ("module.mining.pass_threshold", 1.5),
    ("module.mini_batch_size", 0),
    ("module.max_grad_norm", 0),
    ("module.optimizer.betas", [0.9]),
    ("data.batch_size", 0),
    ("data.switch_epoch", -1),
    ("data.composition", "hardest"),
    ("data.sft_sources", []),
    ("data.sft_sources", ["captions"]),
    ("data.limit_eval", 0),
    ("trainer.max_epochs", 0),
    ("model.dtype", "fp8"),
    ("model.attn_implementation", "flash"),
    ("model.max_patches", 0),
    ("seed", -1),
    ("seed", 1.5),
]


@pytest.mark.parametrize(("key", "value"), OUT_OF_RANGE)
def test_out_of_range_value_is_rejected_naming_the_key(grpo_cfg, key, value):
    cfg = copy.deepcopy(grpo_cfg)
    validate(cfg)  # the unedited config is valid
    OmegaConf.update(cfg, key, value)
    shown = re.escape(repr(value))
    check = key.rsplit(".", 1)[0] if key == "module.rewards.dpa" else key
    with pytest.raises(ConfigError, match=f"config key '{re.escape(check)}' = .*{shown}"):
        validate(cfg)


def test_switch_epoch_schedule_rules(grpo_cfg, compose_cfg):
    cfg = copy.deepcopy(grpo_cfg)  # trainer.max_epochs=2, composition all
    cfg.data.switch_epoch = 2
    validate(cfg)  # all data in every epoch: allowed
    cfg.data.composition = "hard_only"
    with pytest.raises(ConfigError, match=r"'data.switch_epoch' = 2 equals.*never be used"):
        validate(cfg)
    cfg.data.switch_epoch = 3
    with pytest.raises(ConfigError, match=r"'data.switch_epoch' = 3 is past 'trainer.max_epochs'"):
        validate(cfg)
    # SFT has no schedule: its (unused) switch_epoch may exceed its epochs
    validate(compose_cfg("train", ["experiment=tiny_sft", "trainer.max_epochs=1"]))


BAND = "module.difficulty_band={low:0.25,high:0.75,oversample:2}"
BAD_BANDS = [  # (overrides, the key named, what the message must say)
    (
        ["module.difficulty_band={low:0.8,high:0.2,oversample:2}"],
        "module.difficulty_band",
        "low must be <= high",
    ),
    (["module.difficulty_band={low:-0.1,high:0.5,oversample:2}"], "module.difficulty_band.low", ""),
    (["module.difficulty_band={low:0.2,high:1.5,oversample:2}"], "module.difficulty_band.high", ""),
    (
        ["module.difficulty_band={low:0.2,high:0.8,oversample:0}"],
        "module.difficulty_band.oversample",
        ">= 1",
    ),
    (
        ["module.difficulty_band={low:0.2,high:0.8,oversample:1.5}"],
        "module.difficulty_band.oversample",
        "integer",
    ),
    (["module.difficulty_band={low:0.2,high:0.8}"], "module.difficulty_band", "exactly"),
    (["module.difficulty_band=0.5"], "module.difficulty_band", "mapping"),
    ([BAND, "module.resample_zero_variance=1"], "module.difficulty_band", "redraw"),
    (["data.oversample=2"], "data.oversample", "follows"),  # no band: data.oversample is 1
    ([BAND, "data.oversample=3"], "data.oversample", "follows"),
]


@pytest.mark.parametrize(("overrides", "key", "says"), BAD_BANDS)
def test_bad_difficulty_band_is_rejected_naming_the_key(
    compose_cfg, no_instantiate, overrides, key, says
):
    cfg = compose_cfg("train", ["experiment=tiny_grpo", *overrides])
    with pytest.raises(ConfigError, match=f"config key '{re.escape(key)}'.*{re.escape(says)}"):
        hcm.train.train(cfg)


def test_difficulty_band_sets_the_draws_and_fsdp_needs_whole_batches(compose_cfg):
    assert compose_cfg("train", ["experiment=tiny_grpo"]).data.oversample == 1  # off: the paper
    cfg = compose_cfg("train", ["experiment=tiny_grpo", BAND])
    validate(cfg)
    assert cfg.data.oversample == 2  # the loader draws 2 x data.batch_size prompts
    fsdp = ["experiment=tiny_grpo", BAND, "trainer=fsdp"]
    validate(compose_cfg("train", fsdp))  # one forward per phase on every rank: in step
    with pytest.raises(ConfigError, match=r"'module.difficulty_band' under FSDP.*mini_batch"):
        validate(compose_cfg("train", [*fsdp, "module.mini_batch_size=4"]))


def test_evaluate_validates_first(compose_cfg, no_instantiate):
    cfg = compose_cfg("eval", ["experiment=tiny_eval", "generation.max_new_tokens=0"])
    with pytest.raises(ConfigError, match=r"config key 'generation.max_new_tokens' = 0"):
        hcm.evaluate.evaluate(cfg)


def test_error_names_value_and_expectation_and_absent_keys_are_skipped():
    with pytest.raises(ConfigError) as err:
        validate(OmegaConf.create({"module": {"beta": [1]}}))
    assert str(err.value) == "config key 'module.beta' = [1] is invalid: expected a number >= 0"
    validate(OmegaConf.create({"data": {"batch_size": 1}}))  # nothing else present: fine
    with pytest.raises(ConfigError, match=r"'module.group_size' is missing"):
        validate(OmegaConf.create({"module": {"group_size": "???"}}))


def _stage_configs(compose_cfg, experiment: str):
    """The experiment's config and, for a pipeline, each stage's as run_pipeline composes it."""
    name = "eval" if experiment == "tiny_eval" else "train"
    cfg = compose_cfg(name, [f"experiment={experiment}"])
    yield experiment, cfg
    for stage_name, stage in (cfg.get("pipeline") or {}).items():
        if stage is None:
            continue
        overrides = [f"experiment={stage.experiment}"] if stage.get("experiment") else []
        kind = "eval" if stage.get("kind") == "eval" else "train"
        yield (
            f"{experiment}/{stage_name}",
            compose_cfg(kind, [*overrides, *stage.get("overrides", [])]),
        )


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_shipped_experiment_and_stage_validates(compose_cfg, experiment):
    for where, cfg in _stage_configs(compose_cfg, experiment):
        validate(cfg)
        assert cfg.model.trust_remote_code is False, where


def test_model_names_match_the_loader():
    assert set(DTYPE_NAMES) == {"auto", *loading.DTYPES}
    assert set(ATTN_NAMES) == set(loading.ATTN_IMPLEMENTATIONS)
    assert LORA_TARGETS == lora.LM_TARGETS


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["module.group_size=1"], "config key 'module.group_size' = 1 is invalid"),
        (["lora=default", "module.lora.rank=0"], "config key 'module.lora.rank' = 0 is invalid"),
    ],
)
def test_cli_fails_fast_naming_the_key(tmp_path, overrides, message):
    root = tmp_path / "root"
    env = {**os.environ, "HCM_ROOT": str(root), "WANDB_MODE": "offline"}
    r = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "experiment=tiny_grpo", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1  # one line
    # no synthetic data generated and no tiny model built: it stopped at the config
    assert not (root / "data").exists() and not (root / ".cache").exists()


# -- trust_remote_code ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((REPO / "conf" / "model").glob("*.yaml")), ids=str)
def test_model_configs_do_not_trust_remote_code(path):
    assert OmegaConf.load(path).trust_remote_code is False


class Recorder:
    """Stands in for a transformers class: records from_pretrained's keyword arguments."""

    def __init__(self, calls: list, product=None):
        self.calls, self.product = calls, product

    def from_pretrained(self, name_or_path, **kwargs):
        self.calls.append(kwargs.get("trust_remote_code", "absent"))
        return self.product


class FakeTokenizer:
    context_image_token = start_image_token = end_image_token = "<x>"


@pytest.mark.parametrize("trust", [None, False, True])
def test_loaders_pass_trust_remote_code_through(tmp_path, monkeypatch, trust):
    calls: list = []
    monkeypatch.setattr(loading, "InternVLForConditionalGeneration", Recorder(calls))
    monkeypatch.setattr(loading, "AutoTokenizer", Recorder(calls, FakeTokenizer()))
    monkeypatch.setattr(loading, "AutoImageProcessor", Recorder(calls))
    kwargs = {} if trust is None else {"trust_remote_code": trust}
    loading.load_model(tmp_path, dtype="fp32", attn_implementation="sdpa", **kwargs)
    loading.load_tokenizer(tmp_path, **kwargs)
    loading.load_image_processor(tmp_path, **kwargs)
    assert calls == [bool(trust)] * 3


@pytest.mark.parametrize("trust", [None, True])
def test_module_and_datamodule_pass_the_config_flag(tmp_path, monkeypatch, trust):
    import transformers

    import hcm.data.datamodule
    from hcm.data.datamodule import ScreeningDataModule
    from hcm.modules.base import ScreeningModule

    seen: dict[str, object] = {}

    class FakeModel:
        def train(self):
            return self

    def record(name, product=None):
        def fn(*args, **kwargs):
            seen[name] = kwargs.get("trust_remote_code", "absent")
            return product

        return fn

    class Config:
        image_seq_length = 4

    monkeypatch.setattr(loading, "load_model", record("model", FakeModel()))
    monkeypatch.setattr(loading, "load_tokenizer", record("tokenizer"))
    monkeypatch.setattr(loading, "load_image_processor", record("image_processor"))
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", record("config", Config()))
    monkeypatch.setattr(hcm.data.datamodule, "InputBuilder", lambda *a, **k: None)
    model_cfg = {"name_or_path": str(tmp_path)}
    if trust is not None:
        model_cfg["trust_remote_code"] = trust
    ScreeningModule(model=model_cfg, eval_generation={}).configure_model()
    prompt = {"name": "t", "user": "<image> <image>", "caption": "<image> <image>"}
    ScreeningDataModule(str(tmp_path), "eval", model_cfg, prompt)._builder()
    assert seen == dict.fromkeys(("model", "tokenizer", "image_processor", "config"), bool(trust))


def test_one_completion_budget_governs_every_generation_of_a_run(compose_cfg):
    from hcm.train import compose_stages

    grpo = compose_cfg("train", ["experiment=hcm_2b", "max_completion_length=700"])
    stages = {name: cfg for name, _, cfg in compose_stages(grpo)}
    budgets = {
        name: {
            "rollouts": OmegaConf.select(cfg, "module.sampling.max_new_tokens"),
            "validation, mining": OmegaConf.select(cfg, "module.eval_generation.max_new_tokens"),
            "eval": OmegaConf.select(cfg, "generation.max_new_tokens"),
        }
        for name, cfg in stages.items()
    }
    assert {v for b in budgets.values() for v in b.values()} - {None} == {700}, budgets
    assert budgets["grpo"]["rollouts"] == budgets["eval"]["eval"] == 700
    # the pipeline's own value reaches stages whose experiment sets another (tiny_sft: 48)
    tiny = compose_cfg("train", ["experiment=tiny_hcm"])
    assert {OmegaConf.select(c, "max_completion_length") for _, _, c in compose_stages(tiny)} == {
        24
    }
    paper = [compose_cfg("train", ["experiment=hcm_2b"]), compose_cfg("eval", [])]
    assert {c.max_completion_length for c in paper} == {1024}
    assert compose_cfg("train", ["experiment=rl_2b"]).module.kl_clamp is None  # eq. 4 exactly
