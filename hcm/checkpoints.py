"""Crash-safe checkpoints: atomic writes, the previous one kept, corruption detected, RNG saved.

`AtomicCheckpointIO` (conf/trainer/default.yaml's `plugins`) writes each checkpoint to a
temporary file beside its target, fsyncs it and renames it into place, so a reader sees the old
file or the new one, never half of one. Lightning's own writer serialises the whole checkpoint
into memory and moves it from the system temp folder, which is a copy (not atomic) when that
folder is on another disk. Before replacing a file, the old one stays as `<name>-prev.ckpt`:
a resume falls back to it when the newest fails its check.

`checkpoint_problem` checks a file the way it was written: torch.save writes a zip archive with
a CRC-32 per record, so reading it through is a full integrity check (a truncated file has no
central directory; a flipped byte fails its record's CRC), unlike `torch.load`, which reads
through a flipped byte in tensor data.

`capture_rng` / `restore_rng`: Lightning saves no RNG state, and GRPO's sampling draws from the
global torch RNG, so the modules store it in every checkpoint (weights_only-loadable values).
`rank_seed`: every rank starts from the run's one seed (the model and the data order must agree),
then draws its own torch stream, so the ranks' completions are not sampled with the same noise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from hcm.faults import fault_point

log = logging.getLogger(__name__)

PREVIOUS_SUFFIX = "-prev"
TEMP_MARK = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from, where one was written: never a silent restart."""


def previous_path(path: str | Path) -> Path:
    """last.ckpt -> last-prev.ckpt: where the checkpoint it replaced is kept."""
    path = Path(path)
    return path.with_name(f"{path.stem}{PREVIOUS_SUFFIX}{path.suffix}")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to `.<name>.tmp-<pid>` beside the target, fsync, keep the old file, rename."""

    def __init__(self, keep_previous: bool = True):
        super().__init__()
        self.keep_previous = keep_previous

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        if "://" in str(path):  # remote storage (fsspec): Lightning's own transactional write
            return super().save_checkpoint(checkpoint, path)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
        try:
            with tmp.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            fault_point("ckpt_write")
            if self.keep_previous and path.is_file():
                # a hard link: the old checkpoint stays whole under its new name, at no copy cost
                prev, prev_tmp = previous_path(path), tmp.with_name(tmp.name + "-prev")
                try:
                    os.link(path, prev_tmp)
                    os.replace(prev_tmp, prev)
                except OSError as e:  # no hard links on this filesystem
                    prev_tmp.unlink(missing_ok=True)
                    log.warning("cannot keep %s as %s (%s)", path.name, prev.name, e)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def remove_checkpoint(self, path: str | Path) -> None:
        super().remove_checkpoint(path)
        previous_path(path).unlink(missing_ok=True)


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files of writes a crash interrupted; returns them."""
    folder = Path(folder)
    stale = sorted(folder.glob(f".*{TEMP_MARK}*")) if folder.is_dir() else []
    for f in stale:
        f.unlink(missing_ok=True)
    return stale


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` is not a whole checkpoint as torch.save wrote it, or None when it is."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every record and checks its CRC-32
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"not a readable torch checkpoint, truncated or corrupt ({type(e).__name__}: {e})"
    if bad is not None:
        return f"record {bad} fails its CRC check: the file is corrupt"
    if not any(n.endswith("/data.pkl") for n in names):
        return "holds no data.pkl: not a torch checkpoint"
    return None


def check_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError, naming `ckpt_path`, when `path` is not a whole checkpoint: said
    before anything loads, rather than torch's "failed finding central directory"."""
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(f"ckpt_path={path}: {problem}")


# -- RNG state ------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and Python RNG states, weights_only-loadable."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rank_seed(seed: int, rank: int) -> int:
    """A seed of its own for each rank of a run seeded with `seed` (rank 0 included), drawn
    from both so that no rank's stream is another run's: `seed + rank` would give rank 1 of
    seed 0 the stream of rank 0 of seed 1."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
