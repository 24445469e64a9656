"""hcm.console: known-harmless third-party warnings and log lines hidden, others kept; the
project's own config and input errors as one line from train.py / eval.py, the traceback with
HYDRA_FULL_ERROR=1; a library's error keeps its traceback."""

from __future__ import annotations

import logging
import warnings

import pytest
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from test_entrypoints import REPO, run_cli

from hcm import console
from hcm.config import ConfigError, validate


def test_harmless_warnings_hidden_others_shown():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        console.install()
        warnings.warn(
            "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`",
            FutureWarning,
            stacklevel=1,
        )
        warnings.warn(
            "Found 79 module(s) in eval mode at the start of training. This may lead to ...",
            UserWarning,
            stacklevel=1,
        )
        for old in ("gradient_checkpointing", "is_gradient_checkpointing"):  # TRL's, in the bench
            new = old.replace("gradient", "activation")
            message = f"`{old}` is deprecated and will be removed in v6. Use `{new}` instead."
            warnings.warn(message, FutureWarning, stacklevel=1)
        warnings.warn("something nobody has seen before", UserWarning, stacklevel=1)
        warnings.warn("`isinstance(x, Y)` is deprecated", FutureWarning, stacklevel=1)
        warnings.warn(
            "`use_cache` is deprecated and will be removed in v6", FutureWarning, stacklevel=1
        )
    assert [str(w.message) for w in seen] == [
        "something nobody has seen before",
        "`isinstance(x, Y)` is deprecated",
        "`use_cache` is deprecated and will be removed in v6",
    ]


def test_harmless_log_lines_hidden_others_shown(caplog):
    console.install()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("💡 Tip: For seamless cloud logging, try installing [litlogger]")
        logger.info("TPU available: False, using: 0 TPU cores")
        logger.info("GPU available: True (cuda), used: True")
        logger.info("TPU available: True, using: 0 TPU cores")
        logger.info("GPU available: False, used: False")
        logging.getLogger("lightning.fabric.utilities.seed").info("Seed set to 0")
    assert [r.getMessage() for r in caplog.records] == [
        "GPU available: True (cuda), used: True",
        "TPU available: True, using: 0 TPU cores",
    ]


@pytest.mark.slow
def test_a_pipelines_console_shows_banners_progress_results_and_real_warnings(tmp_path):
    """The console of a tiny SFT -> GRPO pipeline through train.py: each stage's banner, the
    summary and a real warning (a logging interval longer than an epoch) are there; Lightning's
    and transformers' chatter about seeds, hardware, submodules and weight files is not."""
    args = ["experiment=tiny_hcm", "pipeline.sft_1_2=null", "pipeline.grpo.init_from=sft_1_1"]
    args += ["pipeline.eval=null", "trainer.limit_train_batches=2", "trainer.log_every_n_steps=50"]
    r = run_cli(str(REPO / "train.py"), *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    shown = r.stdout + r.stderr
    assert "━━ stage 1/2: sft_1_1 (sft)" in shown and "━━ stage 2/2: grpo (grpo)" in shown
    assert "| grpo | grpo, last validation |" in shown  # the summary table
    assert "is smaller than the logging interval Trainer(log_every_n_steps=50)" in shown
    chatter = ["Seed set to", "GPU available: False", "TPU available", "HPU available", "💡 Tip"]
    chatter += ["Loading weights", "Writing model shards", "Total params", "┃ Name", "eval mode"]
    assert [line for line in shown.splitlines() if any(c in line for c in chatter)] == []


def raise_in_project() -> ConfigError:
    try:
        validate(OmegaConf.create({"data": {"batch_size": 0}}))
    except ConfigError as e:
        return e
    raise AssertionError("validate accepted data.batch_size=0")


def raise_elsewhere() -> ValueError:
    try:
        int("twelve")
    except ValueError as e:
        return e
    raise AssertionError


def test_user_errors_are_the_projects_own():
    own = raise_in_project()
    assert console.user_error(own) is own
    try:  # behind Hydra's instantiate wrapper, as a DataModule's constructor check arrives
        raise InstantiationException("Error in call to target ...") from own
    except InstantiationException as wrapped:
        assert console.user_error(wrapped) is own
    assert console.user_error(raise_elsewhere()) is None  # a library's (or a bug's) ValueError
    assert console.user_error(RuntimeError("boom")) is None


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_bad_config_value_is_one_line(tmp_path, script):
    experiment = "tiny_sft" if script == "train.py" else "tiny_eval"
    r = run_cli(str(REPO / script), f"experiment={experiment}", "data.batch_size=0", cwd=tmp_path)
    assert r.returncode == console.EXIT_USER_ERROR, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "data.batch_size" in line]
    assert errors == [
        "error: config key 'data.batch_size' = 0 is invalid: expected an integer >= 1 "
        "(HYDRA_FULL_ERROR=1 for the traceback)"
    ]
    assert "Traceback" not in r.stderr + r.stdout


def test_full_error_flag_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    r = run_cli(str(REPO / "train.py"), "experiment=tiny_sft", "data.batch_size=0", cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback (most recent call last)" in r.stderr
    assert "hcm.config.ConfigError: config key 'data.batch_size' = 0 is invalid" in r.stderr
    assert "error: config key" not in r.stderr
