"""run_acceptance: each check of a size in turn, gated on what it needs, timed, its exception a
failure; the report rewritten after every check, so a run that dies leaves what it had."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from hcm.acceptance.checks import CHECKS, traceback_text
from hcm.acceptance.report import FAIL, Section, overall_status, to_json, write_report
from hcm.bench.run import PACKAGES
from hcm.bench.run import environment as bench_environment
from hcm.config import REPO_DIR, register_resolvers
from hcm.fingerprints import code_version

log = logging.getLogger(__name__)
CONFIG = REPO_DIR / "conf" / "acceptance.yaml"
SIZES = ("gpu", "tiny")


def load_spec(path: Path = CONFIG) -> dict[str, Any]:
    """conf/acceptance.yaml as plain data (override strings stay as written, `${...}` unresolved:
    the configs they go into resolve them)."""
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def default_size() -> str:
    return "gpu" if torch.cuda.is_available() else "tiny"


def default_folder() -> Path:
    root = Path(os.environ.get("HCM_ROOT", "."))
    return root / "outputs" / "acceptance" / time.strftime("%Y-%m-%d_%H-%M-%S")


def missing(needs: Sequence[str]) -> str | None:
    """Why a check cannot run here (the first of its needs this machine lacks), or None."""
    for need in needs:
        if need == "cuda" and not torch.cuda.is_available():
            return "no CUDA"
        if need != "cuda" and importlib.util.find_spec(need) is None:
            return f"no {need} (not installed)"
    return None


def environment() -> dict[str, Any]:
    code = code_version(REPO_DIR)
    return {
        **bench_environment((*PACKAGES, "peft", "torchvision")),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "commit": (code["commit"] or "-")[:12] + (" (modified)" if code["dirty"] else ""),
    }


def run_check(check: Callable, settings: dict, spec: dict, folder: Path, section: Section) -> None:
    """Run one check into its section: skipped when it lacks what it needs, failed when it
    raises, else the verdict of its criteria."""
    reason = missing(settings.get("needs", []))
    if reason:
        section.skip(reason)
        return
    start = time.perf_counter()
    try:
        check(settings, spec, folder, section)
    except Exception as error:  # a check that raises fails; the next one still runs
        log.exception("acceptance check %r raised", section.title)
        section.status, section.reason = FAIL, f"{type(error).__name__}: {error}"
        section.figures["traceback"] = traceback_text()
    finally:
        section.seconds = time.perf_counter() - start
        GlobalHydra.instance().clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    section.close()


def run_acceptance(
    size: str,
    folder: Path,
    only: Sequence[str] | None = None,
    spec: dict | None = None,
    command: str = "python -m hcm.acceptance",
) -> dict[str, Any]:
    """Every check of `size` (or those in `only`) into `folder`; returns the report's data.
    `spec`: conf/acceptance.yaml's content (read when None); `command`: the report's."""
    register_resolvers()
    spec = spec if spec is not None else load_spec()
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    unknown = set(only or ()) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; the checks are {list(CHECKS)}")
    report: dict[str, Any] = {
        "status": "running",
        "size": size,
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": 0.0,
        "folder": str(folder),
        "environment": environment(),
    }
    sections = {name: Section(title) for name, (title, _) in CHECKS.items()}
    start = time.perf_counter()
    for name, (_, check) in CHECKS.items():
        if only and name not in only:
            sections[name].skip("not selected (--only)")
            continue
        log.info("acceptance: %s (size %s)", name, size)
        run_check(check, spec["sizes"][size][name], spec, folder / name, sections[name])
        report["seconds"] = time.perf_counter() - start
        write_report(folder, to_json(report, sections))
    report["status"] = overall_status(sections)
    report["seconds"] = time.perf_counter() - start
    data = to_json(report, sections)
    write_report(folder, data)
    return data
