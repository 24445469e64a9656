"""What the entry points print around the work: stage banners, no known-harmless third-party
chatter, and the project's own errors as one line.

`install()` (train.py, eval.py and `python -m hcm.bench` call it before anything else) hides, at
this one place, the warnings and log lines listed in HARMLESS_WARNINGS and HARMLESS_LOGS and
transformers' progress bars, each with the reason it is harmless here; any other warning is still
shown. Lightning's model-summary table is printed, not logged: it is switched off where the
Trainer is configured (`enable_model_summary` in conf/trainer/default.yaml).

`one_line_errors()` wraps a Hydra task: an error the project raises itself about a config value
or an input (a ConfigError, a bad record, a missing file or checkpoint) prints `error: <message>`
on stderr and exits with status 2, without a Python traceback. Errors raised elsewhere are bugs
or a library's failure: they keep Hydra's traceback. `HYDRA_FULL_ERROR=1` shows the full
traceback for every error, as Hydra does for its own; a multirun job's error is left to Hydra,
which records the failed job and runs the others.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import huggingface_hub.utils
import transformers.utils.logging
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from lightning.fabric.utilities.exceptions import MisconfigurationException

from hcm.api_eval import ApiError
from hcm.checkpoints import CheckpointError

FULL_ERROR_ENV = "HYDRA_FULL_ERROR"
EXIT_USER_ERROR = 2  # as argparse exits on a bad argument
PACKAGE_DIR = Path(__file__).resolve().parent

# (category, start of the message as a regex), each below the reason it is harmless here
HARMLESS_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # Lightning's own pytree helper uses an API that torch deprecated; nothing to do here
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # GRPO's frozen reference policy stays in eval mode by design (no dropout in it); the
    # trained policy is in train mode
    (Warning, r"Found \d+ module\(s\) in eval mode at the start of training"),
    # hcm.data.datamodule restores the training order's position itself (Lightning cannot tell)
    (Warning, r".*your dataloader is not resumable"),
    # GRPO's checkpoint after its optimizer step is the state a resume needs
    (Warning, r"Using ModelCheckpoint with manual optimization"),
    # a pipeline stage that continues another (continue_from) starts from that stage's
    # checkpoint and writes its own; it keeps no best-k state to reload
    (Warning, r"The dirpath has changed from .* therefore `best_model_score`"),
    # a rerun's CSV logger: hcm.runtime.keep_csv has kept the earlier metrics.csv beside it
    (Warning, r"Experiment logs directory .* exists and is not empty"),
    # transformers 5 renamed gradient to activation checkpointing; the old names work until v6
    # (pyproject keeps transformers < 5.24). TRL 1.16 (the benchmark's reference side, pinned)
    # calls them, and its GRPOConfig gets `gradient_checkpointing`, the name every transformers
    # release we accept knows
    (FutureWarning, r"`(is_)?gradient_checkpointing\w*` is deprecated and will be removed in v6"),
)
# logger name -> starts of the INFO lines it writes that say nothing about this run
HARMLESS_LOGS: dict[str, tuple[str, ...]] = {
    "lightning.pytorch.utilities.rank_zero": (
        "💡 Tip:",  # advertisements for Lightning's cloud products
        "TPU available: False",  # hardware the machine does not have
        "HPU available: False",
        "Loading `train_dataloader` to estimate number of stepping batches.",
        "GPU available: False, used: False",  # a CPU machine: nothing to choose or to miss
    ),
    # every stage sets the seed of its config (stage.json keeps it)
    "lightning.fabric.utilities.seed": ("Seed set to",),
}


class _DropLines(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.starts)


def install() -> None:
    """Hide the known-harmless warnings and log lines (idempotent)."""
    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, starts in HARMLESS_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines(starts))
    # transformers' bars for reading and writing weights ("Loading weights", "Writing model
    # shards") print two lines per model a stage loads or exports; hcm.model.loading logs what
    # it loaded. huggingface_hub's download bars (minutes for a model's first run) stay on.
    downloads_shown = not huggingface_hub.utils.are_progress_bars_disabled()
    transformers.utils.logging.disable_progress_bar()  # (turns the hub's bars off too)
    if downloads_shown:
        huggingface_hub.utils.enable_progress_bars()


def banner(title: str, init_model: str, output_dir: str) -> None:
    """A stage's header: which stage, which model it starts from, where its outputs go."""
    print(f"\n━━ {title} " + "━" * max(4, 76 - len(title)), flush=True)
    print(f"   init model: {init_model}\n   outputs:    {output_dir}", flush=True)


# -- errors ----------------------------------------------------------------------------------------
def _raised_in_project(exc: BaseException) -> bool:
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


def user_error(exc: BaseException) -> BaseException | None:
    """The error meant for the user inside `exc` (also behind Hydra's instantiate wrapper), None
    when `exc` is a bug or a library's failure that needs its traceback."""
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, MisconfigurationException):  # Lightning's "bad Trainer argument"
        return exc
    own = (ValueError, FileNotFoundError, FileExistsError, CheckpointError, ApiError)
    return exc if isinstance(exc, own) and _raised_in_project(exc) else None


def full_error() -> bool:
    return os.environ.get(FULL_ERROR_ENV) == "1"  # as Hydra reads it


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Inside a Hydra task: the project's own config and input errors as `error: <message>`."""
    try:
        yield
    except Exception as exc:
        error = user_error(exc)
        if error is None or full_error() or _multirun():
            raise
        hint = f"({FULL_ERROR_ENV}=1 for the traceback)"
        print(f"error: {error} {hint}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
