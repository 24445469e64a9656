"""Model FLOPs of InternVL3's forward, counted from its config, for the update's MFU.

Matmuls only (2 FLOPs per multiply-add); norms, activations, rotary and softmax are left out, as
in the usual MFU accounting. Attention scores count causal attention as half the square in the
language model, full in the vision tower. The `lm_head` counts only the positions whose logits
are needed (the completion tokens), as the update computes them. Backward = 2 x forward;
activation recomputation (gradient checkpointing) is not model FLOPs and is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ForwardFlops:
    vision: float
    projector: float
    text: float
    lm_head: float

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.text + self.lm_head

    @property
    def update(self) -> float:
        """A forward and its backward (twice the forward's matmuls)."""
        return 3 * self.total


def vision_flops_per_tile(config) -> tuple[float, float]:
    """(vision tower, projector) FLOPs of one tile."""
    v = config.vision_config
    size = v.image_size[0] if isinstance(v.image_size, list | tuple) else v.image_size
    patch = v.patch_size[0] if isinstance(v.patch_size, list | tuple) else v.patch_size
    patches = (size // patch) ** 2
    n = patches + 1  # + the CLS token
    h, inter = v.hidden_size, v.intermediate_size
    layer = 2 * n * (4 * h * h + 2 * h * inter) + 2 * 2 * n * n * h  # qkvo + mlp, QK^T + AV
    embed = 2 * patches * 3 * patch * patch * h
    tokens = patches * config.downsample_ratio**2  # after the pixel shuffle
    wide, d = h / config.downsample_ratio**2, config.text_config.hidden_size
    projector = 2 * tokens * (wide * d + d * d)
    return embed + v.num_hidden_layers * layer, projector


def text_flops_per_sequence(config, seq_len: int, logit_positions: int) -> tuple[float, float]:
    """(decoder, lm_head) FLOPs of one sequence of `seq_len` tokens."""
    t = config.text_config
    h, inter = t.hidden_size, t.intermediate_size
    head_dim = getattr(t, "head_dim", None) or h // t.num_attention_heads
    q, kv = t.num_attention_heads * head_dim, t.num_key_value_heads * head_dim
    s = seq_len
    linear = 2 * s * (h * (q + 2 * kv) + q * h + 3 * h * inter)
    scores = 2 * 2 * s * s * q / 2  # causal: half of QK^T and AV
    return t.num_hidden_layers * (linear + scores), 2 * logit_positions * h * t.vocab_size


def forward_flops(
    config, n_sequences: int, seq_len: int, tiles_per_sequence: int, logit_positions: int
) -> ForwardFlops:
    """FLOPs of one forward over `n_sequences` sequences, each with its own image tiles."""
    vision, projector = vision_flops_per_tile(config)
    text, head = text_flops_per_sequence(config, seq_len, logit_positions)
    tiles = n_sequences * tiles_per_sequence
    return ForwardFlops(tiles * vision, tiles * projector, n_sequences * text, n_sequences * head)


def update_mfu(
    forward: ForwardFlops, seconds: float, peak_flops_per_s: float | None
) -> float | None:
    """Model FLOPs utilisation of a forward + backward taking `seconds`; None without a peak."""
    if not peak_flops_per_s or seconds <= 0:
        return None
    return forward.update / seconds / peak_flops_per_s
