"""The screening score of section 5.1, as a torchmetrics Metric.

A response is correct when it is non-empty, valid and every option it names is acceptable: the
e-commerce use shows one image, so naming any subset of the acceptable set is enough. The overall
score counts every sample; a sample counts in each dimension it is tagged with. The random-guess
baseline is the expectation of picking one of the five options (A-D, N): mean answer length / 5
over the same samples (the paper's 1.7136 gives 34.27).

Beside the paper's score, `exact_match` and `mean_dpa` show partial learning that the lenient
score hides (docs/science.md, "Reading the scores"), and `valid_rate` shows how often the
response could be parsed.
All states are sums, so the metric is correct under DDP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from hcm.screening import DIMENSIONS, OPTIONS, canonical_answer, extract_answer, is_acceptable

N_CHOICES = len(OPTIONS) + 1  # A-D and N
COLUMNS = ("overall", *DIMENSIONS)
HEADERS = (
    "Overall Score",
    "Appearance Deformation",
    "Physical Shadow",
    "Placement Layout",
    "Extension Rationality",
)


class ScreeningScore(Metric):
    full_state_update = False
    higher_is_better = True
    batch_keys = ("answers", "dimensions")  # what update() reads from a prompt batch

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        k = len(DIMENSIONS) + 1  # row 0: overall, rows 1..: the four dimensions
        for name in ("count", "correct", "answer_len", "exact", "dpa", "valid"):
            self.add_state(name, default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")

    def judge(
        self,
        completions: Sequence[str],
        answers: Sequence[str],
        dimensions: Sequence[Sequence[str]] | None = None,
    ) -> list[dict[str, Any]]:
        """Each response's verdict, as the score counts it (a row of predictions.jsonl).

        >>> v = ScreeningScore().judge(["<answer>A</answer>"], ["CA"])[0]
        >>> v["label"], v["parsed"], v["correct"], v["dpa"]
        ('AC', 'A', True, 0.5)
        """
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        if dimensions is not None and len(dimensions) != len(answers):
            raise ValueError(f"{len(dimensions)} dimension lists but {len(answers)} answers")
        rows = []
        for i, (completion, answer) in enumerate(zip(completions, answers, strict=True)):
            answer = canonical_answer(answer)
            dims = list(dimensions[i]) if dimensions is not None else []
            for dim in dims:
                if dim not in DIMENSIONS:
                    raise ValueError(f"unknown dimension {dim!r}; expected one of {DIMENSIONS}")
            response = extract_answer(completion)
            correct = is_acceptable(response, answer)
            rows.append(
                {
                    "label": answer,
                    "dimensions": dims,
                    "completion": completion,
                    "parsed": response,
                    "correct": correct,
                    "dpa": len(response) / len(answer) if correct else 0.0,
                }
            )
        return rows

    def update(
        self,
        completions: Sequence[str],
        answers: Sequence[str],
        dimensions: Sequence[Sequence[str]] | None = None,
    ) -> None:
        verdicts = self.judge(completions, answers, dimensions)
        rows = torch.zeros(len(verdicts), len(DIMENSIONS) + 1, dtype=torch.float64)
        stats = torch.zeros(len(verdicts), 5, dtype=torch.float64)
        for i, v in enumerate(verdicts):
            response, answer = v["parsed"], v["label"]
            stats[i] = torch.tensor(
                [v["correct"], len(answer), response == answer, v["dpa"], response is not None]
            )
            rows[i, 0] = 1.0
            for dim in v["dimensions"]:
                rows[i, 1 + DIMENSIONS.index(dim)] = 1.0
        self.count += rows.sum(0)
        for j, name in enumerate(("correct", "answer_len", "exact", "dpa", "valid")):
            getattr(self, name).add_(rows.T @ stats[:, j])  # (k,) sums per row

    def compute(self) -> dict[str, torch.Tensor]:
        def pct(num: torch.Tensor) -> torch.Tensor:
            return (100.0 * num / self.count.clamp(min=1)).float()

        score, baseline = pct(self.correct), pct(self.answer_len / N_CHOICES)
        out = {"overall": score[0], "random_baseline": baseline[0]}
        for j, dim in enumerate(DIMENSIONS, start=1):
            out[dim] = score[j]
            out[f"random_baseline/{dim}"] = baseline[j]
            out[f"count/{dim}"] = self.count[j].float()
        out["exact_match"] = pct(self.exact)[0]
        out["mean_dpa"] = pct(self.dpa)[0]
        out["valid_rate"] = pct(self.valid)[0]
        out["count"] = self.count[0].float()
        return out

    @staticmethod
    def table(
        results: dict[str, float], model: str, prompt: str, prefix: str = "test/score/"
    ) -> str:
        """Markdown in the layout of the paper's Table 3: the random-guess row, then the model's."""

        def row(name: str, prompt_type: str, keys: list[str]) -> str:
            cells = [f"{results[prefix + k]:.2f}" if prefix + k in results else "n/a" for k in keys]
            return f"| {name} | {prompt_type} | " + " | ".join(cells) + " |"

        head = "| Models | Prompt Type | " + " | ".join(HEADERS) + " |"
        sep = "|" + "---|" * (len(HEADERS) + 2)
        random_keys = ["random_baseline", *(f"random_baseline/{d}" for d in DIMENSIONS)]
        lines = [head, sep, row("Random", "-", random_keys), row(model, prompt, list(COLUMNS))]
        lines += ["", footnote(results, prefix, ("exact_match", "mean_dpa", "valid_rate", "count"))]
        return "\n".join(lines)


def footnote(results: dict[str, float], prefix: str, keys: Sequence[str]) -> str:
    """A table's last line: each of `keys` that `results` has, as "key value", comma-separated."""
    return ", ".join(f"{k} {results[prefix + k]:.2f}" for k in keys if prefix + k in results)
