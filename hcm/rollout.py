"""A GRPO rollout: the G completions of each of B prompts, and how its rows split into mini-batches.

Layout, prompt-major, as every (B*G, ...) tensor here:

    rows   [p0c0, p0c1, ..., p0c{G-1}, p1c0, ..., p{B-1}c{G-1}]
    tiles  pixel_values holds each prompt's image tiles once; row r's are prompt r // G's

`GRPOModule.training_step` fills a Rollout in the paper's order: completions (`generate`), their
rewards, the advantages (eq. 2), then the fixed log-probs (pi_old, pi_ref) the loss needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hcm.grpo_math import truncation_mask


@dataclass
class Rollout:
    """G completions for each of B prompts, laid out [p0c0 .. p0c{G-1}, p1c0, ...]."""

    G: int  # completions per prompt (module.group_size)
    input_ids: torch.Tensor  # (B*G, P+L) prompt (left-padded) + completion (right-padded)
    attention_mask: torch.Tensor  # (B*G, P+L)
    completion_mask: torch.Tensor  # (B*G, L)
    truncated: torch.Tensor  # (B*G,) bool: cut by max_new_tokens (no eos, no </answer>)
    pixel_values: torch.Tensor  # (tiles of the B prompts, 3, H, W), each prompt's tiles once
    tiles: list[int]  # (B,) tiles per prompt, to slice pixel_values by prompt
    texts: list[str]  # (B*G,)
    answers: list[str]  # (B*G,) each prompt's label G times
    # (B*G,) per key: what the metric judges a completion by (its batch_keys), e.g. the answers
    labels: dict[str, list] = field(default_factory=dict)
    mask_truncated: bool = False  # leave the truncated rows out of the loss (loss_mask)
    generated: int = 0  # completions sampled for this step: redraws and any left out included
    band_kept: float | None = None  # share of the drawn prompts the difficulty band kept
    loss_weight: float = 1.0  # 0: a placeholder group that trains nothing (the band kept none)
    rewards: torch.Tensor | None = None  # (B*G,) weighted sum of the reward functions, CPU
    per_reward: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B*G,) unweighted
    zero_variance_sampled: float = 0.0  # fraction of groups with equal rewards before any redraw
    advantages: torch.Tensor | None = None  # (B*G,) eq. 2 of the rewards, CPU
    old_logprobs: torch.Tensor | None = None  # (B*G, L), None when mu == 1
    ref_logprobs: torch.Tensor | None = None  # (B*G, L), None when beta == 0

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def loss_mask(self) -> torch.Tensor:
        """(B*G, L) the completion mask, less the truncated rows when they are masked."""
        if self.mask_truncated:
            return truncation_mask(self.completion_mask, self.truncated)
        return self.completion_mask

    def pixels_of(self, rows: list[int]) -> torch.Tensor:
        """The tiles of rows `rows`: each row's prompt's tiles (pixel_values is prompt-major)."""
        per_prompt = self.pixel_values.split(self.tiles)
        return torch.cat([per_prompt[r // self.G] for r in rows])

    def keep_prompts(self, prompts: list[int]) -> None:
        """Keep the groups of `prompts` only, in that order, in place (before the advantages);
        the completions lose the padding columns no kept row needs."""
        G, P = self.G, self.input_ids.shape[1] - self.completion_mask.shape[1]
        rows = [p * G + g for p in prompts for g in range(G)]
        width = P + max(int(self.completion_mask[rows].sum(1).max()), 1)  # right-padded masks
        self.input_ids = self.input_ids[rows, :width]  # (B'*G, P+L')
        self.attention_mask = self.attention_mask[rows, :width]
        self.completion_mask = self.completion_mask[rows, : width - P]  # (B'*G, L')
        self.truncated = self.truncated[rows]
        per_prompt = self.pixel_values.split(self.tiles)
        self.pixel_values = torch.cat([per_prompt[p] for p in prompts])
        self.tiles = [self.tiles[p] for p in prompts]
        self.texts = [self.texts[r] for r in rows]
        self.answers = [self.answers[r] for r in rows]
        self.labels = {k: [v[r] for r in rows] for k, v in self.labels.items()}
        if self.rewards is not None:
            self.rewards = self.rewards[rows]
        self.per_reward = {k: v[rows] for k, v in self.per_reward.items()}

    def replace_rows(
        self,
        rows: list[int],
        ids: torch.Tensor,
        mask: torch.Tensor,
        texts: list[str],
        truncated: torch.Tensor,
        pad_id: int,
    ) -> None:
        """Put new completions (ids, mask: (len(rows), L')) in rows `rows`, in place; the
        completion width grows when a new one is longer than every earlier one."""
        n, P = self.size, self.input_ids.shape[1] - self.completion_mask.shape[1]
        both_ids = pad_right([self.input_ids[:, P:], ids], pad_id)  # (n + len(rows), L'')
        both_mask = pad_right([self.completion_mask, mask], 0)
        new_ids, new_mask = both_ids[:n].clone(), both_mask[:n].clone()  # (n, L'')
        new_ids[rows], new_mask[rows] = both_ids[n:], both_mask[n:]
        self.input_ids = torch.cat([self.input_ids[:, :P], new_ids], 1)
        self.attention_mask = torch.cat([self.attention_mask[:, :P], new_mask], 1)
        self.completion_mask = new_mask
        for j, r in enumerate(rows):
            self.texts[r] = texts[j]
        self.truncated[rows] = truncated


def pad_right(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    """Stack (n_i, L_i) tensors into (sum n_i, max L_i), padding on the right."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat(
        [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors]
    )


def minibatches(n: int, size: int | None) -> list[list[int]]:
    """Consecutive row ranges of at most `size` rows (all n rows at once when size is None)."""
    size = size or n
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def loss_share(mask: torch.Tensor, n_rows: int, n_tokens: int, agg: str) -> float:
    """Weight of a mini-batch's loss so that the weighted sum over mini-batches is the full loss.

    `policy_loss` averages within the mini-batch: over its rows ("sequence_mean") or over its
    real tokens ("token_mean"). The full batch averages over all n_rows rows / n_tokens tokens,
    so each mini-batch weighs by its share of those. A Python float: exact in any dtype.
    """
    if agg == "token_mean":
        return int(mask.sum()) / max(n_tokens, 1)
    return mask.shape[0] / n_rows
