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
    # per candidate (unacceptable left out, unacceptable, acceptable kept, acceptable):
    # A/AC (2,2,1,2), B/AC (1,2,0,2), N/N (4,4,0,0), invalid/B (0,3,0,1), CD/BCD (1,1,2,3)
    assert out["judgement/left_out_unacceptable"].item() == pytest.approx(100 * 8 / 12)
    assert out["judgement/kept_acceptable"].item() == pytest.approx(100 * 3 / 8)
    assert out["judgement/balanced"].item() == pytest.approx((100 * 8 / 12 + 37.5) / 2)
    sizes = {k: out[f"answer_size/{k}"].item() for k in ("N", "1", "2", "3", "4", "invalid")}
    assert sizes == pytest.approx({"N": 20, "1": 40, "2": 20, "3": 0, "4": 0, "invalid": 20})
    # no completion states its four verdicts: nothing to be faithful to
    assert out["verdicts_stated"].item() == 0.0 and "faithful" not in out


def compact(verdicts: str, answer: str) -> str:
    """A compact CoT calling each letter of `verdicts` ("+-+-") acceptable (+) or not (-)."""
    words = {"+": "acceptable", "-": "unacceptable"}
    think = " ".join(f"{k}: floor, {words[v]}." for k, v in zip("ABCD", verdicts, strict=True))
    return f"<think>{think}</think><answer>{answer}</answer>"


def test_faithful_share_among_completions_stating_all_verdicts():
    m = ScreeningScore()
    completions = [
        compact("+--+", "AD"),  # faithful
        compact("+--+", "A"),  # correct by 5.1, not what the CoT concluded
        compact("----", "N"),  # faithful
        compact("+--+", "BOGUS"),  # verdicts stated, invalid answer: not faithful
        cot("A"),  # no verdicts: counts in neither
    ]
    verdicts = m.judge(completions, ["AD"] * 5)
    assert [v["faithful"] for v in verdicts] == [True, False, True, False, None]
    m.update(completions, ["AD"] * 5)
    out = m.compute()
    assert out["verdicts_stated"].item() == pytest.approx(80.0)  # 4 of 5
    assert out["faithful"].item() == pytest.approx(50.0)  # 2 of those 4


def test_table_says_n_a_for_a_dimension_without_samples():
    m = ScreeningScore()
    m.update([cot("A")], ["AC"], [["physical_shadow"]])
    results = {f"test/score/{k}": v.item() for k, v in m.compute().items()}
    lines = ScreeningScore.table(results, "m", "CoT").splitlines()
    assert lines[2] == "| Random | - | 40.00 | n/a | 40.00 | n/a | n/a |"
    assert lines[3] == "| m | CoT | 100.00 | n/a | 100.00 | n/a | n/a |"
    # A kept (1 of 2 acceptable), B and D left out (2 of 2 unacceptable): (100 + 50) / 2
    assert lines[5] == (
        "exact_match 0.00, judgement/balanced 75.00, mean_dpa 50.00, valid_rate 100.00, count 1.00"
    )


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
