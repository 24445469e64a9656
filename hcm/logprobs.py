"""Log-probabilities of sampled completion tokens, computed a chunk of rows at a time.

Memory rule: float32 logits of a whole batch over InternVL3's 151,674-token vocabulary never exist
at once (8 completions × 512 tokens would be 2.5 GB, plus as much again for the backward). Rows
(token positions) are pushed through `lm_head` and the log-softmax `chunk_size` at a time, upcast
to float32 per chunk, and in the update each chunk is checkpointed: the backward recomputes that
chunk's logits instead of keeping every chunk's alive from the forward.

The log-probs are those of the full softmax of logits / temperature (see `hcm.grpo_math.policy_loss`
for why not the top-k/top-p-truncated sampling distribution).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# 1024 rows × 151,674 × 4 bytes = 0.6 GB of float32 logits per chunk
DEFAULT_CHUNK_SIZE = 1024


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 -> float32; float64 (tests) stays float64
    return torch.promote_types(dtype, torch.float32)


def _rows_logprobs(logits: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.to(_compute_dtype(logits.dtype)) / temperature  # (R, V)
    picked = logits.gather(-1, index[:, None]).squeeze(-1)  # (R,)
    return picked - torch.logsumexp(logits, dim=-1)  # (R,)


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _head_logprobs(
    hidden: torch.Tensor, lm_head: nn.Module, index: torch.Tensor, temperature: float
) -> torch.Tensor:
    return _rows_logprobs(lm_head(hidden), index, temperature)


def token_logprobs(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """log softmax(lm_head(hidden) / temperature)[targets]: (N, T, H), (N, T) -> (N, T).

    `hidden` are the final hidden states at the positions that *predict* `targets` (position t-1
    for token t). Returns float32 (float64 for float64 inputs). Differentiable: when grad is on,
    each chunk runs under activation checkpointing, so the forward keeps only its slice of
    `hidden` and the backward rebuilds one chunk's logits at a time (one extra `lm_head` matmul).
    """
    _check_chunk_size(chunk_size)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} != hidden's {tuple(hidden.shape[:-1])}"
        )
    rows = hidden.reshape(-1, hidden.shape[-1])  # (N*T, H)
    flat_targets = targets.reshape(-1)  # (N*T,)
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in lm_head.parameters())
    )
    chunks = []
    for start in range(0, rows.shape[0], chunk_size):
        args = (rows[start : start + chunk_size], lm_head, flat_targets[start : start + chunk_size])
        if needs_grad:
            chunks.append(checkpoint(_head_logprobs, *args, temperature, use_reentrant=False))
        else:
            chunks.append(_head_logprobs(*args, temperature))
    return torch.cat(chunks).view(targets.shape)  # (N, T)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as `generate` assigns them: (N, S) -> (N, S).

    Qwen2 in transformers 5.23 defaults to 0..S-1 whatever the mask, which shifts a left-padded
    row's rotary positions by its padding. RoPE scores depend only on position differences, so that
    changes log-probs by round-off alone (~1e-9 in float64, more in bf16); these positions make
    them exactly independent of padding and computed as during sampling. Padding gets position 0.
    """
    positions = attention_mask.long().cumsum(dim=-1) - 1  # (N, S)
    return positions.masked_fill(attention_mask == 0, 0)


def check_completion_shapes(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> int:
    """The prompt length P of (N, P+L) `input_ids` whose completions `completion_mask` (N, L)
    marks; raises ValueError when the shapes don't fit together."""
    n_rows, seq_len = input_ids.shape
    completion_len = completion_mask.shape[1]
    prompt_len = seq_len - completion_len
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
            f"{tuple(input_ids.shape)} (prompt mask followed by completion mask)"
        )
    if completion_mask.shape[0] != n_rows or prompt_len < 1:
        raise ValueError(
            f"completion_mask {tuple(completion_mask.shape)} does not fit input_ids "
            f"{tuple(input_ids.shape)} (needs the same N and at least one prompt token)"
        )
    return prompt_len


def completion_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probs of the completion tokens under an `InternVLForConditionalGeneration`: (N, L).

    Args:
        input_ids: (N, P+L) left-padded prompt followed by the right-padded completion.
        attention_mask: (N, P+L) 1 on real tokens (the prompt's mask then `completion_mask`).
        pixel_values: the prompts' image tiles (total_tiles, 3, H, W), or None.
        completion_mask: (N, L) 1 on real completion tokens; L is taken from its width.
        inputs_embeds: (N, P+L, D) the token embeddings with the image features already in
            (`hcm.model.vision_cache`), in place of encoding `pixel_values` (then None).
    Positions where completion_mask is 0 hold finite values of no meaning.
    """
    prompt_len = check_completion_shapes(input_ids, attention_mask, completion_mask)
    if inputs_embeds is None:
        inputs = {"input_ids": input_ids, "pixel_values": pixel_values}
    else:
        inputs = {"inputs_embeds": inputs_embeds}
    # the base model only: its lm_head would build (N, P+L, V) logits at once
    hidden = model.model(
        **inputs,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state  # (N, P+L, H)
    # position t predicts token t + 1: the completion is read off positions P-1 .. P+L-2
    predicting = hidden[:, prompt_len - 1 : -1]  # (N, L, H)
    targets = input_ids[:, prompt_len:]  # (N, L)
    return token_logprobs(predicting, model.lm_head, targets, temperature, chunk_size)
