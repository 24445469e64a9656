"""A stage's outputs: resume checkpoint, exported model, and the `stage.json` marker.

A stage folder holds `checkpoints/last.ckpt` while it trains, then `model/` (a transformers
`save_pretrained` folder: the next stage's `model.name_or_path`) and `stage.json` (what it was
trained from: the init model, the content hashes of the files it read, the code's commit, the
config and its hash, the metrics). `stage.json` is written last and atomically, so its presence
means the stage finished. A crash anywhere before it leaves the stage unfinished, and the rerun
resumes from the checkpoint (`last_checkpoint`) and exports again.

A stage's identity is its resolved config (`identity`: `auto` settings as they resolve on this
machine, and the identity of every stage it starts from, `upstream`) plus the content of what it
read (`hcm.fingerprints`): a finished stage is reused only while both match.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from hcm import fingerprints
from hcm.checkpoints import (
    CheckpointError,
    check_checkpoint,
    checkpoint_problem,
    previous_path,
    remove_temporaries,
)
from hcm.config import REPO_DIR, ConfigError
from hcm.faults import fault_point
from hcm.files import atomic_write_text, folder_lock, lock_token, replace_folder
from hcm.model.loading import resolve_attn_implementation, resolve_dtype
from hcm.runtime import precision_for

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
    "module.mining.hash_cache",
    "on_code_change",
    "keep_checkpoints",
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
    _resolve_auto(tree)
    dropped = NOT_IDENTITY + (GRPO_ONLY if cfg.get("job_type") != "grpo" else ())
    for key in dropped:
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return tree


def _resolve_auto(tree: dict[str, Any]) -> None:
    """`auto` settings as they resolve on this machine: a CPU stage (fp32, sdpa) and a GPU stage
    (bf16-mixed, flash-attn) of the same config compute different numbers, and must not share a
    folder when a store is shared. The model config appears under `model` and, interpolated,
    under `module.model` and `data.model`: every copy resolves alike."""
    trainer = tree.get("trainer") or {}
    if "precision" in trainer:
        trainer["precision"] = precision_for(str(trainer["precision"]))
    for node in _dicts(tree):
        if "dtype" in node and "name_or_path" in node:  # a model config
            node["dtype"] = str(resolve_dtype(node["dtype"]))
            if "attn_implementation" in node:
                node["attn_implementation"] = resolve_attn_implementation(
                    node["attn_implementation"]
                )


def _dicts(tree: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield tree
    for v in tree.values():
        if isinstance(v, dict):
            yield from _dicts(v)


def config_hash(cfg: DictConfig) -> str:
    blob = json.dumps(identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# What a stage that continues another (a pipeline's continue_from) may change: what its epochs
# train on and how a step picks its groups from what it draws (offline against online difficulty
# selection after the same first epochs), where it starts, and that it goes past the switch.
CONTINUATION_MAY_CHANGE = (
    "data.composition",
    "module.difficulty_band",
    "data.oversample",
    "module.resample_zero_variance",
    "module.stop_at_switch",
    "init_ckpt",
    "upstream",
)


def continuation_changes(first: DictConfig, then: DictConfig) -> list[str]:
    """Keys besides `CONTINUATION_MAY_CHANGE` where a continuing stage differs from the stage it
    continues: its checkpoint holds an optimizer, a schedule and a data order made for `first`."""
    a, b = _flat(identity(first)), _flat(identity(then))
    changed = (k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    may = CONTINUATION_MAY_CHANGE
    return sorted(k for k in changed if not any(k == m or k.startswith(f"{m}.") for m in may))


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def finished(cfg: DictConfig, key: str) -> dict[str, Any] | None:
    """The marker of a finished stage with this config, None if unfinished; error if another."""
    output_dir = Path(cfg.paths.output_dir)
    marker = output_dir / MARKER
    if not marker.is_file():
        return None
    try:
        done = json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise RuntimeError(f"{marker} is corrupt ({e}); delete it to rerun the stage") from None
    if done.get("config_hash") != key:
        differ = _differences(done.get("config"), cfg)
        raise ConfigError(
            f"{output_dir} holds a finished stage trained with another config "
            f"(hash {done.get('config_hash')} != {key}{differ}); choose another task_name "
            f"or remove that folder"
        )
    return done


def _differences(recorded: dict[str, Any] | None, cfg: DictConfig) -> str:
    """', differing in <keys>' between a marker's config and `cfg` ('' when unknown)."""
    if not recorded:
        return ""
    try:
        was = _flat(identity(OmegaConf.create(recorded)))
    except Exception:  # a marker from older code may not compose as a config: the hash says it
        return ""
    now = _flat(identity(cfg))
    keys = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))
    return f", differing in {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}" if keys else ""


def previous_run(cfg: DictConfig) -> tuple[str, dict[str, Any] | None]:
    """(the hash of cfg, the metrics of this config's finished run in its folder, or None).

    A finished stage is reused only while the files it read hold what they held (`inputs` in
    its marker): one that changed is refused, naming the file. One that no longer exists (a
    deleted data folder, regenerated on demand) cannot be checked and is named in a warning.
    A stage made by another commit of the code is reused with a warning, or refused when
    `on_code_change=refuse`."""
    key = config_hash(cfg)
    folder = Path(cfg.paths.output_dir)
    done = finished(cfg, key)
    if done is None:
        return key, None
    differ, missing = fingerprints.changed(done.get("inputs", {}), hash_cache(cfg))
    if differ:
        raise ConfigError(
            f"{folder} was trained from files that have changed since: {', '.join(differ)}. "
            "Remove that folder (and the stages that start from it) to train it again"
        )
    if missing:
        log.warning("%s: cannot check its inputs %s (gone)", folder, ", ".join(missing))
    _check_code(done.get("code") or {}, folder, cfg.get("on_code_change", "warn"))
    log.info("%s already holds this stage's results; skipping it", folder)
    return key, done.get("metrics", {})


def _check_code(made_by: dict[str, Any], folder: Path, on_change: str) -> None:
    now = fingerprints.code_version(REPO_DIR)
    was, is_ = made_by.get("commit"), now["commit"]
    if not was or not is_ or was == is_:
        return
    message = f"{folder} was made by hcm commit {was[:12]}, this is {is_[:12]}"
    if on_change == "refuse":
        raise ConfigError(f"{message} (on_code_change=refuse): remove that folder to retrain it")
    log.warning("%s; reusing it (on_code_change=refuse stops instead)", message)


def hash_cache(cfg: DictConfig) -> Path:
    """Where input files' hashes are cached (by size and mtime): `paths.cache_dir`."""
    return Path(cfg.paths.cache_dir) / "file-hashes.json"


def stage_inputs(cfg: DictConfig, manifests: list[Path]) -> dict[str, str]:
    """The content hashes `previous_run` checks: the manifests read and the initial model."""
    built = cfg.model.get("tiny") is not None
    return fingerprints.inputs(manifests, str(cfg.model.name_or_path), built, hash_cache(cfg))


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
        raise FileNotFoundError(
            f"init_ckpt={ckpt} does not exist: has the stage it continues run? (A finished stage "
            "keeps its checkpoint only when a stage of its pipeline continues from it: remove "
            "that stage's folder to train it again, or set keep_checkpoints=true)"
        )
    check_checkpoint(ckpt)
    return str(ckpt)


def release_checkpoints(cfg: DictConfig, output_dir: Path) -> None:
    """After stage.json: remove checkpoints/ unless a later stage resumes from it (a prefix that
    stops at the switch, or `keep_checkpoints`, which a pipeline sets for a continued stage)."""
    module = cfg.get("module") or {}
    if cfg.get("keep_checkpoints") or module.get("stop_at_switch"):
        return
    folder = Path(output_dir) / "checkpoints"
    if folder.is_dir():
        shutil.rmtree(folder)
        log.info("removed %s: the stage is finished and exported (keep_checkpoints=false)", folder)


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
    from its checkpoint.

    Only the launching process (rank 0) locks. Under DDP the other ranks run the pipeline too,
    and reach a stage while rank 0 may still be waiting for another job to release it: they
    wait (`wait_for_rank_zero`) until rank 0 holds the lock, before they read the folder's
    marker or clear its checkpoint temporaries (the other job's writes in flight)."""
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
        with folder_lock(folder, "another job running this stage", launch_token(rank_zero=True)):
            yield
        return
    wait_for_rank_zero(folder, launch_token(rank_zero=False))
    yield


LAUNCH = "HCM_LAUNCH_ID"
# How long a rank > 0 waits while nobody holds its stage's lock: rank 0 takes it within moments
# of finishing the previous stage (an export), so this long means rank 0 is gone. As long as a
# collective waits for a missing rank (torch.distributed's default timeout).
RANK_ZERO_IDLE_S = 30 * 60


def launch_token(rank_zero: bool) -> str | None:
    """What every rank of one launch shares and no other launch has: torchrun's run id, restart
    and rendezvous address; else `<rank 0's pid>:<random>`, set by rank 0 in its environment
    before Lightning starts the other ranks from it (they inherit it). A token that a parent
    process passed down (pid not ours) is another launch's: rank 0 makes its own."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        keys = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT")
        return "torchrun:" + ":".join(os.environ.get(k, "") for k in keys)
    token = os.environ.get(LAUNCH)
    if rank_zero and (token is None or token.split(":")[0] != str(os.getpid())):
        token = os.environ[LAUNCH] = f"{os.getpid()}:{uuid.uuid4().hex}"
    return token


def wait_for_rank_zero(
    folder: Path, token: str | None, poll_s: float = 1.0, idle_s: float = RANK_ZERO_IDLE_S
) -> None:
    """Return once this launch's rank 0 holds `folder`'s lock (its `token` in the lock file), or
    the stage has finished (rank 0 then skips it as well). Raises when rank 0 has exited (its
    pid is in a Lightning launch's token), or when nobody has held the lock for `idle_s`;
    while another job holds it, rank 0 is waiting behind that job, and so does this rank."""
    rank = os.environ.get("LOCAL_RANK", "?")
    if token is None:
        raise RuntimeError(
            f"rank {rank} cannot tell when its rank 0 holds {folder}: launch with Lightning "
            f"(trainer.devices=N) or torchrun, or set {LAUNCH} to one value for all ranks"
        )
    idle_since = time.monotonic()
    while True:
        holder = lock_token(folder)
        if holder == token or (folder / MARKER).is_file():
            return
        if holder is not None:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > idle_s:
            raise RuntimeError(
                f"rank {rank}: nobody has held {folder}'s lock for {idle_s:.0f} s, and rank 0 "
                "of this launch never took it; stopping rather than waiting for ever"
            )
        pid = token.split(":")[0]
        if pid.isdigit() and not _alive(int(pid)):
            raise RuntimeError(
                f"rank {rank}: rank 0 of this launch (pid {pid}) exited before it held "
                f"{folder}'s lock; see its log for why"
            )
        time.sleep(poll_s)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:  # no such process, or another user's that has taken its pid
        return False
    return True


def export_model(model, tokenizer, image_processor, output_dir: Path) -> Path:
    """save_pretrained into <output_dir>/model via a temporary folder renamed at the end."""
    target = Path(output_dir) / "model"
    for stale in Path(output_dir).glob(".model.tmp-*"):  # left by an export a crash interrupted
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(output_dir) / f".model.tmp-{time.time_ns()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    fault_point("export")
    replace_folder(tmp, target)
    return target


def write_marker(output_dir: Path, cfg: DictConfig, key: str, **info: Any) -> dict[str, Any]:
    """stage.json: the config's hash `key`, the code that ran, and `info` (e.g. `inputs`)."""
    fault_point("marker")
    done = {
        "config_hash": key,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "code": fingerprints.code_version(REPO_DIR),
        "config": {
            k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in cfg.items()
            if k != "hydra"
        },
        **info,
    }
    atomic_write_text(Path(output_dir) / MARKER, json.dumps(done, indent=2, default=str))
    return done
