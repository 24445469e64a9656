"""The acceptance run's four checks. Each fills its `Section` with criteria and figures from
its settings (conf/acceptance.yaml, `sizes.<size>.<check>`), writing what it runs under `folder`.

Every check runs in this process (a size's configs composed as train.py and hcm.bench would),
except the parity test, which pytest runs as it runs in CI.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from hcm.acceptance.memory import memory_verdict, parameters_verdict
from hcm.acceptance.report import Section
from hcm.config import REPO_DIR

log = logging.getLogger(__name__)
PHASES = ("rollout", "reference", "update", "optimizer")  # what every GRPO step must have timed


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """conf/<name>.yaml with `overrides`, as its entry point would get it: HydraConfig is set
    (a pipeline reads the command line from it) and Hydra stays initialised (a pipeline composes
    its stages through it)."""
    GlobalHydra.instance().clear()
    initialize_config_dir(str(REPO_DIR / "conf"), version_base="1.3")
    cfg = compose(name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def with_folder(overrides: list[str], folder: Path) -> list[str]:
    """The overrides with `{out}` replaced by the check's folder."""
    return [o.replace("{out}", str(folder)) for o in overrides]


def traceback_text() -> str:
    """The exception being handled, its last frames, as a Markdown code block."""
    return "```\n" + traceback.format_exc(limit=-8) + "```"


def finite(values: dict[str, Any]) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values.values())


# -- 1. hcm.bench: ours against TRL, full fine-tuning and LoRA ------------------------------------
def bench(settings: dict, spec: dict, folder: Path, section: Section) -> None:
    from hcm.bench.report import phase_rows
    from hcm.bench.run import run_bench

    for run, job in settings["runs"].items():
        overrides = [*settings["overrides"], *job["overrides"], f"paths.output_dir={folder / run}"]
        try:  # a run that fails (TRL out of memory, say) leaves the next one to run
            results = run_bench(compose_config("bench", overrides))
        except Exception as error:
            log.exception("bench run %r raised", run)
            section.require(f"{run}: the bench ran", False, f"{type(error).__name__}: {error}")
            section.figures[f"{run}: traceback"] = traceback_text()
            continue
        section.figures[f"{run}: table"] = results["table"]
        sides = results["sides"]
        section.figures[f"{run}: per side"] = {
            side: {
                "trained": results["fine_tuning"][side],
                "step s": s["step_time"],
                "step tokens/s": phase_rows(s)["whole step"]["tokens_per_s"],
                "update MFU": s["update_mfu"],
                "peak GB": max(s["peak_bytes"].values(), default=0) / 1e9,
                "allocated before GB": s["allocated_before_bytes"] / 1e9,
                "parameters": s["parameters"].get("total"),
                "trained parameters": s["parameters"].get("trained"),
            }
            for side, s in sides.items()
        }
        for side, s in sides.items():
            times = {p: s["time"].get(p, 0.0) for p in PHASES}
            section.require(
                f"{run}: {side} timed every phase of {s['steps']} step(s)",
                all(t > 0 for t in times.values()),
                ", ".join(f"{p} {t:.3f} s" for p, t in times.items()),
            )
        compare_memory(section, run, sides.get("ours"), job.get("memory"), spec)


def compare_memory(
    section: Section, run: str, ours: dict | None, row_name: str | None, spec: dict
) -> None:
    """Our side's trained parameters and peak memory against its row of README's table."""
    if ours is None or row_name is None:
        section.require(f"{run}: ours against README's memory table", None, "no row at this size")
        return
    row = spec["memory_table"][row_name]
    ok, detail = parameters_verdict(ours["parameters"]["trained"], row)
    section.require(f"{run}: ours trains what '{row_name}' counts", ok, detail)
    peak = max(ours["peak_bytes"].values(), default=0) - ours["allocated_before_bytes"]
    if not torch.cuda.is_available():
        section.require(f"{run}: ours' peak memory against '{row_name}'", None, "no CUDA")
        return
    ok, detail = memory_verdict(peak, row, spec["memory_ceiling"])
    section.require(f"{run}: ours' peak memory against '{row_name}'", ok, detail)


# -- 2. InternVLProcessor parity (tests/test_inputs.py) -------------------------------------------
def junit_outcomes(path: Path) -> dict[str, tuple[str, str]]:
    """{test name: (passed | failed | skipped, message)} from pytest's JUnit XML file."""
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        status, message = "passed", ""
        for tag, name in (("failure", "failed"), ("error", "failed"), ("skipped", "skipped")):
            node = case.find(tag)
            if node is not None:
                status, message = name, node.get("message", "")
                break
        outcomes[case.get("name", "")] = (status, message)
    return outcomes


def parity(settings: dict, spec: dict, folder: Path, section: Section) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    junit = folder / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += [f"--junitxml={junit}", settings["test"]]
    done = subprocess.run(
        command, cwd=REPO_DIR, capture_output=True, text=True, timeout=settings["timeout_s"]
    )
    (folder / "pytest.log").write_text(done.stdout + done.stderr)
    outcomes = junit_outcomes(junit) if junit.is_file() else {}
    shown = " ".join(["python", *command[1:]])
    section.figures["pytest"] = {"command": shown, "exit status": done.returncode}
    name = settings["test"].rpartition("::")[2]
    status, message = outcomes.get(name, ("failed", f"not run (pytest exit {done.returncode})"))
    ok = None if status == "skipped" else status == "passed"
    section.require(f"{name} {status}", ok, message.removeprefix("Skipped: "))


# -- 3. bf16-mixed with flash-attn on one GRPO step -----------------------------------------------
def flash_grpo(settings: dict, spec: dict, folder: Path, section: Section) -> None:
    from hcm.acceptance.attention import attention_parity
    from hcm.train import train

    cfg = compose_config(
        "train", with_folder([*settings["overrides"], f"paths.output_dir={folder / 'run'}"], folder)
    )
    section.figures["step settings"] = {
        "precision": cfg.trainer.precision,
        "attention": cfg.model.attn_implementation,
        "accelerator": cfg.trainer.accelerator,
    }
    metrics = train(cfg)
    step = {k: metrics.get(k) for k in settings["metrics"]}
    section.figures["step"] = step
    section.require("one GRPO step: loss, KL and gradient norm finite", finite(step), str(step))
    skipped = metrics.get("train/skipped_steps")
    section.require("no optimizer step skipped", skipped == 0, f"train/skipped_steps {skipped}")
    marker = json.loads((folder / "run" / "stage.json").read_text())
    pair = tuple(settings["compare"])
    autocast = getattr(torch, settings["autocast"]) if settings["autocast"] else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    found = attention_parity(marker["model_dir"], pair, device, autocast)
    section.figures["log-probs, padded batch"] = found
    section.require(
        f"models load with {pair[0]} and {pair[1]}",
        found["loaded"] == {name: name for name in pair},
        str(found["loaded"]),
    )
    tolerance = settings["tolerance"]
    section.require(
        f"{pair[0]} and {pair[1]} log-probs agree (mean |diff| per row <= {tolerance})",
        max(found["row_mean_abs"]) <= tolerance,
        f"per row {found['row_mean_abs']}, max {found['max_abs']:.4f}",
    )


# -- 4. a few steps of one science_gpu arm --------------------------------------------------------
def science_arm(settings: dict, spec: dict, folder: Path, section: Section) -> None:
    from hcm.train import train

    overrides = [*settings["overrides"]]
    for stage, extra in settings.get("stage_overrides", {}).items():
        overrides.append(f"pipeline.{stage}.overrides=[" + ",".join(f"'{o}'" for o in extra) + "]")
    run = folder / "run"
    overrides += [f"paths.output_dir={run}", f"paths.stage_store={folder / 'stage_store'}"]
    cfg = compose_config("train", with_folder(overrides, folder))
    train(cfg)
    names = [name for name, stage in cfg.pipeline.items() if stage is not None]
    markers = {}
    for name in names:
        path = run / "stages" / name / "stage.json"
        if path.is_file():
            markers[name] = json.loads(path.read_text())
    missing = [n for n in names if n not in markers]
    section.require(
        "every stage finished (stage.json)",
        not missing,
        f"{len(markers)}/{len(names)}" + (f"; missing {missing}" if missing else ""),
    )
    scores, training = {}, {}
    for name, marker in markers.items():
        m = marker["metrics"]
        if marker["kind"] == "eval":
            scores[name] = {k: m.get(f"test/score/{k}") for k in ("overall", "count")}
        else:
            training[name] = {k: m.get(k) for k in settings["metrics"] if k in m}
            if marker.get("hard_cases"):
                training[name]["hard cases"] = marker["hard_cases"].get("count")
    section.figures["evaluations"] = scores
    section.figures["training stages"] = training
    for name, score in scores.items():
        overall, count = score["overall"], score["count"]
        ok = count == settings["eval_count"] and overall is not None and 0 <= overall <= 100
        section.require(
            f"{name} scored {settings['eval_count']} test samples",
            ok,
            f"overall {overall}, count {count}",
        )
    for name, values in training.items():
        losses = {k: v for k, v in values.items() if k != "hard cases"}
        ok = bool(losses) and finite(losses)
        section.require(f"{name}: finite training metrics", ok, str(losses))


CHECKS = {  # name: (title, function), in the order of the run and the report
    "bench": ("hcm.bench, ours against TRL, full fine-tuning and LoRA", bench),
    "parity": ("our input builder against transformers' InternVLProcessor", parity),
    "flash_grpo": ("one GRPO step under bf16-mixed with flash-attn", flash_grpo),
    "science_arm": ("a few steps of the science_gpu HCM arm (experiment=gpu_hcm)", science_arm),
}
