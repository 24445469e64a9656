"""Single-answer accuracy of a public benchmark, overall and per subtask, as a torchmetrics Metric.

Tables 8-10 report "Overall Accuracy": the percentage of test questions answered correctly
(`hcm.choice.is_correct`). Per-subtask accuracy and the parse rate are logged beside
it. States are sums, so the metric is correct under DDP; the subtasks are fixed when it is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from hcm.choice import is_correct
from hcm.screening import answer_text
from hcm.screening_score import footnote


class BenchmarkAccuracy(Metric):
    full_state_update = False
    higher_is_better = True
    batch_keys = ("answers", "options", "subtasks")  # what update() reads from a prompt batch

    def __init__(self, subtasks: Sequence[str] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.subtasks = [s for s in dict.fromkeys(subtasks) if s]
        k = len(self.subtasks) + 1  # row 0: overall
        for name in ("count", "correct", "answered"):
            self.add_state(name, default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")

    def judge(
        self,
        completions: Sequence[str],
        answers: Sequence[str],
        options: Sequence[Sequence[str]],
        subtasks: Sequence[str],
    ) -> list[dict[str, Any]]:
        """Each response's verdict, as the accuracy counts it (a row of predictions.jsonl)."""
        if not len(completions) == len(answers) == len(options) == len(subtasks):
            raise ValueError(
                f"{len(completions)} completions, {len(answers)} answers, {len(options)} option "
                f"lists, {len(subtasks)} subtasks: one each per question"
            )
        rows = []
        for completion, answer, opts, subtask in zip(
            completions, answers, options, subtasks, strict=True
        ):
            if subtask and subtask not in self.subtasks:
                raise ValueError(f"unknown subtask {subtask!r}; expected {self.subtasks}")
            rows.append(
                {
                    "label": answer,
                    "subtask": subtask,
                    "options": list(opts),
                    "completion": completion,
                    "parsed": answer_text(completion),
                    "correct": is_correct(completion, answer, opts),
                }
            )
        return rows

    def update(
        self,
        completions: Sequence[str],
        answers: Sequence[str],
        options: Sequence[Sequence[str]],
        subtasks: Sequence[str],
    ) -> None:
        for v in self.judge(completions, answers, options, subtasks):
            rows = [0]
            if v["subtask"]:
                rows.append(1 + self.subtasks.index(v["subtask"]))
            for r in rows:
                self.count[r] += 1
                self.correct[r] += float(v["correct"])
                self.answered[r] += float(bool(v["parsed"]))

    def compute(self) -> dict[str, torch.Tensor]:
        pct = (100.0 * self.correct / self.count.clamp(min=1)).float()
        valid = (100.0 * self.answered[0] / self.count[0].clamp(min=1)).float()
        out = {"overall": pct[0], "valid_rate": valid, "count": self.count[0].float()}
        for j, name in enumerate(self.subtasks, start=1):
            out[f"subtask/{name}"] = pct[j]
            out[f"count/{name}"] = self.count[j].float()
        return out

    @staticmethod
    def table(
        results: dict[str, float], model: str, prompt: str, prefix: str = "test/score/"
    ) -> str:
        """Markdown in the layout of Tables 8-10, per-subtask accuracy below it."""
        overall = results.get(prefix + "overall")
        cell = f"{overall:.2f}" if overall is not None else "n/a"
        lines = [
            "| model | Prompt Type | Overall Accuracy |",
            "|---|---|---|",
            f"| {model} | {prompt} | {cell} |",
        ]
        head = prefix + "subtask/"
        subtasks = sorted(k[len(head) :] for k in results if k.startswith(head))
        if subtasks:
            lines += ["", "| subtask | accuracy |", "|---|---|"]
            lines += [f"| {s} | {results[prefix + 'subtask/' + s]:.2f} |" for s in subtasks]
        lines += ["", footnote(results, prefix, ("valid_rate", "count"))]
        return "\n".join(lines)
