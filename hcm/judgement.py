"""Judgement beside the section-5.1 score: per-candidate verdicts, answer sizes, faithfulness.

Section 5.1 counts an answer correct when it is valid and every option it names is acceptable,
so naming fewer options raises the score without better judgement ("A" for "ABCD" is correct).
These read the same answers per candidate instead:
- an answer keeps the candidates it names and leaves out the others ("N" leaves out all four);
  an invalid answer (None) gives no verdict, so its four candidates count in the denominators
  with none judged right;
- the balanced per-candidate score is the mean of two shares pooled over every candidate of
  every sample: unacceptable candidates left out, and acceptable candidates kept. Naming one
  option of four acceptable ones scores 1/4 on the second share, where section 5.1 gives 100%;
- the answer-size distribution says how many options answers name (N, 1-4, invalid);
- faithfulness: whether the answer is the set the completion's own CoT calls acceptable.

The CoT's per-candidate verdicts are read from its `<think>...</think>` block (none without a
closed one: a cut CoT states nothing), in the two formats of hcm.data.synthetic.text:
- compact, `A: floor, shadow, acceptable. B: floating, shadow, unacceptable.`: the clause after
  "X:" ends in the verdict word;
- full, `I observed <A> ..., <B> ..., so I ultimately chose X.`: the clause after "<X>" is
  acceptable when it says the product "matches the original and its lighting, shadow and
  placement are physically plausible" (the only wording that format uses for acceptable), and
  unacceptable when it says anything else (it names a defect). The closing "ultimately chose X"
  is not read: it restates the answer, so comparing it with `<answer>` would test copying, not
  whether the answer follows the per-candidate reasoning.
A letter given two different verdicts has none. Imports only hcm.screening (bottom floor).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from hcm.screening import NONE_ANSWER, OPTIONS

SIZES = (NONE_ANSWER, "1", "2", "3", "4", "invalid")  # answer_size's values, in table order
# judgement_counts' fields, in order
COUNTS = ("left_out_unacceptable", "unacceptable", "kept_acceptable", "acceptable")

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_COMPACT = re.compile(r"(?<![A-Za-z])([A-D]):[^.:<]*?\b(unacceptable|acceptable)\s*\.")
_FULL = re.compile(r"<([A-D])>")
_FULL_END = ", so I ultimately chose"
_FULL_ACCEPTABLE = (
    "matches the original and its lighting, shadow and placement are physically plausible"
)


def answer_size(parsed: str | None) -> str:
    """Which of SIZES an answer is: "N", how many options it names, or "invalid".

    >>> answer_size("AC"), answer_size("N"), answer_size(None)
    ('2', 'N', 'invalid')
    """
    if parsed is None:
        return "invalid"
    return NONE_ANSWER if parsed == NONE_ANSWER else str(len(parsed))


def judgement_counts(parsed: str | None, label: str) -> tuple[int, int, int, int]:
    """(unacceptable left out, unacceptable, acceptable kept, acceptable) over one sample's
    four candidates, as COUNTS names them. `label` is canonical ("AC" or "N").

    >>> judgement_counts("A", "AC")  # B, D left out (right); C left out (wrong)
    (2, 2, 1, 2)
    >>> judgement_counts(None, "AC")  # invalid: no verdict
    (0, 2, 0, 2)
    """
    acceptable = set() if label == NONE_ANSWER else set(label)
    kept = set() if parsed in (None, NONE_ANSWER) else set(parsed)
    left_out = set() if parsed is None else set(OPTIONS) - kept
    unacceptable = set(OPTIONS) - acceptable
    return (
        len(left_out & unacceptable),
        len(unacceptable),
        len(kept & acceptable),
        len(acceptable),
    )


def balanced_shares(counts: Sequence[float]) -> dict[str, float | None]:
    """From summed `judgement_counts`: the share (%) of unacceptable candidates left out, of
    acceptable ones kept, and their mean (`balanced`). A share with no candidate is None, and
    so is the balanced score then.

    >>> balanced_shares([3, 4, 1, 4])
    {'left_out_unacceptable': 75.0, 'kept_acceptable': 25.0, 'balanced': 50.0}
    """
    left, unacceptable, kept, acceptable = counts
    out = {
        "left_out_unacceptable": 100 * left / unacceptable if unacceptable else None,
        "kept_acceptable": 100 * kept / acceptable if acceptable else None,
    }
    shares = list(out.values())
    out["balanced"] = None if None in shares else sum(shares) / 2
    return out


def cot_verdicts(completion: str) -> dict[str, bool]:
    """The verdicts a completion's CoT states: letter -> acceptable (module docstring).

    >>> cot_verdicts("<think>A: floor, shadow, acceptable. B: floating, unacceptable.</think>")
    {'A': True, 'B': False}
    >>> cot_verdicts("<think>I observed <A> the jar matches the original and its lighting, shadow"
    ...              " and placement are physically plausible, <B> the jar floats above the floor,"
    ...              " so I ultimately chose A.</think>")
    {'A': True, 'B': False}
    """
    think = _THINK.search(completion)
    if think is None:
        return {}
    text = think.group(1)
    stated: list[tuple[str, bool]] = []
    if _FULL.search(text):
        parts = _FULL.split(text.split(_FULL_END)[0])  # [before, X, clause, Y, clause, ...]
        for letter, clause in zip(parts[1::2], parts[2::2], strict=True):
            clause = clause.strip(" ,.")
            if clause:
                stated.append((letter, _FULL_ACCEPTABLE in clause))
    else:
        stated = [(m[0], m[1] == "acceptable") for m in _COMPACT.findall(text)]
    verdicts: dict[str, bool] = {}
    conflicting = set()
    for letter, ok in stated:
        if verdicts.setdefault(letter, ok) != ok:
            conflicting.add(letter)
    return {k: v for k, v in sorted(verdicts.items()) if k not in conflicting}


def cot_choice(completion: str) -> str | None:
    """The answer the CoT's verdicts imply ("N" when it calls none acceptable), or None when it
    does not state a verdict for each of the four candidates.

    >>> cot_choice("<think>A: acceptable. B: unacceptable. C: unacceptable. D: acceptable.</think>")
    'AD'
    """
    verdicts = cot_verdicts(completion)
    if set(verdicts) != set(OPTIONS):
        return None
    return "".join(k for k in OPTIONS if verdicts[k]) or NONE_ANSWER


def faithful(completion: str, parsed: str | None) -> bool | None:
    """Whether the answer (`parsed`, None if invalid) is exactly the set the completion's CoT
    calls acceptable; None when the CoT does not state all four verdicts.

    >>> cot = "<think>A: acceptable. B: unacceptable. C: unacceptable. D: acceptable.</think>"
    >>> faithful(cot, "AD"), faithful(cot, "A"), faithful("<answer>A</answer>", "A")
    (True, False, None)
    """
    choice = cot_choice(completion)
    return None if choice is None else parsed == choice
