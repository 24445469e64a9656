"""Writing files and folders so that a reader never sees half of one (a crash, a concurrent
reader), and the lock that makes concurrent writers of a folder take turns."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that a reader sees either the old content or the whole new one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """`atomic_write_text` for bytes (an image)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_folder(tmp: Path, target: Path) -> None:
    """Put the finished folder `tmp` at `target`, replacing what is there. The old folder is
    moved aside before it is deleted, so `target` is, at every moment, either absent, the old
    folder or the new one: never half of either."""
    old = target.parent / f".{target.name}.old-{time.time_ns()}"
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def folder_lock(folder: Path, holder: str = "another job", token: str = "") -> Iterator[None]:
    """Hold `<folder>.lock` (an exclusive flock): a concurrent job that would write `folder`
    waits here, then finds it written. The OS drops the lock when its holder dies, so a crashed
    owner's folder is taken over at once by the next job. While held, the file holds `token`
    (who holds it: `lock_token` reads it), emptied again before the lock is let go."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    # "a+", not "w": a job that opens the file to wait must not erase the holder's token
    with open(lock_path(folder), "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s: %s holds it", folder, holder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            _write_token(handle, token)
            yield
        finally:
            _write_token(handle, "")
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_path(folder: Path) -> Path:
    return folder.parent / f"{folder.name}.lock"


def _write_token(handle, token: str) -> None:
    handle.truncate(0)
    handle.write(token)  # ("a+" appends: at 0 after the truncate)
    handle.flush()


def lock_token(folder: Path) -> str | None:
    """The token of the job holding `folder`'s lock; None while nobody holds it (a token left
    by a holder that died is not its job's: the OS has dropped the lock)."""
    path = lock_path(folder)
    if not path.is_file():
        return None
    with open(path) as handle:
        try:  # a shared lock is refused only while an exclusive one is held
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read()
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None
