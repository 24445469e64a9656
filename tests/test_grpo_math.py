"""GRPO math: advantages and the clipped loss, against hand-computed values and TRL's formula;
which groups a step trains on (DAPO's redraws, the difficulty band); the module's doctests."""

import doctest
import math

import pytest
import torch

import hcm.grpo_math
from hcm.grpo_math import (
    band_selection,
    group_advantages,
    pass_rates,
    policy_loss,
    redraw_plan,
    zero_variance_groups,
)


def test_doctests():
    failed, attempted = doctest.testmod(hcm.grpo_math)
    assert attempted > 0 and failed == 0


# ---------------------------------------------------------------- group_advantages


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0, 0, 0, 2, 2, 2, 2])
    # group 1: mean 0.25, unbiased std sqrt((0.75² + 3 * 0.25²) / 3) = 0.5
    denom = 0.5 + 1e-4
    expected = torch.tensor([0.75 / denom, -0.25 / denom, -0.25 / denom, -0.25 / denom, 0, 0, 0, 0])
    torch.testing.assert_close(group_advantages(rewards, 4), expected)


def test_group_advantages_equal_rewards_are_exactly_zero():
    rewards = torch.tensor([0.45, 0.45, 0.45, 1 / 3, 1 / 3, 1 / 3])  # mean(0.45 x3) is off by 3e-8
    advantages = group_advantages(rewards, 3)
    assert torch.equal(advantages, torch.zeros(6))
    assert torch.equal(group_advantages(rewards, 3, scale="none"), torch.zeros(6))


def test_group_advantages_batch_scale_divides_by_batch_std():
    rewards = torch.tensor([1.0, 0, 3, 3])
    batch_std = rewards.std().item()  # unbiased over all 4
    expected = torch.tensor([0.5, -0.5, 0, 0]) / (batch_std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 2, scale="batch"), expected)


def test_group_advantages_none_only_centres():
    rewards = torch.tensor([1.0, 0, 0, 0, 0.5, 1, 0, 0.5])
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0.5, -0.5, 0])
    torch.testing.assert_close(group_advantages(rewards, 4, scale="none"), expected)


def test_group_advantages_accepts_integer_rewards():
    torch.testing.assert_close(
        group_advantages(torch.tensor([1, 0]), 2, eps=0.0), torch.tensor([1.0, -1.0]) / math.sqrt(2)
    )


@pytest.mark.parametrize(
    ("rewards", "group_size", "scale", "match"),
    [
        (torch.zeros(6), 4, "group", "multiple"),
        (torch.zeros(4), 1, "group", ">= 2"),
        (torch.zeros(0), 2, "group", "multiple"),
        (torch.zeros(2, 2), 2, "group", "1-D"),
    ],
)
def test_group_advantages_errors(rewards, group_size, scale, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, group_size, scale=scale)


def test_zero_variance_groups():
    rewards = torch.tensor([1.0, 1, 0, 1, 0.5, 0.5, 0, 0])
    assert zero_variance_groups(rewards, 2).tolist() == [True, False, True, True]
    assert zero_variance_groups(rewards, 4).tolist() == [False, False]


# ---------------------------------------------------------------- policy_loss on a 2x3 case
#
# completion 0: 3 tokens, A = +1, ratios w = [1, 1.5, 0.5], d = ref - logp = [0, ln 2, -ln 2]
# completion 1: 2 tokens (+1 padding), A = -2, ratios w = [1.1, 0.7], d = [0, 0]
# clip_eps 0.2: surrogate min(wA, clip(w)A) = [1, 1.2, 0.5] and [-2.2, -1.6]
# k3 = e^d - d - 1 = [0, 1 - ln 2, ln 2 - 0.5] (sum 0.5) and [0, 0]

LOGP = [[-1.0, -2.0, -0.5], [-1.5, -0.2, 0.0]]
LOG_W = [[0.0, math.log(1.5), math.log(0.5)], [math.log(1.1), math.log(0.7), 0.0]]
D = [[0.0, math.log(2), -math.log(2)], [0.0, 0.0, 0.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [1.0, -2.0]


def _case(dtype=torch.float64):
    logp = torch.tensor(LOGP, dtype=dtype, requires_grad=True)
    old = logp.detach() - torch.tensor(LOG_W, dtype=dtype)
    ref = logp.detach() + torch.tensor(D, dtype=dtype)
    return logp, old, ref, torch.tensor(ADV, dtype=dtype), torch.tensor(MASK)


@pytest.mark.parametrize(
    ("beta", "agg", "expected"),
    [
        (0.0, "sequence_mean", (-2.7 / 3 + 3.8 / 2) / 2),
        (0.0, "token_mean", (-2.7 + 3.8) / 5),
        (0.1, "sequence_mean", ((-2.7 + 0.1 * 0.5) / 3 + 3.8 / 2) / 2),
        (0.1, "token_mean", (-2.7 + 3.8 + 0.1 * 0.5) / 5),
    ],
)
def test_policy_loss_token_level_hand_computed(beta, agg, expected):
    logp, old, ref, adv, mask = _case()
    loss, stats = policy_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=beta, agg=agg)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert stats["kl"].item() == pytest.approx(0.5 / 5, abs=1e-12)
    assert stats["ratio_mean"].item() == pytest.approx((1 + 1.5 + 0.5 + 1.1 + 0.7) / 5, abs=1e-12)


@pytest.mark.parametrize("agg", ["sequence_mean", "token_mean"])
def test_policy_loss_sequence_level_hand_computed(agg):
    logp, old, ref, adv, mask = _case()
    w0 = 0.75 ** (1 / 3)  # exp(mean(log [1, 1.5, 0.5])), inside [0.8, 1.2]
    w1 = 0.77**0.5  # exp(mean(log [1.1, 0.7]))
    loss, stats = policy_loss(logp, old, ref, adv, mask, beta=0.0, level="sequence", agg=agg)
    expected = (-w0 + 2 * w1) / 2 if agg == "sequence_mean" else (-3 * w0 + 2 * 2 * w1) / 5
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert stats["clip_frac"].item() == 0.0
    assert stats["ratio_mean"].item() == pytest.approx((3 * w0 + 2 * w1) / 5, abs=1e-12)


def test_policy_loss_sequence_level_clips_the_whole_completion():
    logp, old, ref, adv, mask = _case()
    old = old.clone()
    old[0] -= 1.0  # completion 0's ratio e * w0 > 1.2 with A > 0: clipped, no gradient
    loss, stats = policy_loss(logp, old, ref, adv, mask, beta=0.0, level="sequence")
    loss.backward()
    assert loss.item() == pytest.approx((-1.2 + 2 * 0.77**0.5) / 2, abs=1e-12)
    assert torch.equal(logp.grad[0], torch.zeros(3, dtype=torch.float64))
    assert stats["clip_frac_high"].item() == pytest.approx(3 / 5)


def test_policy_loss_gradient_matches_hand_derivation():
    # d loss_t / d logp_t = -A w [unclipped branch active] + beta (1 - e^d), times 1 / (N n_i)
    logp, old, ref, adv, mask = _case()
    loss, _ = policy_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.1)
    loss.backward()
    expected = torch.tensor(
        [
            [(-1 + 0) / 6, (0 + 0.1 * (1 - 2)) / 6, (-0.5 + 0.1 * (1 - 0.5)) / 6],
            [(2 * 1.1 + 0) / 4, 0.0, 0.0],  # token 1: w=0.7 < 0.8 with A<0, clipped branch
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-12)


def test_policy_loss_clip_fractions():
    logp, old, ref, adv, mask = _case()
    _, stats = policy_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.0)
    # high: w=1.5 with A>0; low: w=0.7 with A<0; w=0.5 with A>0 is not counted (min keeps wA)
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 5)
    assert stats["clip_frac_low"].item() == pytest.approx(1 / 5)
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)
    _, wide = policy_loss(logp, old, ref, adv, mask, clip_eps=0.2, clip_eps_high=0.6, beta=0.0)
    assert wide["clip_frac_high"].item() == 0.0
    assert all(not v.requires_grad for v in stats.values())


@pytest.mark.parametrize("agg", ["sequence_mean", "token_mean"])
def test_policy_loss_on_policy_is_plain_policy_gradient(agg):
    torch.manual_seed(0)
    logp = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    adv = torch.tensor([0.5, -1.0, 2.0, -0.3], dtype=torch.float64)
    loss, stats = policy_loss(logp, logp.detach(), None, adv, mask, beta=0.0, agg=agg)
    loss.backward()
    lengths = mask.sum(1, keepdim=True).double()
    weight = 1 / (4 * lengths) if agg == "sequence_mean" else 1 / mask.sum().double()
    torch.testing.assert_close(logp.grad, -adv[:, None] * weight * mask, rtol=0, atol=1e-12)
    assert stats["ratio_mean"].item() == 1.0
    assert "kl" not in stats


def test_policy_loss_beta_zero_removes_kl_term():
    logp, old, ref, adv, mask = _case()
    with_ref, stats = policy_loss(logp, old, ref, adv, mask, beta=0.0)
    without_ref, _ = policy_loss(logp, old, None, adv, mask, beta=0.0)
    assert with_ref.item() == without_ref.item()
    assert stats["kl"].item() > 0  # still logged


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("agg", ["sequence_mean", "token_mean"])
def test_policy_loss_ignores_padding_garbage(level, agg):
    logp, old, ref, adv, mask = _case()
    clean_loss, clean_stats = policy_loss(logp, old, ref, adv, mask, level=level, agg=agg)
    clean_loss.backward()
    clean_grad = logp.grad.clone()

    dirty = logp.detach().clone()
    dirty[1, 2] = float("nan")
    dirty = dirty.requires_grad_()
    old_d, ref_d = old.clone(), ref.clone()
    old_d[1, 2], ref_d[1, 2] = float("inf"), -1e30
    loss, stats = policy_loss(dirty, old_d, ref_d, adv, mask, level=level, agg=agg)
    loss.backward()
    assert loss.item() == clean_loss.item()
    assert torch.equal(dirty.grad, clean_grad)
    assert {k: v.item() for k, v in stats.items()} == {k: v.item() for k, v in clean_stats.items()}


def test_policy_loss_kl_clamp_guards():
    # d = ref - logp = 100 would overflow exp in float32; k3 is capped at 10 with no gradient
    logp = torch.tensor([[-100.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -1.0]])
    adv = torch.zeros(1)
    mask = torch.ones(1, 2)
    loss, stats = policy_loss(logp, logp.detach(), ref, adv, mask, beta=1.0, kl_clamp=10.0)
    loss.backward()
    assert loss.item() == pytest.approx(10 / 2)
    assert stats["kl"].item() == pytest.approx(10 / 2)
    assert torch.equal(logp.grad, torch.zeros(1, 2))


@pytest.mark.parametrize("d", [5.0, 30.0, -30.0])
def test_policy_loss_without_kl_clamp_is_eq_4_exactly(d):
    # kl_clamp=None (the default): k3 = exp(d) - d - 1 with d = log pi_ref - log pi_theta, and
    # its gradient in log pi_theta is 1 - exp(d), however far pi_theta is from pi_ref
    logp = torch.tensor([[-40.0, -1.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-40.0 + d, -1.0]], dtype=torch.float64)
    adv = torch.zeros(1, dtype=torch.float64)
    mask = torch.ones(1, 2)
    loss, stats = policy_loss(logp, logp.detach(), ref, adv, mask, beta=0.5)
    loss.backward()
    k3 = math.exp(d) - d - 1
    assert loss.item() == pytest.approx(0.5 * k3 / 2, rel=1e-12)
    assert stats["kl"].item() == pytest.approx(k3 / 2, rel=1e-12)
    assert logp.grad[0, 0].item() == pytest.approx(0.5 * (1 - math.exp(d)) / 2, rel=1e-12)
    assert logp.grad[0, 1].item() == 0.0  # d = 0 there: no KL, no gradient
    assert math.isfinite(loss.item())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ref_logprobs": None, "beta": 0.04}, "ref_logprobs"),
        ({"advantages": torch.zeros(2, 1)}, "advantages"),
        ({"mask": torch.ones(2, 2)}, "mask"),
    ],
)
def test_policy_loss_errors(kwargs, match):
    logp, old, ref, adv, mask = _case()
    args = {"logprobs": logp, "old_logprobs": old, "ref_logprobs": ref}
    args |= {"advantages": adv, "mask": mask} | kwargs
    with pytest.raises(ValueError, match=match):
        policy_loss(**args)


# ---------------------------------------------------------------- parity with TRL's formula


def _trl_formula_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, loss_type):
    """TRL GRPOTrainer._compute_loss (token-level ratio), rewritten from its published formula."""
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None])
    per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
    per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    return (per_token_loss * mask).sum() / mask.sum()  # "dapo", one process


@pytest.mark.parametrize(("loss_type", "agg"), [("grpo", "sequence_mean"), ("dapo", "token_mean")])
@pytest.mark.parametrize("eps_high", [0.2, 0.28])
def test_policy_loss_matches_trl_formula(loss_type, agg, eps_high):
    torch.manual_seed(1)
    n, t = 8, 7
    base = -torch.rand(n, t, dtype=torch.float64) * 3
    old = base + 0.3 * torch.randn(n, t, dtype=torch.float64)  # ratios spread across the clip
    ref = base + 0.5 * torch.randn(n, t, dtype=torch.float64)
    adv = torch.randn(n, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (n,))
    mask = (torch.arange(t)[None] < lengths[:, None]).double()

    ours_logp = base.clone().requires_grad_()
    trl_logp = base.clone().requires_grad_()
    ours, _ = policy_loss(ours_logp, old, ref, adv, mask, 0.2, eps_high, 0.04, agg=agg)
    theirs = _trl_formula_loss(trl_logp, old, ref, adv, mask, 0.2, eps_high, 0.04, loss_type)
    ours.backward()
    theirs.backward()
    assert abs(ours.item() - theirs.item()) < 1e-6
    torch.testing.assert_close(ours_logp.grad, trl_logp.grad, rtol=0, atol=1e-6)
    assert ((base - old).exp().lt(0.8) | (base - old).exp().gt(1.2)).any()  # clipping exercised


@pytest.mark.parametrize(
    ("flat", "wanted_anywhere", "plan"),
    [
        ([False, True, True], True, ([1, 2], True)),  # this rank's zero-variance groups
        ([False, False, False], True, ([0], False)),  # another rank's: draw, then discard
        ([False, False, False], False, None),  # no rank has any: stop
    ],
)
def test_redraw_plan(flat, wanted_anywhere, plan):
    assert redraw_plan(torch.tensor(flat), wanted_anywhere) == plan


def test_ranks_redraw_in_step_while_any_rank_wants_to():
    """Two ranks under DDP: rank 0's groups gain variance at the first redraw, rank 1's at the
    third. Both must call generate 3 times; rank 0 keeps only its first redraw."""
    still_flat = {0: [True, False], 1: [True, True, True, False]}  # after each draw
    draws, kept = {0: 0, 1: 0}, {0: 0, 1: 0}
    for _ in range(5):  # resample_zero_variance = 5
        flat = {
            r: torch.tensor([still_flat[r][min(kept[r], len(still_flat[r]) - 1)]]) for r in draws
        }
        anywhere = any(bool(f.any()) for f in flat.values())  # the all-reduce
        plans = {r: redraw_plan(flat[r], anywhere) for r in draws}
        if plans[0] is None:
            assert plans[1] is None
            break
        for r, (_, keep) in plans.items():
            draws[r] += 1
            kept[r] += keep
    assert draws == {0: 3, 1: 3} and kept == {0: 1, 1: 3}


# ---------------------------------------------------------------- the difficulty band
def test_pass_rates_are_the_share_right_per_group():
    right = torch.tensor([True, True, True, False, False, False, False, False])
    assert pass_rates(right, 4).tolist() == [0.75, 0.0]
    assert pass_rates(right, 2).tolist() == [1.0, 0.5, 0.0, 0.0]


RATES = [0.0, 0.25, 0.5, 0.75, 1.0, 0.5]


@pytest.mark.parametrize(
    ("low", "high", "batch_size", "kept"),
    [
        (0.25, 0.75, 8, [1, 2, 3, 5]),  # inclusive at both ends, in draw order
        (0.25, 0.75, 2, [1, 2]),  # at most batch_size: the first ones drawn
        (0.25, 0.75, 4, [1, 2, 3, 5]),
        (0.3, 0.7, 8, [2, 5]),  # 0.25 and 0.75 now outside
        (0.5, 0.5, 8, [2, 5]),  # a band of one pass rate
        (0.0, 1.0, 3, [0, 1, 2]),  # the whole range: the band off, at oversample x fewer
        (0.01, 0.99, 8, [1, 2, 3, 5]),  # DAPO's filter: groups whose answers disagree
        (0.0, 0.0, 8, [0]),  # only the groups no completion gets right
        (0.8, 0.9, 8, []),  # none in the band: the step trains nothing
    ],
)
def test_band_selection(low, high, batch_size, kept):
    assert band_selection(torch.tensor(RATES), low, high, batch_size) == kept


@pytest.mark.parametrize(
    ("low", "high", "batch_size", "match"),
    [
        (0.8, 0.2, 2, "low <= high"),
        (-0.1, 0.5, 2, "low <= high"),
        (0.2, 1.5, 2, "low <= high"),
        (0.2, 0.8, 0, "batch_size"),
        (0.2, 0.8, 2.0, "batch_size"),
    ],
)
def test_band_selection_errors(low, high, batch_size, match):
    with pytest.raises(ValueError, match=match):
        band_selection(torch.tensor(RATES), low, high, batch_size)
