"""Verifiable rewards for GRPO (eqs. 6-7): format, binary accuracy and the DPA reward.

Each reward takes one completion (and the labelled answer) and returns a float, as TRL's reward
functions do; `score` applies a weighted list of them to a batch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from hcm.choice import is_correct
from hcm.screening import extract_answer, is_acceptable

# Whitespace may surround and separate the two blocks; nothing else may stand outside them.
_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)


def format_reward(completion: str) -> float:
    """1.0 for `<think>...</think><answer>...</answer>` and nothing else, else 0.0.

    >>> format_reward("<think>A is fine</think> <answer>A</answer>")
    1.0
    """
    return 1.0 if _FORMAT.fullmatch(completion) else 0.0


def accuracy_reward(completion: str, answer: str) -> float:
    """1.0 only when the response names exactly the acceptable set (DeepSeek-R1's r_acc).

    >>> accuracy_reward("<answer>C, A</answer>", "AC")
    1.0
    """
    return 1.0 if extract_answer(completion) == answer else 0.0


def dpa_reward(completion: str, answer: str) -> float:
    """Dynamic Proportional Accuracy (eq. 7): len(response) / len(answer) when the response's
    options are a non-empty subset of the answer's, else 0. "N" against "N" scores 1.

    >>> dpa_reward("<answer>A</answer>", "AC")
    0.5
    """
    response = extract_answer(completion)
    if not is_acceptable(response, answer):
        return 0.0
    return len(response) / len(answer)


def choice_reward(completion: str, answer: str) -> float:
    """Single-answer accuracy for the public benchmarks (section 5.4: no DPA there): 1.0 when the
    response gives the labelled option letter or open answer, as their harnesses read it.

    >>> choice_reward("<answer>(B)</answer>", "B")
    1.0
    """
    return 1.0 if is_correct(completion, answer) else 0.0


RewardFn = Callable[..., float]
REWARDS: dict[str, RewardFn] = {
    "format": format_reward,
    "accuracy": accuracy_reward,
    "dpa": dpa_reward,
    "choice": choice_reward,
}
_NEEDS_ANSWER = {"accuracy", "dpa", "choice"}


def score(
    completions: Sequence[str], answers: Sequence[str], weights: dict[str, float]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the named rewards per completion: (N,) total and (N,) per reward name."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; available: {sorted(REWARDS)}")
    per_reward = {}
    for name in weights:
        fn = REWARDS[name]
        values = [
            fn(c, a) if name in _NEEDS_ANSWER else fn(c)
            for c, a in zip(completions, answers, strict=True)
        ]
        per_reward[name] = torch.tensor(values, dtype=torch.float32)  # (N,)
    total = torch.zeros(len(completions))
    for name, w in weights.items():
        total += w * per_reward[name]
    return total, per_reward
