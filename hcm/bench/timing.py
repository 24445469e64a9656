"""Per-phase wall time and peak accelerator memory of a training step, by wrapping its methods.

A `PhaseClock` is entered and left around the calls that make up a phase (a wrapped method, or a
pair of hooks). Phases nest (the reference forward runs inside the rollout): each phase is
charged its *exclusive* time, its own minus that of the phases inside it, so the phases of a
step add up to the step. Timing synchronises CUDA at every boundary, so a phase is charged the
kernels it launched, not the ones still queued from the phase before. Peak memory is
`torch.cuda.max_memory_allocated` over the phase, inner phases included (reset at each entry).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_allocated() -> int:
    """Bytes: CUDA's peak allocation since the last reset (0 without CUDA)."""
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


@dataclass
class _Open:
    name: str
    start: float
    inner: float = 0.0  # time spent in phases nested inside
    peak: int = 0  # bytes, inner phases included


@dataclass
class PhaseClock:
    """Exclusive time (s) and peak memory (bytes) per phase, one record per step."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    parameters: dict[str, int] = field(default_factory=dict)  # the policy's: total, trained
    _open: list[_Open] = field(default_factory=list)
    _step: dict[str, Any] | None = None

    def begin_step(self) -> None:
        self._step = {"time": defaultdict(float), "peak": defaultdict(int), "counts": {}}
        self.enter("step")

    def end_step(self) -> None:
        self.exit("step")
        assert self._step is not None
        self.steps.append({k: dict(v) if isinstance(v, dict) else v for k, v in self._step.items()})
        self._step = None

    def count_parameters(self, model) -> None:
        """Record the policy's parameters, all and trained (what the memory table counts)."""
        params = list(model.parameters())
        self.parameters = {
            "total": sum(p.numel() for p in params),
            "trained": sum(p.numel() for p in params if p.requires_grad),
        }

    def count(self, **values: float) -> None:
        """Record per-step quantities (tokens generated, sequence lengths) for the report."""
        if self._step is not None:
            self._step["counts"].update(values)

    def enter(self, name: str) -> None:
        if self._step is None:  # outside a measured step (set-up, validation): not charged
            self._open.append(_Open(name, float("nan")))
            return
        synchronize()
        if self._open:
            self._open[-1].peak = max(self._open[-1].peak, peak_allocated())
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._open.append(_Open(name, time.perf_counter()))

    def exit(self, name: str) -> None:
        phase = self._open.pop()
        if phase.name != name:
            raise RuntimeError(f"phase {name!r} left while {phase.name!r} is open")
        if self._step is None or phase.start != phase.start:  # NaN: entered outside a step
            return
        synchronize()
        elapsed = time.perf_counter() - phase.start
        peak = max(phase.peak, peak_allocated())
        self._step["time"][name] += elapsed - phase.inner
        self._step["peak"][name] = max(self._step["peak"][name], peak)
        if self._open:
            outer = self._open[-1]
            outer.inner += elapsed
            outer.peak = max(outer.peak, peak)

    def wrap(
        self,
        fn: Callable,
        phase: str | Callable[..., str],
        on_result: Callable[[Any], None] | None = None,
    ) -> Callable:
        """`fn` timed as `phase` (a name, or a function of fn's arguments giving one)."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            name = phase(*args, **kwargs) if callable(phase) else phase
            self.enter(name)
            try:
                result = fn(*args, **kwargs)
            finally:
                self.exit(name)
            if on_result is not None:
                on_result(result)
            return result

        return timed

    def optimizer_hooks(self) -> list:
        """Time every `torch.optim.Optimizer.step` as "optimizer"; returns the hook handles."""
        return [
            register_optimizer_step_pre_hook(lambda *_: self.enter("optimizer")),
            register_optimizer_step_post_hook(lambda *_: self.exit("optimizer")),
        ]


def logprob_phase(is_reference: Callable[[Any], bool]) -> Callable[..., str]:
    """The phase of a log-prob forward, from its model argument and the grad mode: the
    reference's (`is_reference(model)`: a second model, or LoRA's policy with its adapters off),
    the update's (with grad), or the old policy's (mu > 1, without)."""

    def phase(model, *args, **kwargs) -> str:
        if is_reference(model):
            return "reference"
        return "update" if torch.is_grad_enabled() else "old_logprobs"

    return phase


def summarize(steps: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Medians over the steps after `warmup`: time and peak per phase, and the counts."""
    measured = steps[warmup:]
    if not measured:
        raise ValueError(f"no step after {warmup} warm-up steps (got {len(steps)} steps)")
    phases = sorted({p for s in measured for p in s["time"]})
    counts = sorted({c for s in measured for c in s["counts"]})

    def median(key: str, name: str) -> float:
        return statistics.median(s[key].get(name, 0) for s in measured)

    time_ = {p: median("time", p) for p in phases}
    return {
        "steps": len(measured),
        "time": time_,
        "step_time": statistics.median(sum(s["time"].values()) for s in measured),
        "peak_bytes": {p: median("peak", p) for p in phases},
        "counts": {c: median("counts", c) for c in counts},
    }
