"""The `lm_head` GEMM on a vocabulary padded to a multiple of N, with the real vocabulary's output.

InternVL3's 151,674-row `lm_head` is a GEMM shape that tensor cores run at a third of their
speed; padded to 151,680 (a multiple of 128) it runs 3x faster (docs/performance.md).
`PaddedHead` holds the padded weight and returns only the first `vocab_size` logits, so nothing
downstream changes: the padded rows are never sampled, never enter a softmax, and get zero
gradient. Its state dict holds the unpadded weight, so checkpoints and exported models load into
a plain model, and a padded model loads them back.
"""

from __future__ import annotations

import torch
from torch import nn


def padded_size(size: int, multiple: int) -> int:
    """`size` rounded up to a multiple of `multiple` (>= 1).

    >>> padded_size(151674, 128)
    151680
    """
    if multiple < 1:
        raise ValueError(f"the vocabulary padding multiple must be >= 1, got {multiple}")
    return -(-size // multiple) * multiple


class PaddedHead(nn.Module):
    """A bias-free or biased linear head over `padded_size(V, multiple)` rows that outputs V."""

    def __init__(self, head: nn.Linear, multiple: int):
        super().__init__()
        vocab, width = head.weight.shape
        self.vocab_size = vocab
        rows = padded_size(vocab, multiple)
        weight = head.weight.detach().new_zeros(rows, width)
        weight[:vocab] = head.weight.detach()
        self.weight = nn.Parameter(weight, requires_grad=head.weight.requires_grad)
        self.bias = None
        if head.bias is not None:
            bias = head.bias.detach().new_zeros(rows)
            bias[:vocab] = head.bias.detach()
            self.bias = nn.Parameter(bias, requires_grad=head.bias.requires_grad)
        self._register_state_dict_hook(_unpad_state)
        self._register_load_state_dict_pre_hook(self._pad_state)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # the GEMM on the padded rows, then a view of the real ones: (..., padded) -> (..., V)
        return nn.functional.linear(hidden, self.weight, self.bias)[..., : self.vocab_size]

    def _pad_state(self, state: dict, prefix: str, *args) -> None:
        for name in ("weight", "bias"):
            key, param = prefix + name, getattr(self, name)
            if param is not None and key in state and state[key].shape[0] == self.vocab_size:
                value = state[key]
                state[key] = torch.cat(
                    [value, value.new_zeros(param.shape[0] - self.vocab_size, *value.shape[1:])]
                )


def _unpad_state(module: PaddedHead, state: dict, prefix: str, local_metadata) -> None:
    for name in ("weight", "bias"):
        key = prefix + name
        if key in state:
            state[key] = state[key][: module.vocab_size]


def pad_lm_head(model: nn.Module, multiple: int) -> nn.Module:
    """Replace `model.lm_head` by a `PaddedHead` (in place; returns the model).

    A no-op when the vocabulary already is a multiple. Needs an untied head (InternVL3's
    checkpoints are untied): a tied one shares its weight with the input embeddings.
    """
    head = model.lm_head
    vocab = head.weight.shape[0]
    if isinstance(head, PaddedHead) or padded_size(vocab, multiple) == vocab:
        return model
    if head.weight is model.get_input_embeddings().weight:
        raise ValueError("vocabulary padding needs an untied lm_head (tie_word_embeddings=False)")
    model.lm_head = PaddedHead(head, multiple)
    return model
