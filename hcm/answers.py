"""Reading the options a response names.

A CoT response answers inside `<answer>...</answer>` (the last such block counts); a Direct
response is the bare answer. Parsing is tolerant of separators and case ("a, c", "A C", "AC") and
strict about content: "N" alone means none is acceptable; "N" with letters, a repeated letter,
anything but A-D/N, or no answer at all is invalid (None).
"""

from __future__ import annotations

import re

from hcm.data.records import NONE_ANSWER, OPTIONS

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# Separators a model plausibly puts between letters, and a closing full stop ("B.").
_SEPARATORS = re.compile(r"[\s,;/&+.]+")


def parse_options(text: str) -> str | None:
    """The canonical option string ("AC", "N") named by `text`, or None when invalid.

    >>> parse_options(" a, C ")
    'AC'
    >>> parse_options("NA") is None
    True
    """
    letters = _SEPARATORS.sub("", text).upper()
    if letters == NONE_ANSWER:
        return NONE_ANSWER
    if not letters or any(c not in OPTIONS for c in letters) or len(set(letters)) != len(letters):
        return None
    return "".join(sorted(letters))


def extract_answer(completion: str) -> str | None:
    """The options a response names: the last `<answer>` block if any, else the bare text.

    A response that opened a `<think>` block but gave no `<answer>` has not answered.
    """
    blocks = _ANSWER_BLOCK.findall(completion)
    if blocks:
        return parse_options(blocks[-1])
    if "<think>" in completion or "<answer>" in completion:
        return None
    return parse_options(completion)


def is_acceptable(response: str | None, answer: str) -> bool:
    """Section 5.1: correct when the response is valid and every option it names is acceptable."""
    return response is not None and set(response) <= set(answer)
