"""Fast paths keep the plain path's numbers: shared image encoding, vocabulary padding, static
cache (and compiled decode, opt-in on CPU), shared-image prefill."""

import os

import pytest
import torch

from hcm.logprobs import completion_logprobs
from hcm.model.generation import fast_path_options, generate
from hcm.model.loading import load_model
from hcm.model.tiny import build_tiny_model
from hcm.model.vision_cache import rows_by_prompt, shared_image_logprobs
from hcm.model.vocab_padding import PaddedHead, pad_lm_head, padded_size

# ----------------------------------------------------------------- shared image encoding


def test_rows_by_prompt_maps_a_minibatch_that_splits_groups():
    firsts, index = rows_by_prompt([3, 4, 5, 6, 7, 8], group_size=3)
    assert firsts == [3, 6]  # prompt 1 (rows 3-5), prompt 2 (rows 6-8)
    assert index.tolist() == [0, 0, 0, 1, 1, 1]
    firsts, index = rows_by_prompt([2, 3, 4], group_size=2)
    assert firsts == [2, 4] and index.tolist() == [0, 0, 1]


def _rollout_rows(model, G=3):
    """B=2 prompts (2 tiles, 1 tile) x G completions, left-padded prompts, right-padded
    completions; returns the plain path's per-row pixels and the per-prompt ones."""
    img, n = model.config.image_token_id, model.config.image_seq_length
    prompts = [[7, *[img] * (2 * n), 11, 12], [7, *[img] * n, 13]]
    completions = [[20, 21, 22], [23], [24, 25], [26, 27, 28], [29], [30, 31]]
    width_p, width_c = max(map(len, prompts)), max(map(len, completions))
    ids, attn, comp = [], [], []
    for row, completion in enumerate(completions):
        prompt = prompts[row // G]
        pad_p, pad_c = width_p - len(prompt), width_c - len(completion)
        ids.append([0] * pad_p + prompt + completion + [0] * pad_c)
        attn.append([0] * pad_p + [1] * (len(prompt) + len(completion)) + [0] * pad_c)
        comp.append([1] * len(completion) + [0] * pad_c)
    gen = torch.Generator().manual_seed(0)
    per_prompt = torch.randn(3, 3, 56, 56, generator=gen, dtype=torch.float64)  # tiles 2 + 1
    tiles = [2, 1]
    per_row = torch.cat([per_prompt[:2]] * G + [per_prompt[2:]] * G)  # as repeat_batch lays out
    return torch.tensor(ids), torch.tensor(attn), torch.tensor(comp), per_prompt, per_row, tiles


@pytest.fixture(scope="module")
def model64():
    return build_tiny_model(seed=1).double().train()


def test_shared_image_logprobs_equal_the_plain_path_values_and_grads(model64):
    model, G = model64, 3
    ids, attn, comp, per_prompt, per_row, tiles = _rollout_rows(model, G)
    weights = torch.randn(comp.shape, generator=torch.Generator().manual_seed(1)).double()
    params = {
        "vision": model.model.vision_tower.encoder.layer[0].attention.q_proj.weight,
        "projector": model.model.multi_modal_projector.linear_1.weight,
        "text": model.model.language_model.layers[0].mlp.up_proj.weight,
        "head": model.lm_head.weight,
    }

    plain = completion_logprobs(model, ids, attn, per_row, comp, temperature=0.8, chunk_size=4)
    (plain * weights * comp).sum().backward()
    plain_grads = {k: p.grad.clone() for k, p in params.items()}
    model.zero_grad()
    _, index = rows_by_prompt(range(ids.shape[0]), G)
    shared = shared_image_logprobs(
        model, ids, attn, per_prompt, tiles, index, comp, temperature=0.8, chunk_size=4
    )
    (shared * weights * comp).sum().backward()

    real = comp.bool()
    torch.testing.assert_close(shared[real], plain[real], rtol=0, atol=1e-10)
    for name, param in params.items():
        assert plain_grads[name].abs().sum() > 0, name  # the images do reach the loss
        torch.testing.assert_close(param.grad, plain_grads[name], rtol=1e-9, atol=1e-12)
    model.zero_grad()


def test_shared_image_logprobs_of_a_minibatch_and_a_wrong_mapping(model64):
    model, G = model64, 3
    ids, attn, comp, per_prompt, per_row, tiles = _rollout_rows(model, G)
    rows = [2, 3, 4]  # the last row of prompt 0, two rows of prompt 1
    with torch.no_grad():
        pixels = per_row[[4, 5, 6, 7]]  # row 2: tiles 4-5, rows 3 and 4: tiles 6 and 7
        plain = completion_logprobs(model, ids[rows], attn[rows], pixels, comp[rows])
        firsts, index = rows_by_prompt(rows, G)
        assert firsts == [2, 3]
        shared = shared_image_logprobs(
            model, ids[rows], attn[rows], per_prompt, tiles, index, comp[rows]
        )
        real = comp[rows].bool()
        torch.testing.assert_close(shared[real], plain[real], rtol=0, atol=1e-10)
        with pytest.raises(ValueError, match="image tokens"):  # every row given prompt 0
            wrong = torch.zeros_like(index)
            shared_image_logprobs(
                model, ids[rows], attn[rows], per_prompt, tiles, wrong, comp[rows]
            )


# ----------------------------------------------------------------- vocabulary padding


def test_padded_size():
    assert padded_size(151674, 128) == 151680
    assert padded_size(1024, 128) == 1024
    assert padded_size(5, 1) == 5
    with pytest.raises(ValueError):
        padded_size(5, 0)


def test_padded_head_changes_no_logit_log_prob_or_gradient(model64):
    model, G = model64, 3
    ids, attn, comp, _, per_row, _ = _rollout_rows(model, G)
    vocab = model.lm_head.weight.shape[0]
    plain = completion_logprobs(model, ids, attn, per_row, comp)
    plain.sum().backward()
    plain_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()

    head = PaddedHead(model.lm_head, multiple=100)
    assert head.weight.shape[0] == padded_size(vocab, 100) > vocab and head.out_features == vocab
    with torch.no_grad():
        head.weight[vocab:] = 1e3  # garbage rows: they would dominate any softmax they entered
    saved, model.lm_head = model.lm_head, head
    try:
        padded = completion_logprobs(model, ids, attn, per_row, comp)
        padded.sum().backward()
        torch.testing.assert_close(padded, plain, rtol=0, atol=1e-12)
        torch.testing.assert_close(head.weight.grad[:vocab], plain_grad, rtol=0, atol=1e-12)
        assert head.weight.grad[vocab:].abs().sum() == 0
        hidden = torch.randn(2, 5, head.in_features, dtype=torch.float64)
        torch.testing.assert_close(head(hidden), saved(hidden), rtol=0, atol=1e-12)
    finally:
        model.lm_head = saved
        model.zero_grad()


def test_padded_model_state_dict_is_unpadded_and_loads_back(tiny_path, tmp_path):
    plain = load_model(tiny_path)
    padded = load_model(tiny_path, pad_vocab_to_multiple_of=128)
    vocab = plain.lm_head.weight.shape[0]
    assert vocab % 128 != 0, "the tiny vocabulary must need padding for this test"
    assert isinstance(padded.lm_head, PaddedHead)
    assert padded.lm_head.weight.shape[0] == padded_size(vocab, 128)
    state = padded.state_dict()
    assert state["lm_head.weight"].shape[0] == vocab
    torch.testing.assert_close(state["lm_head.weight"], plain.lm_head.weight, rtol=0, atol=0)

    padded.save_pretrained(tmp_path / "m")  # an export loads into a plain model
    reloaded = load_model(tmp_path / "m")
    torch.testing.assert_close(reloaded.lm_head.weight, plain.lm_head.weight, rtol=0, atol=0)
    other = load_model(tiny_path, pad_vocab_to_multiple_of=128)  # and a checkpoint back
    with torch.no_grad():
        other.lm_head.weight.zero_()
    other.load_state_dict(state)
    torch.testing.assert_close(other.lm_head.weight, padded.lm_head.weight, rtol=0, atol=0)
    assert pad_lm_head(padded, 128) is padded and padded.lm_head.weight.shape[0] % 128 == 0


def test_padded_rows_are_never_sampled(tiny_path, tok, prompts):
    model = load_model(tiny_path)
    vocab, width = model.lm_head.weight.shape
    head = torch.nn.Linear(width, vocab, bias=True)  # a bias makes padded logits win anywhere
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
    model.lm_head = head
    pad_lm_head(model, 128)
    with torch.no_grad():
        model.lm_head.bias[vocab:] = 100.0  # if the padded logits were seen, they'd be sampled
    torch.manual_seed(0)
    out = generate(
        model,
        prompts,
        tok,
        max_new_tokens=16,
        do_sample=True,
        top_k=0,
        group_size=4,
        stop_strings=(),
    )
    assert out.completion_ids.shape[0] == 8
    assert int(out.completion_ids.max()) < vocab


# ----------------------------------------------------------------- static cache, shared prefill


@pytest.mark.parametrize(
    "options",
    [{"cache": "static"}, {"cache": "static", "max_cache_len": 200}, {"share_images": True}],
)
def test_fast_generation_equals_the_dynamic_path_greedy(tiny_path, tok, prompts, options):
    model = load_model(tiny_path)
    kwargs = {"max_new_tokens": 10, "do_sample": False, "group_size": 2}
    plain = generate(model, prompts, tok, stop_strings=(), **kwargs)
    fast = generate(model, prompts, tok, stop_strings=(), **options, **kwargs)
    assert plain.completion_ids.shape == (4, 10)
    assert torch.equal(fast.completion_ids, plain.completion_ids)
    assert fast.prompt_length == plain.prompt_length
    # the two prompts' completions differ: the rows did get their own images and text
    assert not torch.equal(plain.completion_ids[0], plain.completion_ids[2])


def test_shared_prefill_samples_like_the_plain_path(tiny_path, tok, prompts):
    # same logits (up to round-off) and the same RNG stream: the same draws
    model = load_model(tiny_path)
    kwargs = {"max_new_tokens": 8, "do_sample": True, "top_k": 3, "top_p": 0.8}
    torch.manual_seed(3)
    plain = generate(model, prompts, tok, group_size=3, **kwargs)
    torch.manual_seed(3)
    shared = generate(model, prompts, tok, group_size=3, share_images=True, **kwargs)
    assert torch.equal(shared.completion_ids, plain.completion_ids)
    assert shared.texts == plain.texts


def test_fast_path_options_are_off_by_default_and_checked():
    assert fast_path_options() == {"disable_compile": True}
    assert fast_path_options("static", 512) == {
        "cache_implementation": "static",
        "disable_compile": True,
        "max_cache_len": 512,
    }
    assert fast_path_options("static", compile=True)["disable_compile"] is False
    with pytest.raises(ValueError, match="cache"):
        fast_path_options("paged")
    with pytest.raises(ValueError, match="static"):
        fast_path_options("dynamic", compile=True)


@pytest.mark.slow
@pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("HCM_TEST_COMPILE")),
    reason="torch.compile of the decode step takes minutes on CPU: set HCM_TEST_COMPILE=1",
)
def test_compiled_decode_equals_the_dynamic_path_greedy(tiny_path, tok, prompts):
    model = load_model(tiny_path)
    kwargs = {"max_new_tokens": 10, "do_sample": False, "group_size": 2}
    plain = generate(model, prompts, tok, stop_strings=(), **kwargs)
    fast = generate(
        model,
        prompts,
        tok,
        stop_strings=(),
        cache="static",
        max_cache_len=128,
        compile=True,
        **kwargs,
    )
    assert torch.equal(fast.completion_ids, plain.completion_ids)


def test_stop_criteria_are_built_once_per_tokenizer_and_strings(tok):
    from hcm.model.generation import stop_criteria

    first = stop_criteria(tok, ("</answer>",))[0]
    assert stop_criteria(tok, ["</answer>"])[0] is first  # reused, not rebuilt per call
    assert stop_criteria(tok, ("</think>",))[0] is not first
    assert first.stop_strings == ("</answer>",)
    assert len(stop_criteria(tok, ())) == 0
