"""What a stage read and ran on, as content: file hashes, a hub model's revision, the code's commit.

A stage's folder is named by its config (`hcm.stages`), but a config names files by path: the
manifests under `data.root`, the weights under `model.name_or_path`. Files can change under the
same path (a manifest relabelled in place, a base model refreshed by `cp -r`), so `stage.json`
also records each input file's sha256 (`inputs`), and a finished stage is reused only while they
still match. Hashing a 2B model's 4 GB of weights takes seconds, so hashes are cached by
(path, size, mtime): a file rewritten in place gets a new mtime and is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from hcm.files import atomic_write_text

HUB = "hub:"  # an input key naming a hub model (its value: the cached snapshot's revision)
MISSING = "missing"


def sha256_file(path: Path, cache: Path | None = None) -> str:
    """The file's sha256, read from `cache` (a JSON file) while its size and mtime are the same."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    known = _read(cache)
    entry = known.get(str(path))
    if entry and entry[0] == stamp:
        return entry[1]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if cache is not None:
        known = _read(cache)  # again: another job may have added entries meanwhile
        known[str(path)] = [stamp, digest.hexdigest()]
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps(known, sort_keys=True))
    return digest.hexdigest()


def _read(cache: Path | None) -> dict[str, list[str]]:
    if cache is None or not cache.is_file():
        return {}
    try:
        return json.loads(cache.read_text())
    except ValueError:  # a damaged cache only costs re-hashing
        return {}


def hub_revision(repo_id: str) -> str:
    """The commit of the locally cached snapshot of a hub model ('unresolved' when not cached)."""
    from huggingface_hub import try_to_load_from_cache  # (transformers' own dependency)

    found = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(found, str):  # .../snapshots/<commit>/config.json
        return Path(found).parent.name
    return "unresolved"


def model_files(name_or_path: str) -> list[Path]:
    """The files of a local model folder (weights, config, tokenizer, processor): all of them
    decide what the stage computes. A hub id has none: its revision stands for them."""
    folder = Path(name_or_path)
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def inputs(
    manifests: Iterable[Path], name_or_path: str, built: bool, cache: Path | None
) -> dict[str, str]:
    """{path or 'hub:<id>': content hash} of what a stage reads: its manifests and its initial
    model. `built` (a tiny model made from the config's own sizes and seed) is identified by the
    config already, so its files are left out."""
    found = {str(Path(p).resolve()): sha256_file(p, cache) for p in manifests}
    if built:
        return found
    files = model_files(name_or_path)
    if not files:
        return found | {HUB + name_or_path: hub_revision(name_or_path)}
    return found | {str(p.resolve()): sha256_file(p, cache) for p in files}


def changed(recorded: Mapping[str, str], cache: Path | None) -> tuple[list[str], list[str]]:
    """(inputs whose content differs from `recorded`, recorded files that no longer exist)."""
    differ, missing = [], []
    for key, digest in recorded.items():
        if key.startswith(HUB):
            now = hub_revision(key[len(HUB) :])
            if now != digest and "unresolved" not in (now, digest):
                differ.append(f"{key} (revision {digest} -> {now})")
        elif not Path(key).is_file():
            missing.append(key)
        elif sha256_file(Path(key), cache) != digest:
            differ.append(key)
    return differ, missing


def code_version(repo_dir: Path) -> dict[str, Any]:
    """The git commit of the code (None outside a git checkout) and whether files differ from it."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(repo_dir), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    # None: run from a checkout that was never installed
    return {"version": package_version("hcm"), "commit": commit, "dirty": dirty}


def package_version(package: str) -> str | None:
    """An installed distribution's version (e.g. "flash-attn"), None when it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
