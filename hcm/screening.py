"""The screening task's vocabulary and answer grammar: the bottom floor, importing nothing of ours.

A screening question shows an original product image and four candidates; its label names the
acceptable candidates as sorted letters ("AC"), or "N" when none is acceptable. The test split
tags each sample with the defect dimensions of section 3.1 it tests.

A CoT response answers inside `<answer>...</answer>` (the last such block counts); a Direct
response is the bare answer; one that opened `<think>` and never answered has not answered.
Parsing a screening answer is tolerant of separators and case ("a, c", "A C", "AC") and strict
about content: "N" alone means none is acceptable; "N" with letters, a repeated letter, anything
but A-D/N, or no answer at all is invalid (None).
"""

from __future__ import annotations

import re

OPTIONS = ("A", "B", "C", "D")
NONE_ANSWER = "N"
DIMENSIONS = (
    "appearance_deformation",
    "physical_shadow",
    "placement_layout",
    "extension_rationality",
)
SHOWN_CHARS = 80  # values quoted in an error message are cut to this length

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# Separators a model plausibly puts between letters, and a closing full stop ("B.").
_SEPARATORS = re.compile(r"[\s,;/&+.]+")


def shown(value: object) -> str:
    """repr() cut short: a hostile value must not turn an error message into megabytes."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def canonical_answer(text: str) -> str:
    """Validate a labelled answer and return it sorted ("CA" -> "AC"). Raises ValueError.

    >>> canonical_answer("CA")
    'AC'
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"answer must be a non-empty string, got {shown(text)}")
    if text == NONE_ANSWER:
        return text
    unknown = sorted(set(text) - set(OPTIONS))
    if NONE_ANSWER in text:
        raise ValueError(f"'N' (none acceptable) cannot be mixed with letters: {shown(text)}")
    if unknown:
        raise ValueError(
            f"unknown option letter(s) {shown(unknown)} in {shown(text)}; expected A-D or 'N'"
        )
    if len(set(text)) != len(text):
        raise ValueError(f"duplicate letters in {shown(text)}")
    return "".join(sorted(text))


def answer_text(completion: str) -> str | None:
    """The part of a response that answers: the last `<answer>` block, else the bare text;
    None when it opened a `<think>` (or `<answer>`) block but gave no `<answer>` block.

    >>> answer_text("<think>...</think><answer> AC </answer>")
    'AC'
    """
    blocks = _ANSWER_BLOCK.findall(completion)
    if blocks:
        return blocks[-1].strip()
    if "<think>" in completion or "<answer>" in completion:
        return None
    return completion.strip()


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
    """The options a response names (see `answer_text`), or None when it names none validly."""
    text = answer_text(completion)
    return None if text is None else parse_options(text)


def is_acceptable(response: str | None, answer: str) -> bool:
    """Section 5.1: correct when the response is valid and every option it names is acceptable."""
    return response is not None and set(response) <= set(answer)
