"""Encode each prompt's images once and share the features across its G completions.

A GRPO rollout holds G sequences per prompt that carry the same images. The plain path
(`hcm.logprobs.completion_logprobs`, and `generate` after `repeat_batch`) runs the vision tower
on every copy: G times per prompt in the prefill, the reference forward and the update. Vision is
a third of InternVL3-2B's forward FLOPs and two thirds of the 1B's (docs/performance.md).
Here the tower runs once per distinct prompt; the features are repeated to the rows that use them
and scattered into the `<IMG_CONTEXT>` positions, as `InternVLModel.forward` does. The repeat is
differentiable, so the vision tower's gradient is the sum over the G rows: the same gradient as
the plain path's, computed once. (Exact because InternViT has no dropout; with dropout the G rows
would share one mask.)

Rows map to prompts by `prompt_index`; `rows_by_prompt` builds it for the prompt-major layout
[p0c0 .. p0c(G-1), p1c0 ...] of `hcm.rollout.Rollout`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hcm.logprobs import (
    DEFAULT_CHUNK_SIZE,
    completion_logprobs,
)


def rows_by_prompt(rows: Sequence[int], group_size: int) -> tuple[list[int], torch.Tensor]:
    """For rollout rows laid out prompt-major with `group_size` rows per prompt: one row per
    distinct prompt (the first one seen, in order) and each row's index into that list.

    >>> rows_by_prompt([2, 3, 4, 5], group_size=4)
    ([2, 4], tensor([0, 0, 1, 1]))
    """
    position: dict[int, int] = {}  # prompt -> its place among the distinct prompts
    firsts, index = [], []
    for r in rows:
        prompt = r // group_size
        if prompt not in position:
            position[prompt] = len(firsts)
            firsts.append(r)
        index.append(position[prompt])
    return firsts, torch.tensor(index, dtype=torch.long)


def image_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projected vision features of `pixel_values` (tiles, 3, H, W) -> (tiles, T_img, D)."""
    inner = model.model
    cfg = model.config
    out = inner.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )
    # transformers 5.23 returns a model output (features in pooler_output), older 5.x the tensor
    return getattr(out, "pooler_output", out)


def embeds_with_shared_images(
    model: nn.Module,
    input_ids: torch.Tensor,
    features: torch.Tensor,
    tiles: Sequence[int],
    prompt_index: torch.Tensor,
) -> torch.Tensor:
    """Token embeddings of `input_ids` (N, S) with the image features of each row's prompt.

    `features` (sum(tiles), T_img, D) are the distinct prompts' tiles in order; `tiles[p]` is
    prompt p's tile count; `prompt_index` (N,) picks each row's prompt.
    """
    per_prompt = features.split(list(tiles))  # U x (tiles_p, T_img, D)
    rows = torch.cat([per_prompt[p] for p in prompt_index.tolist()])  # (row tiles, T_img, D)
    embeds = model.get_input_embeddings()(input_ids)  # (N, S, D)
    slots = input_ids == model.config.image_token_id  # (N, S)
    if int(slots.sum()) != rows.shape[0] * rows.shape[1]:
        raise ValueError(
            f"{int(slots.sum())} image tokens in input_ids, but the rows' prompts have "
            f"{rows.shape[0]} tiles x {rows.shape[1]} features"
        )
    return embeds.masked_scatter(slots[..., None], rows.to(embeds.dtype))


def shared_image_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    tiles: Sequence[int],
    prompt_index: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """`completion_logprobs` with each distinct prompt's images encoded once: (N, L).

    Args:
        input_ids, attention_mask, completion_mask: as for `completion_logprobs` (N rows).
        pixel_values: the distinct prompts' tiles (sum(tiles), 3, H, W), prompt after prompt.
        tiles: tiles per distinct prompt.
        prompt_index: (N,) which distinct prompt each row belongs to.
    """
    features = image_features(model, pixel_values)  # (sum(tiles), T_img, D), once per prompt
    embeds = embeds_with_shared_images(model, input_ids, features, tiles, prompt_index)
    return completion_logprobs(
        model, input_ids, attention_mask, None, completion_mask, temperature, chunk_size, embeds
    )
