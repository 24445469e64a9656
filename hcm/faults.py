"""Fault injection, shipped in the package: `HCM_FAULT=<point>:<n>` SIGKILLs the process at a
named point, so that a crash can be staged on a real run (tests/test_resume.py does, through
the real entry points in a subprocess, where no test hook could reach).

The process kills itself the n-th time (1-based, counted in this process) it reaches `point`,
the way an OOM killer or a pre-empted node would: no exception, no `finally`, no flushing.
Unset (every ordinary run) it costs one environment lookup. The points:

    sft_step    inside an SFT training step, after the forward pass
    grpo_step   inside a GRPO step, after the rollout and before the update (its first line)
    answer      a batch answered by generation (mining's batches come first in a GRPO stage)
    ckpt_write  a checkpoint written to its temporary file but not yet renamed into place
    switch      a shared first stage (stop_at_switch) after its switch-epoch checkpoint
    export      a stage's model written to its temporary folder, not yet renamed into place
    marker      a stage exported, its stage.json not yet written

tests/test_resume.py kills runs at each point and checks that rerunning the command resumes.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "HCM_FAULT"
_reached: Counter[str] = Counter()


def fault_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
