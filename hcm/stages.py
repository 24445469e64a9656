"""A stage's outputs: resume checkpoint, exported model, and the `stage.json` marker.

A stage folder holds `checkpoints/last.ckpt` while it trains, then `model/` (a transformers
`save_pretrained` folder: the next stage's `model.name_or_path`) and `stage.json` (what it was
trained from: the init model, the data manifests' hashes, the config and its hash, the metrics).
`stage.json` is written last and atomically, so its presence means the stage finished.
A crash anywhere before it leaves the stage unfinished, and the rerun resumes from the checkpoint
(`last_checkpoint`) and exports again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from hcm.checkpoints import (
    CheckpointError,
    check_checkpoint,
    checkpoint_problem,
    previous_path,
    remove_temporaries,
)
from hcm.config import ConfigError
from hcm.files import atomic_write_text, folder_lock, replace_folder

log = logging.getLogger(__name__)

MARKER = "stage.json"

# What a stage computes is its whole resolved config, less the keys below: where it writes, how it
# logs and shows progress, and how often it checkpoints. Leaving a key here that matters would let
# two different stages share a folder; so the list holds only keys that cannot change a number.
NOT_IDENTITY = (
    "paths",
    "hydra",
    "task_name",
    "tags",
    "wandb_group",
    "report",
    "pipeline",
    "logger",
    "callbacks",
    "ckpt_path",
    "checkpoint_every_n_steps",
    "data.num_workers",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.default_root_dir",
    "module.log_completions_every_n_steps",
    "module.log_completions_prompts",
    "module.mining.cache_path",
)
# GRPO's data schedule: no SFT or evaluation stage reads it, so a Table 7 sweep's
# `data.composition=...` (applied to every stage) leaves their identity alone.
GRPO_ONLY = ("data.composition", "data.switch_epoch")


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config that decides a stage's results (`NOT_IDENTITY`, `GRPO_ONLY`)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)  # (set under @hydra.main; its interpolations need a live run)
        cfg.paths.output_dir = "<stage folder>"  # keys derived from it are not identity
    tree = OmegaConf.to_container(cfg, resolve=True)
    dropped = NOT_IDENTITY + (GRPO_ONLY if cfg.get("job_type") != "grpo" else ())
    for key in dropped:
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return tree


def config_hash(cfg: DictConfig) -> str:
    blob = json.dumps(identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# What a stage that continues another (a pipeline's continue_from) may change: what its epochs
# train on, where it starts, and that it goes past the switch.
CONTINUATION_MAY_CHANGE = ("data.composition", "module.stop_at_switch", "init_ckpt")


def continuation_changes(first: DictConfig, then: DictConfig) -> list[str]:
    """Keys besides `CONTINUATION_MAY_CHANGE` where a continuing stage differs from the stage it
    continues: its checkpoint holds an optimizer, a schedule and a data order made for `first`."""
    a, b = _flat(identity(first)), _flat(identity(then))
    changed = (k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return sorted(k for k in changed if k not in CONTINUATION_MAY_CHANGE)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def finished(output_dir: Path, key: str) -> dict[str, Any] | None:
    """The marker of a finished stage with this config, None if unfinished; error if another."""
    marker = Path(output_dir) / MARKER
    if not marker.is_file():
        return None
    try:
        done = json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise RuntimeError(f"{marker} is corrupt ({e}); delete it to rerun the stage") from None
    if done.get("config_hash") != key:
        raise ConfigError(
            f"{output_dir} holds a finished stage trained with another config "
            f"(hash {done.get('config_hash')} != {key}); choose another task_name "
            f"or remove that folder"
        )
    return done


def previous_run(cfg: DictConfig) -> tuple[str, dict[str, Any] | None]:
    """(the hash of cfg as it is now, the metrics of this config's finished run in its folder,
    or None); take it before running resolves values in cfg (`write_marker`)."""
    key = config_hash(cfg)
    done = finished(Path(cfg.paths.output_dir), key)
    if done is None:
        return key, None
    log.info("%s already holds this stage's results; skipping it", cfg.paths.output_dir)
    return key, done.get("metrics", {})


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


def start_checkpoint(cfg: DictConfig) -> str | None:
    """`init_ckpt`: where a stage starts when it has no checkpoint of its own (a pipeline's
    `continue_from`: the end of the stage it continues, e.g. Table 7's shared first epochs)."""
    ckpt = cfg.get("init_ckpt")
    if not ckpt:
        return None
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"init_ckpt={ckpt} does not exist: has the stage it continues run?")
    check_checkpoint(ckpt)
    return str(ckpt)


def hard_set_digest(indices: list[int] | None) -> dict[str, Any] | None:
    """How many hard cases a GRPO stage trained with, and a hash of which (for stage.json)."""
    if indices is None:
        return None
    blob = json.dumps(sorted(indices)).encode()
    return {"count": len(indices), "sha256": hashlib.sha256(blob).hexdigest()[:16]}


def link(path: Path, folder: Path) -> None:
    """Make `path` (a job's stages/<name>) a symlink to the stage's shared folder."""
    folder.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() and path.resolve() == folder.resolve():
        return
    if path.is_symlink():
        path.unlink()  # a link to an older config's folder: the stage now computes another thing
    elif path.exists():
        raise ConfigError(
            f"{path} is a folder, not a link to the stage store: move it away, or set "
            "paths.stage_store=null to train each job's stages in its own folder"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(folder.resolve(), target_is_directory=True)


@contextlib.contextmanager
def claim(folder: Path) -> Iterator[None]:
    """Hold `<folder>.lock` while this process runs the stage: a job of a concurrent sweep that
    needs the same stage waits here, then finds it finished. The OS drops the lock when its
    holder dies, so a crashed owner's stage is taken over by the next job, which resumes it
    from its checkpoint. Only the launching process locks: under DDP the other ranks follow it."""
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        yield
        return
    with folder_lock(folder, "another job running this stage"):
        yield


def export_model(model, tokenizer, image_processor, output_dir: Path) -> Path:
    """save_pretrained into <output_dir>/model via a temporary folder renamed at the end."""
    target = Path(output_dir) / "model"
    for stale in Path(output_dir).glob(".model.tmp-*"):  # left by an export a crash interrupted
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(output_dir) / f".model.tmp-{time.time_ns()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    replace_folder(tmp, target)
    return target


def write_marker(output_dir: Path, cfg: DictConfig, key: str, **info: Any) -> dict[str, Any]:
    """stage.json: `key` is the config's hash taken before the stage ran (running resolves some
    values, e.g. trainer.precision=auto), so that a rerun's `finished` check matches it."""
    done = {
        "config_hash": key,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {
            k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in cfg.items()
            if k != "hydra"
        },
        **info,
    }
    atomic_write_text(Path(output_dir) / MARKER, json.dumps(done, indent=2, default=str))
    return done
