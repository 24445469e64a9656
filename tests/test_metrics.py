"""ScreeningScore against hand-computed values, including the paper's random baseline."""

import pytest
import torch

from hcm.screening_score import ScreeningScore


def cot(answer: str) -> str:
    return f"<think>...</think><answer>{answer}</answer>"


def test_scores_per_dimension_hand_computed():
    m = ScreeningScore()
    m.update(
        [cot("A"), cot("B"), cot("N"), "garbage", cot("CD")],
        ["AC", "AC", "N", "B", "BCD"],
        [
            ["appearance_deformation"],
            ["appearance_deformation", "physical_shadow"],
            [],
            ["physical_shadow"],
            ["placement_layout"],
        ],
    )
    out = m.compute()
    # correct: A⊂AC yes, B⊄AC no, N=N yes, invalid no, CD⊂BCD yes -> 3/5
    assert out["overall"].item() == pytest.approx(60.0)
    assert out["appearance_deformation"].item() == pytest.approx(50.0)  # 1 of 2
    assert out["physical_shadow"].item() == pytest.approx(0.0)  # 0 of 2
    assert out["placement_layout"].item() == pytest.approx(100.0)
    assert out["extension_rationality"].item() == pytest.approx(0.0)  # no samples
    assert out["count/extension_rationality"].item() == 0
    # answer lengths 2, 2, 1, 1, 3 -> mean 1.8 -> 36%
    assert out["random_baseline"].item() == pytest.approx(36.0)
    assert out["random_baseline/appearance_deformation"].item() == pytest.approx(40.0)
    assert out["exact_match"].item() == pytest.approx(20.0)  # only N
    # dpa: 0.5, 0, 1, 0, 2/3
    assert out["mean_dpa"].item() == pytest.approx(100 * (0.5 + 1 + 2 / 3) / 5, rel=1e-6)
    assert out["valid_rate"].item() == pytest.approx(80.0)
    assert out["count"].item() == 5


def test_paper_random_baseline():
    # A test set whose mean answer length is 1.7136 gives the paper's 34.27.
    answers = ["A"] * 2864 + ["AB"] * 7136  # mean length 1.7136
    m = ScreeningScore()
    m.update(["A"] * len(answers), answers)
    assert m.compute()["random_baseline"].item() == pytest.approx(34.272, abs=1e-3)


def test_accumulates_across_updates_and_resets():
    m = ScreeningScore()
    m.update([cot("A")], ["A"])
    m.update([cot("B")], ["A"])
    assert m.compute()["overall"].item() == pytest.approx(50.0)
    m.reset()
    m.update([cot("B")], ["B"])
    assert m.compute()["overall"].item() == pytest.approx(100.0)


def test_states_sum_like_ddp():
    a, b, both = ScreeningScore(), ScreeningScore(), ScreeningScore()
    a.update([cot("A"), cot("C")], ["AB", "AB"], [["physical_shadow"], []])
    b.update([cot("N")], ["N"], [["physical_shadow"]])
    both.update(
        [cot("A"), cot("C"), cot("N")],
        ["AB", "AB", "N"],
        [["physical_shadow"], [], ["physical_shadow"]],
    )
    a.merge_state(b)  # what the cross-rank sync does with the states
    for key, value in both.compute().items():
        assert torch.allclose(a.compute()[key], value), key


def test_rejects_bad_inputs():
    m = ScreeningScore()
    with pytest.raises(ValueError):
        m.update(["A"], ["A", "B"])
    with pytest.raises(ValueError, match="unknown dimension"):
        m.update(["A"], ["A"], [["lighting"]])
    with pytest.raises(ValueError):
        m.update(["A"], ["NA"])  # an invalid label is an error, not a zero
