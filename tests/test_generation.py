"""Sampling from the tiny InternVL3: banned tokens, stop strings, completion order and masks."""

import json
import shutil

import pytest
import torch
from torch import nn

from hcm.model.generation import banned_token_ids, generate, ran_out, truncate_completions
from hcm.model.loading import load_model


@pytest.fixture(scope="module")
def model(tiny_path):
    return load_model(tiny_path)


def biased(tiny_path, token_ids, bias=30.0):
    """The tiny model with `bias` added to the logits of `token_ids` at every position."""
    model = load_model(tiny_path)
    head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[token_ids] = bias
    model.lm_head = head
    return model


def test_banned_ids_are_image_chat_and_pad_tokens_but_not_eos(tok):
    names = ["<|endoftext|>", "<|im_start|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    assert banned_token_ids(tok) == sorted(tok.convert_tokens_to_ids(names))
    assert tok.convert_tokens_to_ids("<|im_end|>") not in banned_token_ids(tok)


def test_sampling_never_emits_banned_ids(tiny_path, tok, prompts):
    banned = banned_token_ids(tok)
    model = biased(tiny_path, banned)
    with torch.no_grad():
        last = model(**prompts).logits[:, -1]  # (B, V)
    assert set(last.argmax(-1).tolist()) <= set(banned)  # unmasked, the model would emit them
    torch.manual_seed(0)
    out = generate(
        model,
        prompts,
        tok,
        max_new_tokens=48,
        do_sample=True,
        group_size=4,
        stop_strings=(),
    )
    assert out.completion_ids.shape == (8, 48)
    generated = out.completion_ids[out.completion_mask.bool()]
    assert generated.numel() > 8 * 10
    assert not torch.isin(generated, torch.tensor(banned)).any()


def test_ban_applies_before_top_k(tiny_path, tok, prompts):
    """With top_k=1 the pick is the best allowed token; banning after top-k would leave none."""
    banned = banned_token_ids(tok)
    model = biased(tiny_path, banned)
    with torch.no_grad():
        logits = model(**prompts).logits[:, -1]  # (B, V)
    logits[:, banned] = float("-inf")
    out = generate(model, prompts, tok, max_new_tokens=1, do_sample=True, top_k=1, stop_strings=())
    assert out.completion_ids[:, 0].tolist() == logits.argmax(-1).tolist()


def test_eos_stays_allowed_and_ends_the_completion(tiny_path, tok, prompts):
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    model = biased(tiny_path, [eos])
    out = generate(model, prompts, tok, max_new_tokens=10, do_sample=True, group_size=2)
    assert out.completion_ids.tolist() == [[eos]] * 4
    assert out.completion_mask.tolist() == [[1]] * 4
    assert out.texts == [""] * 4
    assert out.prompt_length == prompts["input_ids"].shape[1]


def test_truncate_cuts_after_the_stop_string_token(tok):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    answer = tok("<think>x</think><answer>B</answer>")["input_ids"]
    tail = tok(" more words")["input_ids"]
    ids = torch.tensor([answer + tail + [eos, pad]])
    cut, mask, texts = truncate_completions(ids, tok, ("</answer>",))
    n = len(answer)
    assert mask.tolist() == [[1] * n + [0] * (len(tail) + 2)]
    assert cut[0, n:].eq(pad).all() and cut[0, :n].tolist() == answer
    assert texts == ["<think>x</think><answer>B</answer>"]


def test_truncate_keeps_a_token_that_straddles_the_stop_string(tok):
    ids = tok("<answer>B</answer><think>")["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert "><" in pieces  # "</answer>" ends inside this token
    n = pieces.index("><") + 1
    _, mask, texts = truncate_completions(torch.tensor([ids]), tok, ("</answer>",))
    assert mask[0].tolist() == [1] * n + [0] * (len(ids) - n)
    assert texts == ["<answer>B</answer><"]


def test_truncate_at_eos_first_then_padding_then_full_length(tok):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    a = tok("A")["input_ids"]
    late_stop = a + [eos] + tok("</answer>")["input_ids"]
    padded = [*a, pad]
    no_stop = tok("A B C D N A B C D N")["input_ids"]
    width = len(no_stop)
    assert width > len(late_stop)
    rows = [r + [pad] * (width - len(r)) for r in (late_stop, padded, no_stop)]
    cut, mask, texts = truncate_completions(torch.tensor(rows), tok, ("</answer>",))
    assert mask.sum(1).tolist() == [len(a) + 1, len(a), width]  # eos kept; padding is not
    assert cut[0, len(a)].item() == eos and cut[0, len(a) + 1 :].eq(pad).all()
    assert texts == ["A", "A", "A B C D N A B C D N"]


def test_generate_stops_at_stop_string_and_masks_the_tail(model, tok, prompts):
    torch.manual_seed(1)
    out = generate(
        model,
        prompts,
        tok,
        max_new_tokens=40,
        do_sample=True,
        group_size=2,
        stop_strings=("e",),
    )
    lengths = out.completion_mask.sum(1).tolist()
    for row, n in enumerate(lengths):
        ids = out.completion_ids[row]
        assert out.completion_mask[row].tolist() == [1] * n + [0] * (ids.shape[0] - n)
        assert ids[n:].eq(tok.pad_token_id).all()
        assert "e" in out.texts[row] == tok.decode(ids[:n])  # no special tokens were generated
        assert "e" not in tok.decode(ids[: n - 1])
    assert max(lengths) == out.completion_ids.shape[1] < 40  # generate stopped too


def test_group_size_order_is_prompt_major(model, tok, prompts):
    greedy = generate(model, prompts, tok, max_new_tokens=8, do_sample=False, stop_strings=())
    assert greedy.completion_ids[0].tolist() != greedy.completion_ids[1].tolist()
    g = 3  # top_k=1 sampling is greedy, so row i must repeat prompt i // g's greedy completion
    out = generate(
        model,
        prompts,
        tok,
        max_new_tokens=8,
        do_sample=True,
        top_k=1,
        group_size=g,
        stop_strings=(),
    )
    expected = greedy.completion_ids.repeat_interleave(g, dim=0)
    assert torch.equal(out.completion_ids, expected)
    assert out.texts == [t for t in greedy.texts for _ in range(g)]


def test_generate_restores_train_mode_and_needs_left_padding(model, tok, prompts):
    model.train()
    try:
        generate(model, prompts, tok, max_new_tokens=2, do_sample=False)
        assert model.training
    finally:
        model.eval()
    right = dict(prompts)
    right["attention_mask"] = prompts["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, right, tok, max_new_tokens=2, do_sample=False)


def test_the_checkpoints_generation_config_changes_nothing(
    tiny_path, model, tok, prompts, tmp_path
):
    # transformers fills every GenerationConfig field we leave unset from the checkpoint's
    # generation_config.json; a hub checkpoint's penalties or sampling settings must not reach
    # rollouts or evaluation (the log-probs would not follow them)
    hostile = tmp_path / "hostile"
    shutil.copytree(tiny_path, hostile)
    settings = {"repetition_penalty": 1.5, "temperature": 0.1, "top_k": 1, "max_length": 5}
    settings["no_repeat_ngram_size"] = 1
    (hostile / "generation_config.json").write_text(json.dumps(settings))
    other = load_model(hostile)
    assert other.generation_config.repetition_penalty == 1.5
    rollout = {"do_sample": True, "temperature": 1.0, "top_k": 3, "top_p": 0.8}
    for kwargs in ({"do_sample": False}, {**rollout, "group_size": 2}):  # eval, GRPO
        outs = []
        for m in (model, other):
            torch.manual_seed(0)
            outs.append(generate(m, prompts, tok, max_new_tokens=24, stop_strings=(), **kwargs))
        assert outs[0].completion_ids.shape[1] == 24  # max_length 5 did not cut them
        assert torch.equal(outs[0].completion_ids, outs[1].completion_ids), kwargs


def test_ran_out_is_a_full_length_completion_without_eos_or_stop(tok):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    a = tok.encode("A", add_special_tokens=False)
    stop = tok.encode("</answer>", add_special_tokens=False)
    assert len(a) == 1 and len(stop) <= 3
    rows = [
        a * 4,  # ran out
        a * 3 + [eos],  # ended by eos at the limit
        a * (4 - len(stop)) + stop,  # the stop string ends at the limit
        a * 2 + [eos, pad],  # ended early
    ]
    cut, mask, texts = truncate_completions(torch.tensor(rows), tok, ("</answer>",))
    out = ran_out(cut, mask, texts, eos, max_new_tokens=4, stop_strings=("</answer>",))
    assert out.tolist() == [True, False, False, False]
