"""A stage's outputs: resume checkpoint, exported model, and the `stage.json` marker.

A stage folder holds `checkpoints/last.ckpt` while it trains, then `model/` (a transformers
`save_pretrained` folder: the next stage's `model.name_or_path`) and `stage.json` (what it was
trained from: the init model, the data manifests' hashes, the config and its hash, the metrics).
`stage.json` is written last and atomically, so its presence means the stage finished.
A crash anywhere before it leaves the stage unfinished, and the rerun resumes from the checkpoint
(`last_checkpoint`) and exports again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hcm.checkpoints import (
    CheckpointError,
    check_checkpoint,
    checkpoint_problem,
    previous_path,
    remove_temporaries,
)
from hcm.config import ConfigError
from hcm.files import atomic_write_text

log = logging.getLogger(__name__)

MARKER = "stage.json"

# The keys that decide what a stage computes; logging, paths and workers don't.
IDENTITY_KEYS = (
    "model",
    "module",
    "prompt",
    "seed",
    "trainer.max_epochs",
    "data.root",
    "data.sft_sources",
    "data.composition",
    "data.switch_epoch",
    "data.batch_size",
)


def _resolved(cfg: DictConfig, key: str) -> Any:
    node = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def config_hash(cfg: DictConfig) -> str:
    identity = {k: _resolved(cfg, k) for k in IDENTITY_KEYS}
    blob = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def finished(output_dir: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """The marker of a finished stage with this config, None if unfinished; error if another."""
    marker = Path(output_dir) / MARKER
    if not marker.is_file():
        return None
    try:
        done = json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise RuntimeError(f"{marker} is corrupt ({e}); delete it to rerun the stage") from None
    if done.get("config_hash") != config_hash(cfg):
        raise ConfigError(
            f"{output_dir} holds a finished stage trained with another config "
            f"(hash {done.get('config_hash')} != {config_hash(cfg)}); choose another task_name "
            f"or remove that folder"
        )
    return done


def last_checkpoint(cfg: DictConfig, output_dir: Path) -> str | None:
    """The checkpoint to resume from: `ckpt_path=last` takes this stage's last.ckpt if whole.

    A last.ckpt that fails its integrity check gives way to last-prev.ckpt (the one it replaced),
    with a warning; when neither is whole this raises, rather than restart from scratch. Temporary
    files of writes that a crash interrupted are deleted.
    """
    ckpt = cfg.get("ckpt_path")
    if ckpt in (None, "none", "null"):
        return None
    if ckpt != "last":
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt} does not exist")
        check_checkpoint(ckpt)
        return str(ckpt)
    folder = Path(output_dir) / "checkpoints"
    for stale in remove_temporaries(folder):
        log.warning("removed %s, left by an interrupted checkpoint write", stale)
    newest = folder / "last.ckpt"
    candidates = [p for p in (newest, previous_path(newest)) if p.is_file()]
    problems = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            if problems:
                log.warning(
                    "%s; resuming from %s instead (one checkpoint interval earlier)",
                    "; ".join(problems),
                    path,
                )
            return str(path)
        problems.append(f"{path} is unusable: {problem}")
    if problems:
        raise CheckpointError(
            "; ".join(problems) + ". Delete that folder (or pass ckpt_path=null) to train this "
            "stage from its start"
        )
    return None


def export_model(model, tokenizer, image_processor, output_dir: Path) -> Path:
    """save_pretrained into <output_dir>/model via a temporary folder renamed at the end."""
    target = Path(output_dir) / "model"
    for stale in Path(output_dir).glob(".model.tmp-*"):  # left by an export a crash interrupted
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(output_dir) / f".model.tmp-{time.time_ns()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def write_marker(output_dir: Path, cfg: DictConfig, **info: Any) -> dict[str, Any]:
    done = {
        "config_hash": config_hash(cfg),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {k: _resolved(cfg, k) for k in cfg if k != "hydra"},
        **info,
    }
    atomic_write_text(Path(output_dir) / MARKER, json.dumps(done, indent=2, default=str))
    return done
