"""GRPO's math (paper eqs. 2-5) as pure tensor functions: group advantages and the clipped loss,
and which groups a step trains on (DAPO's redraws, the difficulty band: not the paper's).

Layout: a batch holds B prompts × G completions, prompt-major, so row i of every (B*G, ...) tensor
is completion i % G of prompt i // G:

    rewards  [p0c0, p0c1, ..., p0c{G-1}, p1c0, ..., p{B-1}c{G-1}]     # (B*G,)

Departures from the paper's equations, all as in TRL / ms-swift (the paper trains with SWIFT on
top of TRL):
- eq. 2 divides by `std + eps` (unbiased std, eps 1e-4) so a group with equal rewards has no NaN;
  such a group gets advantage exactly 0 (it carries no learning signal).
- eqs. 3-5 are applied per token (the paper writes them per sequence): w is a per-token ratio
  unless `level="sequence"` (GSPO), and the KL is the k3 estimator on each sampled token.
- the upper clip bound may differ from the lower one (DAPO's clip-higher), default equal.
- the k3 KL may be clamped (`kl_clamp`, ms-swift's guard since v4.1), default off: eq. 4 exactly.
"""

from __future__ import annotations

import torch

ADVANTAGE_SCALES = ("group", "batch", "none")
RATIO_LEVELS = ("token", "sequence")
AGGREGATIONS = ("sequence_mean", "token_mean")

# With `kl_clamp` set, the log-ratio of the k3 KL is also clamped to +/- this (ms-swift >= 4.1).
KL_LOG_RATIO_BOUND = 20.0


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D (B*G,), got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (GRPO needs a group), got {group_size!r}")
    if rewards.numel() == 0 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"len(rewards)={rewards.numel()} is not a positive multiple of group_size={group_size}"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return rewards.view(-1, group_size)  # (B, G)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups have all G rewards equal (no learning signal): bool tensor (B,).

    >>> zero_variance_groups(torch.tensor([1.0, 0.0, 0.5, 0.5]), 2)
    tensor([False,  True])
    """
    grouped = _grouped(rewards, group_size)  # (B, G)
    # exact equality, not isclose: a group with rewards 0.5 and 0.5+1e-9 still ranks its members
    return grouped.amax(dim=1) == grouped.amin(dim=1)


def redraw_plan(flat: torch.Tensor, wanted_anywhere: bool) -> tuple[list[int], bool] | None:
    """One round of DAPO's dynamic sampling on one rank: which prompts to sample again, and
    whether to keep what comes out; None when no rank has a zero-variance group left.

    Every rank must call `generate` as often as the others (under FSDP each forward is
    collective), so the ranks redraw while any rank still has such a group (`wanted_anywhere`,
    all-reduced by the caller); a rank with none left samples its first prompt to stay in step,
    and discards that draw, keeping the completions it has.

    >>> redraw_plan(torch.tensor([False, True]), wanted_anywhere=True)
    ([1], True)
    >>> redraw_plan(torch.tensor([False, False]), wanted_anywhere=True)  # another rank's turn
    ([0], False)
    >>> redraw_plan(torch.tensor([False, False]), wanted_anywhere=False) is None
    True
    """
    if not wanted_anywhere:
        return None
    prompts = flat.nonzero().squeeze(1).tolist()
    return (prompts, True) if prompts else ([0], False)


def pass_rates(right: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each prompt's current pass rate: the share of its G completions judged right, (B*G,) bool
    -> (B,).

    >>> pass_rates(torch.tensor([True, False, True, True]), 2)
    tensor([0.5000, 1.0000])
    """
    return _grouped(right.float(), group_size).mean(dim=1)  # (B,)


def band_selection(rates: torch.Tensor, low: float, high: float, batch_size: int) -> list[int]:
    """Online difficulty selection: which of the drawn prompts a step trains on.

    The prompts whose pass rate lies in [low, high] (inclusive; pass rates are multiples of 1/G,
    compared exactly), in draw order, at most `batch_size` of them; fewer when fewer are in the
    band, none when none is (the caller skips the step). A band that excludes 0 and 1 keeps only
    prompts whose G answers disagree, as DAPO's dynamic sampling filters; a narrower one keeps
    prompts of middling difficulty (online filtering, e.g. PRIME's [0.2, 0.8]).

    >>> rates = torch.tensor([1.0, 0.5, 0.0, 0.25, 0.75])
    >>> band_selection(rates, low=0.25, high=0.75, batch_size=2)  # the first two in the band
    [1, 3]
    >>> band_selection(rates, low=0.25, high=0.75, batch_size=8)  # all three: fewer than 8
    [1, 3, 4]
    >>> band_selection(torch.tensor([1.0, 0.0]), low=0.25, high=0.75, batch_size=2)
    []
    """
    if not 0 <= low <= high <= 1:
        raise ValueError(f"the band needs 0 <= low <= high <= 1, got [{low}, {high}]")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if rates.ndim != 1:
        raise ValueError(f"pass rates must be 1-D (B,), got shape {tuple(rates.shape)}")
    in_band = (rates >= low) & (rates <= high)  # (B,)
    return in_band.nonzero().squeeze(1).tolist()[:batch_size]


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Eq. 2: each completion's reward relative to its group, (B*G,) -> (B*G,).

    `A = (r - mean_g) / (std + eps)` with torch's unbiased std, where std is
    - "group": the std of the completion's own group (the paper, TRL's default),
    - "batch": the std of all B*G rewards (TRL's scale_rewards="batch"; centring stays per group),
    - "none": no division, only centring (Dr. GRPO).
    Groups whose rewards are all equal get exactly 0. `scale` is checked at start-up
    (hcm/config.py), with every setting.

    >>> group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), 2)
    tensor([ 0.7070, -0.7070,  0.0000,  0.0000])
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    grouped = _grouped(rewards, group_size)  # (B, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (B, G)
    if scale == "group":
        advantages = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        advantages = centred / (grouped.std() + eps)
    else:
        advantages = centred
    # the mean of equal floats can differ from them in the last bit: force exact zeros
    flat = zero_variance_groups(rewards, group_size)  # (B,)
    advantages = torch.where(flat[:, None], torch.zeros_like(advantages), advantages)
    return advantages.reshape(-1)  # (B*G,)


def truncation_mask(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """The completion mask without the completions cut by the token budget (TRL's
    `mask_truncated_completions`): (N, T), (N,) bool -> (N, T). Such a row still counts in
    eq. 3's mean over completions, with loss 0; the group's advantages are computed before.

    >>> truncation_mask(torch.ones(2, 3), torch.tensor([False, True]))
    tensor([[1., 1., 1.],
            [0., 0., 0.]])
    """
    if truncated.shape != mask.shape[:1]:
        raise ValueError(f"truncated must be (N,)=({mask.shape[0]},), got {tuple(truncated.shape)}")
    return mask * ~truncated[:, None].to(torch.bool)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    return total / mask.sum().clamp(min=1)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    beta: float = 0.04,
    level: str = "token",
    agg: str = "sequence_mean",
    kl_clamp: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss (minus eq. 3's objective) and detached statistics.

    Args:
        logprobs: (N, T) log pi_theta of each sampled completion token, with grad.
        old_logprobs: (N, T) the same under pi_old, the policy that sampled (treated as constant).
        ref_logprobs: (N, T) the same under pi_ref (constant), or None when beta == 0.
        advantages: (N,) one advantage per completion (`group_advantages`).
        mask: (N, T) 1 on real completion tokens, 0 on padding. Padding may hold any value in
            the other tensors, nan and inf included: it changes neither the loss nor its gradient.
        clip_eps, clip_eps_high: w is clipped to [1 - clip_eps, 1 + clip_eps_high];
            clip_eps_high defaults to clip_eps.
        beta: KL coefficient (the paper's 0.04).
        level: "token": w_t = pi_theta(o_t) / pi_old(o_t) per token (TRL's default);
            "sequence": one w per completion, exp(mean_t(log pi_theta - log pi_old)) over its real
            tokens, shared by all its tokens (GSPO).
        agg: "sequence_mean": mean over each completion's real tokens, then over completions
            (eq. 3, DeepSeekMath, TRL loss_type="grpo"); "token_mean": sum over all real tokens
            / their number (TRL loss_type="dapo" on one process), so long completions weigh more.

    Per token: loss_t = -(min(w A, clip(w) A) - beta * k3_t), k3_t = exp(d) - d - 1 with
    d = log pi_ref - log pi_theta (eq. 4, Schulman's k3: unbiased, >= 0, low variance).

    Which distribution: all log-probs must be taken under the model's full softmax at the sampling
    temperature (logits / T), not under the top-k/top-p-truncated distribution the tokens were
    drawn from; TRL does the same. The truncated distribution is not differentiable in a useful
    way (its support changes with theta and its renormaliser depends on the cut), pi_ref has no
    truncation to match, and with top-k 3 / top-p 0.8 the truncated pi_old would make w exceed 1
    for every kept token. The cost is a small bias: the samples come from the truncated policy.

    kl_clamp: None (the default) is eq. 4 exactly, as TRL computes it. A number c clamps d to
    [-KL_LOG_RATIO_BOUND, KL_LOG_RATIO_BOUND] = [-20, 20] and k3 to at most c (k3 >= 0, so only
    the top matters), as ms-swift does since v4.1 (2026, after the paper: its runs had no clamp)
    with c = 10. The clamp drops a token's KL gradient once k3 > c (c = 10: d > ~2.6, pi_theta
    below pi_ref / 13), exactly where eq. 4 pulls hardest back to pi_ref. Unclamped, exp(d) would
    overflow float32 only for d > 88, i.e. pi_theta < e^-88 pi_ref on a token pi_theta itself
    sampled among its top-k; the non-finite guard (hcm/nonfinite.py) skips such a step.

    Stats (detached, float): `kl` (masked mean of k3, only when ref_logprobs is given),
    `clip_frac_low` / `clip_frac_high` (fraction of real tokens where clipping removed the
    gradient: w < 1 - clip_eps with A < 0, w > 1 + clip_eps_high with A > 0, as TRL counts),
    `clip_frac` (their sum), `ratio_mean` (masked mean of w). With level="sequence" the fractions
    count tokens (a completion weighs by its length), where TRL counts completions.
    """
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    _check_tensors(logprobs, old_logprobs, ref_logprobs, advantages, mask, beta)

    mask = mask.bool()  # (N, T)
    zeros = torch.zeros_like(logprobs)
    # where, not multiplication: 0 * nan is nan, in the forward and in the backward
    logp = torch.where(mask, logprobs, zeros)  # (N, T)
    old = torch.where(mask, old_logprobs.detach().to(logp.dtype), zeros)  # (N, T)
    tokens_per_seq = mask.sum(dim=1).clamp(min=1)  # (N,)

    log_ratio = logp - old  # (N, T), 0 on padding
    if level == "sequence":
        log_ratio = (log_ratio.sum(dim=1) / tokens_per_seq)[:, None].expand_as(logp)  # (N, T)
    ratio = torch.exp(log_ratio)  # (N, T)
    clipped_ratio = ratio.clamp(1 - clip_eps, 1 + clip_eps_high)  # (N, T)
    adv = advantages.detach().to(logp.dtype)[:, None]  # (N, 1)
    surrogate = torch.minimum(ratio * adv, clipped_ratio * adv)  # (N, T)
    per_token_loss = -surrogate  # (N, T)

    stats: dict[str, torch.Tensor] = {}
    if ref_logprobs is not None:
        ref = torch.where(mask, ref_logprobs.detach().to(logp.dtype), zeros)  # (N, T)
        d = ref - logp  # (N, T)
        if kl_clamp is not None:
            d = d.clamp(-KL_LOG_RATIO_BOUND, KL_LOG_RATIO_BOUND)
        kl = torch.exp(d) - d - 1  # (N, T) eq. 4
        if kl_clamp is not None:
            kl = kl.clamp(max=kl_clamp)
        if beta > 0:
            per_token_loss = per_token_loss + beta * kl
        stats["kl"] = _masked_mean(kl.detach(), mask)

    per_token_loss = torch.where(mask, per_token_loss, zeros)  # (N, T)
    if agg == "sequence_mean":
        loss = (per_token_loss.sum(dim=1) / tokens_per_seq).mean()
    else:
        loss = per_token_loss.sum() / mask.sum().clamp(min=1)

    with torch.no_grad():
        low = (ratio < 1 - clip_eps) & (adv < 0)  # (N, T)
        high = (ratio > 1 + clip_eps_high) & (adv > 0)  # (N, T)
        stats["clip_frac_low"] = _masked_mean(low.to(logp.dtype), mask)
        stats["clip_frac_high"] = _masked_mean(high.to(logp.dtype), mask)
        stats["clip_frac"] = stats["clip_frac_low"] + stats["clip_frac_high"]
        stats["ratio_mean"] = _masked_mean(ratio.detach(), mask)
    return loss, stats


def _check_tensors(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
) -> None:
    """The tensors' shapes, and a reference wherever beta needs one. The loss's settings are
    checked once, at start-up, with every config value (hcm/config.py)."""
    if logprobs.ndim != 2:
        raise ValueError(f"logprobs must be (N, T), got shape {tuple(logprobs.shape)}")
    shape = logprobs.shape
    named = {"old_logprobs": old_logprobs, "mask": mask}
    if ref_logprobs is not None:
        named["ref_logprobs"] = ref_logprobs
    for name, tensor in named.items():
        if tensor.shape != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    if advantages.shape != shape[:1]:
        raise ValueError(f"advantages must be (N,)=({shape[0]},), got {tuple(advantages.shape)}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} needs ref_logprobs (pass None only with beta=0)")
