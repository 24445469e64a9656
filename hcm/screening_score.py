"""The screening score of section 5.1, as a torchmetrics Metric.

A response is correct when it is non-empty, valid and every option it names is acceptable: the
e-commerce use shows one image, so naming any subset of the acceptable set is enough. The overall
score counts every sample; a sample counts in each dimension it is tagged with. The random-guess
baseline is the expectation of picking one of the five options (A-D, N): mean answer length / 5
over the same samples (the paper's 1.7136 gives 34.27).

Beside the paper's score, `exact_match` and `mean_dpa` show partial learning that the lenient
score hides (docs/science.md, "Reading the scores"), and `valid_rate` shows how often the
response could be parsed. The lenient score also rises by naming fewer options; hcm.judgement's
reading per candidate does not: `judgement/balanced` (with its two shares,
`judgement/left_out_unacceptable` and `judgement/kept_acceptable`), `answer_size/<N|1-4|invalid>`
(% of answers), `verdicts_stated` (% of completions whose CoT gives all four verdicts) and
`faithful` (% of those whose answer is what their CoT concluded). A share with nothing to count
(no acceptable candidate, no CoT with all four verdicts) is left out, as metrics.json must stay
plain JSON (no NaN).
All states are sums, so the metric is correct under DDP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from hcm.judgement import SIZES, answer_size, balanced_shares, faithful, judgement_counts
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
        # over all samples: summed judgement_counts, answers per size, [CoTs stated, faithful]
        for name, n in (("judgement", 4), ("sizes", len(SIZES)), ("cot", 2)):
            self.add_state(name, default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def judge(
        self,
        completions: Sequence[str],
        answers: Sequence[str],
        dimensions: Sequence[Sequence[str]] | None = None,
    ) -> list[dict[str, Any]]:
        """Each response's verdict, as the score counts it (a row of predictions.jsonl).

        >>> v = ScreeningScore().judge(["<answer>A</answer>"], ["CA"])[0]
        >>> v["label"], v["parsed"], v["correct"], v["dpa"], v["faithful"]
        ('AC', 'A', True, 0.5, None)
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
                    "faithful": faithful(completion, response),
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
            self.judgement += torch.tensor(judgement_counts(response, answer), dtype=torch.float64)
            self.sizes[SIZES.index(answer_size(response))] += 1
            if v["faithful"] is not None:
                self.cot += torch.tensor([1.0, float(v["faithful"])], dtype=torch.float64)
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
        for key, share in balanced_shares(self.judgement.tolist()).items():
            if share is not None:
                out[f"judgement/{key}"] = torch.tensor(share)
        answers = self.count[0].clamp(min=1)
        for j, size in enumerate(SIZES):
            out[f"answer_size/{size}"] = (100.0 * self.sizes[j] / answers).float()
        stated, agreed = self.cot.tolist()
        out["verdicts_stated"] = (100.0 * self.cot[0] / answers).float()
        if stated:
            out["faithful"] = torch.tensor(100.0 * agreed / stated)
        return out

    @staticmethod
    def table(
        results: dict[str, float], model: str, prompt: str, prefix: str = "test/score/"
    ) -> str:
        """Markdown in the layout of the paper's Table 3: the random-guess row, then the model's."""

        # a dimension no sample has gets no score, not 0 (as in the pipeline's summary)
        absent = {d for d in DIMENSIONS if results.get(f"{prefix}count/{d}") == 0}

        def row(name: str, prompt_type: str, keys: list[str]) -> str:
            cells = [
                "n/a" if k.split("/")[-1] in absent else _number(results.get(prefix + k))
                for k in keys
            ]
            return f"| {name} | {prompt_type} | " + " | ".join(cells) + " |"

        head = "| Models | Prompt Type | " + " | ".join(HEADERS) + " |"
        sep = "|" + "---|" * (len(HEADERS) + 2)
        random_keys = ["random_baseline", *(f"random_baseline/{d}" for d in DIMENSIONS)]
        lines = [head, sep, row("Random", "-", random_keys), row(model, prompt, list(COLUMNS))]
        keys = ("exact_match", "judgement/balanced", "faithful", "mean_dpa", "valid_rate", "count")
        lines += ["", footnote(results, prefix, keys)]
        return "\n".join(lines)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def footnote(results: dict[str, float], prefix: str, keys: Sequence[str]) -> str:
    """A table's last line: each of `keys` that `results` has, as "key value", comma-separated."""
    return ", ".join(f"{k} {results[prefix + k]:.2f}" for k in keys if prefix + k in results)
