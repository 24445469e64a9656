"""Reading a single-choice answer from a response, as the public benchmarks' harnesses do.

lmms-eval and VLMEvalKit score these benchmarks by exact match after light normalisation: the
response's option letter ("B", "b.", "(B)", "B. a red car", "The answer is B") or, when it names
none, the option text it quotes; for RealWorldQA's open answers, the text lower-cased with
punctuation stripped and number words turned into digits ("Two." -> "2"). The answer stands
where a screening response puts it (`hcm.screening.answer_text`: the last `<answer>` block,
else the bare text); the screening task's own answers, sets of options, are read there too.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from hcm.screening import answer_text

LETTERS = string.ascii_uppercase
NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
    "thirteen": "13", "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17",
    "eighteen": "18", "nineteen": "19", "twenty": "20",
}  # fmt: skip
_PUNCTUATION = re.compile(r"[^\w\s]")
_PAREN_LETTER = re.compile(r"\(([A-Z])\)")
_LEADING_LETTER = re.compile(r"^\s*\(?([A-Za-z])[.):]")  # "B.", "b)", "(B)", "B:" at the start


def normalize(text: str) -> str:
    """Lower-case, punctuation stripped, whitespace collapsed, number words as digits.

    >>> normalize(" Two cars. ")
    '2 cars'
    """
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words)


def extract_choice(text: str, options: Sequence[str] = ()) -> str | None:
    """The option letter a response names, or None.

    `options` are the option texts in letter order (A, B, ...); with none given, any letter
    counts. Tried in order: the whole response is a letter; a letter opens it ("B. red");
    "(B)" anywhere; exactly one stand-alone capital letter among the options ("I pick B");
    exactly one option's text quoted.

    >>> extract_choice("(c) the second image", ["left", "right", "the second image"])
    'C'
    """
    valid = LETTERS[: len(options)] if options else LETTERS
    bare = _PUNCTUATION.sub("", text).strip()
    if len(bare) == 1 and bare.upper() in valid:
        return bare.upper()
    for pattern in (_LEADING_LETTER, _PAREN_LETTER):
        m = pattern.search(text)
        if m and m.group(1).upper() in valid:
            return m.group(1).upper()
    capitals = {w for w in _PUNCTUATION.sub(" ", text).split() if len(w) == 1 and w in valid}
    if len(capitals) == 1:
        return capitals.pop()
    said = normalize(text)
    quoted = [i for i, opt in enumerate(options) if normalize(opt) and normalize(opt) in said]
    if len(quoted) == 1:
        return valid[quoted[0]]
    return None


def is_letter(answer: str) -> bool:
    return len(answer) == 1 and answer in LETTERS


def is_correct(completion: str, answer: str, options: Sequence[str] = ()) -> bool:
    """Whether a response gives the labelled single answer: a letter, or RealWorldQA's open text.

    >>> is_correct("<think>...</think><answer>(B)</answer>", "B")
    True
    >>> is_correct("Two.", "2")
    True
    """
    text = answer_text(completion)
    if not text:
        return False
    if is_letter(answer):
        return extract_choice(text, options) == answer
    return normalize(text) == normalize(answer)
