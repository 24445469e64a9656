"""Every `python train.py` / `python eval.py` command README.md shows composes as written: the
job's config (each job of a multirun: every value of every swept parameter) and, for a pipeline,
every stage's config, with the command line's overrides routed to the stages that have them."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from hcm.config import validate
from hcm.train import compose_stages

README = Path(__file__).resolve().parents[1] / "README.md"
COMMAND = re.compile(r"python (train|eval)\.py([^`#\n]*)")


def readme_commands() -> list[tuple[str, list[str]]]:
    found = []
    for script, rest in COMMAND.findall(README.read_text()):
        words = [w for w in shlex.split(rest) if w != "..."]
        if "--help" not in words:
            found.append((script, words))
    return sorted({(s, tuple(w)) for s, w in found})


def jobs(compose_cfg, script: str, words: list[str]) -> list[list[str]]:
    """The overrides of each job: one job, or (-m) one per value of each swept parameter."""
    overrides = [w for w in words if w not in ("-m", "--multirun")]
    if len(overrides) == len(words):
        return [overrides]
    parser = OverridesParser.create()
    # values swept on the command line (seed=0,1) and in the sweep file both make jobs
    parsed = parser.parse_overrides(overrides)
    fixed = [w for w, o in zip(overrides, parsed, strict=True) if not o.is_sweep_override()]
    cli = {
        o.get_key_element(): list(o.sweep_string_iterator())
        for o in parsed
        if o.is_sweep_override()
    }
    params = compose_cfg(script, fixed).hydra.sweeper.params or {}
    swept = {}
    for key, value in params.items():
        o = parser.parse_override(f"{key}={value}")
        swept[key] = list(o.sweep_string_iterator()) if o.is_sweep_override() else [str(value)]
    swept.update(cli)  # the command line wins over the sweep file, as in Hydra
    if "seed" in swept:  # one number that selects no config: its first value stands for all
        swept["seed"] = swept["seed"][:1]
    first = [f"{k}={v[0]}" for k, v in swept.items()]
    out = [[*fixed, *first]]
    for i, (key, values) in enumerate(swept.items()):
        for v in values[1:]:
            out.append([*fixed, *first[:i], f"{key}={v}", *first[i + 1 :]])
    return out


@pytest.mark.parametrize(("script", "words"), readme_commands(), ids=lambda x: " ".join(x))
def test_readme_command_composes(compose_cfg, script, words):
    for overrides in jobs(compose_cfg, script, list(words)):
        cfg = compose_cfg(script, overrides)
        if cfg.get("pipeline"):
            stages = compose_stages(cfg)
            assert stages, overrides
            for _, _, stage in stages:
                validate(stage)
        else:
            validate(cfg)


def test_readme_shows_the_commands_this_test_composes():
    commands = readme_commands()
    assert len(commands) >= 15
    # README's example of a GRPO knob on a whole sweep (composed above: it reaches the GRPO stages)
    assert any("++module.mining.correct=exact" in w for _, w in commands)
