"""Chunked completion log-probs equal the naive full-logits computation, values and gradients."""

import pytest
import torch
from torch import nn
from transformers import InternVLConfig, InternVLForConditionalGeneration

from hcm.logprobs import (
    completion_logprobs,
    position_ids_from_mask,
    token_logprobs,
)

VOCAB = 300
IMAGE_TOKEN = 299
IMAGE_TOKENS = 4  # 56 px / patch 14 = 4x4 patches, pixel shuffle 0.5 -> 2x2
PAD = 0


def _naive(logits, index, temperature=1.0):
    return torch.log_softmax(logits.double() / temperature, -1).gather(-1, index[..., None])[..., 0]


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_token_logprobs_values_and_grads_match_naive(chunk_size):
    torch.manual_seed(0)
    head = nn.Linear(16, 40, bias=True).double()
    hidden = torch.randn(3, 4, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 40, (3, 4))
    weights = torch.randn(3, 4, dtype=torch.float64)  # a loss that weighs tokens differently

    out = token_logprobs(hidden, head, targets, temperature=0.7, chunk_size=chunk_size)
    (out * weights).sum().backward()
    grads = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    hidden.grad = None
    head.zero_grad()
    ref = _naive(head(hidden), targets, temperature=0.7)
    (ref * weights).sum().backward()

    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for got, want in zip(grads, [hidden.grad, head.weight.grad, head.bias.grad], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_token_logprobs_keeps_no_logits_for_backward():
    # the autograd graph must hold hidden-sized tensors, not (rows, V) logits per chunk
    torch.manual_seed(0)
    rows, width, vocab = 64, 8, 512
    head = nn.Linear(width, vocab, bias=False)
    hidden = torch.randn(1, rows, width, requires_grad=True)
    targets = torch.randint(0, vocab, (1, rows))
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_logprobs(hidden, head, targets, chunk_size=16).sum().backward()
    assert max(saved) < 16 * vocab  # not even one chunk of logits was kept
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _naive(head(hidden), targets).sum()
    assert max(saved) >= rows * vocab  # the naive path does keep them (the check can fail)


def test_token_logprobs_without_grad_is_plain():
    head = nn.Linear(8, 20)
    hidden = torch.randn(2, 3, 8)
    targets = torch.randint(0, 20, (2, 3))
    with torch.no_grad():
        out = token_logprobs(hidden, head, targets, chunk_size=4)
    assert not out.requires_grad
    torch.testing.assert_close(out.double(), _naive(head(hidden), targets), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"temperature": 0.0}, "temperature"), ({"chunk_size": 0}, "chunk")]
)
def test_token_logprobs_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        token_logprobs(torch.zeros(1, 2, 4), nn.Linear(4, 5), torch.zeros(1, 2).long(), **kwargs)


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]


# ---------------------------------------------------------------- tiny InternVL


@pytest.fixture(scope="module")
def tiny_internvl():
    config = InternVLConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": [56, 56],
            "patch_size": [14, 14],
        },
        text_config={
            "model_type": "qwen2",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": VOCAB,
            "max_position_embeddings": 256,
            "tie_word_embeddings": False,
        },
        image_token_id=IMAGE_TOKEN,
        image_seq_length=IMAGE_TOKENS,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return InternVLForConditionalGeneration(config).double().eval()


def _prompt(body):
    return [5, *[IMAGE_TOKEN] * IMAGE_TOKENS, *body]


def _batch(prompts, completions):
    """Left-pad prompts and right-pad completions as the rollout does."""
    p_len = max(map(len, prompts))
    c_len = max(map(len, completions))
    ids, attn, comp = [], [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        pad_p, pad_c = p_len - len(prompt), c_len - len(completion)
        ids.append([PAD] * pad_p + prompt + completion + [PAD] * pad_c)
        attn.append([0] * pad_p + [1] * (len(prompt) + len(completion)) + [0] * pad_c)
        comp.append([1] * len(completion) + [0] * pad_c)
    return torch.tensor(ids), torch.tensor(attn), torch.tensor(comp)


def _pixels(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 56, 56, generator=generator, dtype=torch.float64)


def test_completion_logprobs_matches_full_logits(tiny_internvl):
    model = tiny_internvl
    ids, attn, comp = _batch([_prompt([10, 11, 12]), _prompt([13])], [[20, 21, 22, 23], [24, 25]])
    pixels = _pixels(2)
    completion_len = comp.shape[1]

    out = completion_logprobs(model, ids, attn, pixels, comp, temperature=0.9, chunk_size=3)
    logits = model(
        input_ids=ids,
        attention_mask=attn,
        pixel_values=pixels,
        position_ids=position_ids_from_mask(attn),
    ).logits  # (N, P+L, V)
    predicting = logits[:, -completion_len - 1 : -1]
    expected = _naive(predicting, ids[:, -completion_len:], temperature=0.9)
    assert out.shape == (2, completion_len)
    assert torch.isfinite(out).all()
    real = comp.bool()
    torch.testing.assert_close(out[real], expected[real], rtol=0, atol=1e-10)


def test_completion_logprobs_gradient_matches_full_logits(tiny_internvl):
    model = tiny_internvl
    ids, attn, comp = _batch([_prompt([10, 11]), _prompt([12, 13, 14])], [[20, 21, 22], [23]])
    pixels = _pixels(2, seed=1)
    params = [model.lm_head.weight, model.model.language_model.layers[-1].mlp.up_proj.weight]

    completion_logprobs(model, ids, attn, pixels, comp, chunk_size=2)[comp.bool()].sum().backward()
    chunked = [p.grad.clone() for p in params]
    model.zero_grad()
    logits = model(
        input_ids=ids,
        attention_mask=attn,
        pixel_values=pixels,
        position_ids=position_ids_from_mask(attn),
    ).logits
    naive = _naive(logits[:, -comp.shape[1] - 1 : -1], ids[:, -comp.shape[1] :])
    naive[comp.bool()].sum().backward()
    for got, param in zip(chunked, params, strict=True):
        torch.testing.assert_close(got, param.grad, rtol=0, atol=1e-10)
    model.zero_grad()


def test_completion_logprobs_left_padding_invariant(tiny_internvl):
    model = tiny_internvl
    prompt, completion = _prompt([10, 11, 12]), [20, 21, 22]
    pixels = _pixels(1, seed=2)
    ids, attn, comp = _batch([prompt], [completion])
    alone = completion_logprobs(model, ids, attn, pixels, comp, chunk_size=4)

    # the same sample, 5 left pads and 2 right pads (batched with longer ones), scores the same;
    # transformers' default positions 0..S-1 would miss this by ~1e-9 (RoPE round-off)
    longer = _prompt([30, 31, 32, 33, 34, 35, 36, 37])
    ids, attn, comp = _batch([prompt, longer], [completion, [40, 41, 42, 43, 44]])
    padded = completion_logprobs(model, ids, attn, _pixels(2, seed=2), comp, chunk_size=4)
    assert attn[0, :5].sum() == 0 and comp[0].tolist() == [1, 1, 1, 0, 0]
    torch.testing.assert_close(padded[0, :3], alone[0], rtol=0, atol=1e-12)


def test_completion_logprobs_shape_errors(tiny_internvl):
    ids, attn, comp = _batch([_prompt([10])], [[20, 21]])
    with pytest.raises(ValueError, match="attention_mask"):
        completion_logprobs(tiny_internvl, ids, attn[:, 1:], _pixels(1), comp)
    with pytest.raises(ValueError, match="completion_mask"):
        completion_logprobs(tiny_internvl, ids, attn, _pixels(1), torch.ones(1, ids.shape[1]))
