"""hcm.judgement against hand-computed verdicts: per-candidate counts, the balanced score, answer
sizes, and the CoT verdicts and faithfulness of both CoT formats (the synthetic benchmark's own
CoTs are faithful to their answers by construction)."""

from __future__ import annotations

import doctest

import pytest

import hcm.judgement
from hcm.data import synthetic as syn
from hcm.data.synthetic import text as syn_text
from hcm.data.synthetic.sample import answer_of
from hcm.data.synthetic.scene import sample_meta
from hcm.judgement import (
    answer_size,
    balanced_shares,
    cot_choice,
    cot_verdicts,
    faithful,
    judgement_counts,
)


@pytest.mark.parametrize(
    ("parsed", "label", "counts", "size"),
    [
        # (unacceptable left out, unacceptable, acceptable kept, acceptable)
        ("AC", "AC", (2, 2, 2, 2), "2"),  # exact: every verdict right
        ("A", "AC", (2, 2, 1, 2), "1"),  # correct by 5.1, one acceptable left out
        ("ABCD", "AC", (0, 2, 2, 2), "4"),  # keeps all: no unacceptable left out
        ("N", "AC", (2, 2, 0, 2), "N"),  # leaves all out
        ("N", "N", (4, 4, 0, 0), "N"),
        ("B", "N", (3, 4, 0, 0), "1"),
        (None, "AC", (0, 2, 0, 2), "invalid"),  # invalid: no verdict, denominators kept
        (None, "N", (0, 4, 0, 0), "invalid"),
        ("ABD", "ABCD", (0, 0, 3, 4), "3"),
    ],
)
def test_judgement_counts_and_answer_size(parsed, label, counts, size):
    assert judgement_counts(parsed, label) == counts
    assert answer_size(parsed) == size


@pytest.mark.parametrize(
    ("counts", "left_out", "kept", "balanced"),
    [
        # the first four rows above pooled: 6/8 left out, 5/8 kept -> (75 + 62.5) / 2
        ([6, 8, 5, 8], 75.0, 62.5, 68.75),
        ([4, 4, 0, 0], 100.0, None, None),  # every label "N": nothing acceptable to keep
        ([0, 2, 0, 2], 0.0, 0.0, 0.0),
        ([1, 3, 2, 5], 100 / 3, 40.0, (100 / 3 + 40) / 2),
    ],
)
def test_balanced_shares(counts, left_out, kept, balanced):
    out = balanced_shares(counts)
    assert out["left_out_unacceptable"] == pytest.approx(left_out)
    assert out["kept_acceptable"] == pytest.approx(kept)
    assert out["balanced"] == pytest.approx(balanced)


COMPACT = (
    "<think>A: floor, shadow, acceptable. B: floating, shadow, unacceptable. "
    "C: floor, no shadow, extra object, unacceptable. D: floor, shadow, acceptable.</think>"
)
OK = "the jar matches the original and its lighting, shadow and placement are physically plausible"
FULL = (
    f"<think>I observed <A> {OK}, <B> the shadow falls toward the sun on the left, which is "
    f"physically wrong, <C> the jar floats above the floor without support, <D> {OK}, "
    "so I ultimately chose AD.</think>"
)


@pytest.mark.parametrize(
    ("completion", "verdicts", "choice"),
    [
        (COMPACT + "<answer>AD</answer>", {"A": True, "B": False, "C": False, "D": True}, "AD"),
        (FULL + "<answer>AD</answer>", {"A": True, "B": False, "C": False, "D": True}, "AD"),
        # the closing "ultimately chose" is not read: the clauses decide
        (FULL.replace("chose AD", "chose B"), {"A": True, "B": False, "C": False, "D": True}, "AD"),
        (COMPACT.replace(" acceptable.", " unacceptable."), dict.fromkeys("ABCD", False), "N"),
        # a verdict missing (D), or two different ones for a letter (A): not all four stated
        (COMPACT.split(" D:")[0] + "</think>", {"A": True, "B": False, "C": False}, None),
        (
            COMPACT.replace("</think>", " A: unacceptable.</think>"),
            {"B": False, "C": False, "D": True},
            None,
        ),
        (COMPACT[: -len("</think>")], {}, None),  # cut before </think>: states nothing
        ("<answer>AD</answer>", {}, None),  # a Direct answer has no CoT
        ("<think>A and D look fine.</think><answer>AD</answer>", {}, None),
    ],
)
def test_cot_verdicts_and_choice(completion, verdicts, choice):
    assert cot_verdicts(completion) == verdicts
    assert cot_choice(completion) == choice


@pytest.mark.parametrize(
    ("completion", "parsed", "expected"),
    [
        (COMPACT, "AD", True),
        (COMPACT, "A", False),  # correct by 5.1 for label AD, but not what the CoT concluded
        (COMPACT, "ABD", False),
        (COMPACT, None, False),  # verdicts stated, the answer unreadable
        (FULL, "AD", True),
        (COMPACT.replace(" acceptable.", " unacceptable."), "N", True),
        ("<answer>A</answer>", "A", None),
    ],
)
def test_faithful(completion, parsed, expected):
    assert faithful(completion, parsed) is expected


@pytest.mark.parametrize("style", ["full", "compact"])
def test_the_benchmarks_own_cots_are_faithful(style):
    cfg = syn.SyntheticConfig()
    for i in range(40):
        meta = sample_meta(cfg, 3, "train", i)
        text = syn_text.TEXT_STYLES[style][1](meta)
        assert cot_choice(text) == answer_of(meta)


def test_doctests():
    failed, attempted = doctest.testmod(hcm.judgement)
    assert attempted >= 8 and failed == 0
