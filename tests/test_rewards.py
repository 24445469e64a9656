"""Answer parsing, the three rewards and their weighted sum: table-driven, hand-computed."""

import pytest
import torch

from hcm.rewards import accuracy_reward, dpa_reward, format_reward, score
from hcm.screening import extract_answer, is_acceptable, parse_options


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("AC", "AC"),
        ("A, C", "AC"),
        ("A C", "AC"),
        (" c a ", "AC"),
        ("b.", "B"),
        ("D;B/A", "ABD"),
        ("N", "N"),
        (" n ", "N"),
        ("NA", None),  # N mixed with letters
        ("AA", None),  # a repeated letter
        ("", None),
        ("   ", None),
        ("E", None),
        ("A or B", None),
        ("NN", None),
    ],
)
def test_parse_options(text, expected):
    assert parse_options(text) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>x</think><answer>B</answer>", "B"),
        ("<think>x</think><answer>a, d</answer>", "AD"),
        ("<answer>A</answer> then <answer>C</answer>", "C"),  # the last block counts
        ("<think>no answer given</think>", None),
        ("<think>unterminated <answer>A", None),
        ("B", "B"),  # Direct prompt: the bare answer
        ("A, C", "AC"),
        ("<answer></answer>", None),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>a</think><answer>A</answer>", 1.0),
        ("  <think>a</think>\n\n<answer>A</answer>\n", 1.0),
        ("<think>multi\nline</think><answer>N</answer>", 1.0),
        ("<think>a</think><answer>A</answer> trailing", 0.0),
        ("preamble <think>a</think><answer>A</answer>", 0.0),
        ("<answer>A</answer><think>a</think>", 0.0),  # wrong order
        ("<think>a</think>", 0.0),
        ("<answer>A</answer>", 0.0),
        ("A", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected


def cot(answer: str) -> str:
    return f"<think>...</think><answer>{answer}</answer>"


@pytest.mark.parametrize(
    ("response", "answer", "accuracy", "dpa", "acceptable"),
    [
        ("AC", "AC", 1.0, 1.0, True),
        ("CA", "AC", 1.0, 1.0, True),
        ("A", "AC", 0.0, 0.5, True),
        ("B", "BCD", 0.0, 1 / 3, True),
        ("BD", "BCD", 0.0, 2 / 3, True),
        ("AB", "AC", 0.0, 0.0, False),  # B is not acceptable
        ("ABCD", "AC", 0.0, 0.0, False),
        ("N", "N", 1.0, 1.0, True),
        ("N", "AC", 0.0, 0.0, False),
        ("A", "N", 0.0, 0.0, False),
        ("NA", "AC", 0.0, 0.0, False),  # invalid
        ("", "AC", 0.0, 0.0, False),
    ],
)
def test_accuracy_dpa_and_metric_rule(response, answer, accuracy, dpa, acceptable):
    assert accuracy_reward(cot(response), answer) == accuracy
    assert dpa_reward(cot(response), answer) == pytest.approx(dpa)
    assert is_acceptable(extract_answer(cot(response)), answer) is acceptable


def test_score_weighted_sum():
    completions = [cot("A"), "A", cot("AB")]
    total, parts = score(completions, ["AC", "AC", "AB"], {"format": 1.0, "dpa": 2.0})
    assert parts["format"].tolist() == [1.0, 0.0, 1.0]
    assert parts["dpa"].tolist() == [0.5, 0.5, 1.0]
    assert torch.allclose(total, torch.tensor([2.0, 1.0, 3.0]))


def test_score_rejects_unknown_reward():
    with pytest.raises(ValueError, match="unknown reward"):
        score(["A"], ["A"], {"dpa": 1.0, "bogus": 1.0})
