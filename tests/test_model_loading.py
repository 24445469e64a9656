"""Loading InternVL3 through the hub code path, the tiny model factory, freezing components."""

import json
import threading

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image

from hcm.model.inputs import InputBuilder
from hcm.model.loading import (
    ModelNotFoundError,
    freeze,
    load_image_processor,
    load_model,
    load_tokenizer,
    resolve_attn_implementation,
    resolve_dtype,
    resolve_name_or_path,
)
from hcm.model.tiny import (
    MARKER,
    TinySizes,
    build_tiny_model,
    build_tiny_tokenizer,
    ensure_tiny_model,
)


@pytest.fixture(scope="module")
def model(tiny_path):
    return load_model(tiny_path)


def _batch(tiny_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (60, 130, 3), dtype=np.uint8))
    conv = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "A?"}],
        }
    ]
    builder = InputBuilder(
        load_tokenizer(tiny_path),
        load_image_processor(tiny_path),
        max_patches=4,
        image_seq_length=4,
    )
    return builder.encode([conv], add_generation_prompt=True)


def test_saved_tiny_model_reloads_with_identical_logits(tiny_path, model):
    batch = _batch(tiny_path)
    assert batch["pixel_values"].shape[0] == 3  # 2 tiles + thumbnail: the vision path runs
    in_memory = build_tiny_model()
    with torch.no_grad():
        expected = in_memory(**batch).logits
        got = model(**batch).logits
    assert torch.equal(got, expected)
    assert got.dtype == torch.float32  # "auto" on CPU


def test_real_checkpoint_settings_survive_reload(model):
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)
    assert model.config.vision_config.attention_bias is True
    assert model.model.vision_tower.encoder.layer[0].attention.q_proj.bias is not None
    tokenizer = build_tiny_tokenizer()
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.config.image_seq_length == TinySizes().image_seq_length == 4
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_tiny_build_is_deterministic_and_seeded():
    a, b, c = build_tiny_model(seed=0), build_tiny_model(seed=0), build_tiny_model(seed=1)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert (
        build_tiny_tokenizer().backend_tokenizer.to_str()
        == build_tiny_tokenizer().backend_tokenizer.to_str()
    )


def test_tokenizer_round_trips_any_text_and_carries_internvl_tokens(tiny_path):
    tok = load_tokenizer(tiny_path)
    for text in ["<think>I observed <A> ok</think><answer>AC</answer>", "héllo 世界 🎉\x00\t\n"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    names = ("start_image_token", "end_image_token", "context_image_token", "video_token")
    assert [getattr(tok, n) for n in names] == ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    # answer tags are ordinary text (kept by skip_special_tokens), chat markers are special
    ids = tok("<|im_start|>assistant\n<answer>B</answer><|im_end|>")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<answer>B</answer>"
    assert len(tok("<IMG_CONTEXT><img></img><|im_start|>")["input_ids"]) == 4
    assert 300 <= len(tok) <= 2048


def test_chat_template_renders_like_internvl3_hf():
    tok = build_tiny_tokenizer()
    messages = [
        {"role": "system", "content": "S"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "a "},
                {"type": "image"},
                {"type": "text", "text": "b"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "B"}]},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n"
        "<|im_start|>user\na <IMG_CONTEXT>\nb<|im_end|>\n"
        "<|im_start|>assistant\nB<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("b<|im_end|>\n<|im_start|>assistant\n")


def test_freeze_counts_and_flags(model):
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    lm = sum(p.numel() for p in model.model.language_model.parameters())
    head = model.lm_head.weight.numel()
    assert head == len(build_tiny_tokenizer()) * 64  # untied (V, hidden) lm_head
    # projector: LayerNorm(4*32) + Linear(128, 64) + Linear(64, 64), with biases
    assert projector == 2 * 128 + (128 * 64 + 64) + (64 * 64 + 64)
    total = vision + projector + lm + head
    try:
        counts = freeze(model, vision_tower=True, projector=True, language_model=False)  # SFT
        assert counts == {"trainable": lm + head, "total": total}
        assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
        assert not any(p.requires_grad for p in model.model.multi_modal_projector.parameters())
        assert model.lm_head.weight.requires_grad
        assert all(p.requires_grad for p in model.model.language_model.parameters())
        counts = freeze(model, vision_tower=False, projector=True, language_model=True)
        assert counts == {"trainable": vision, "total": total}
        assert freeze(model, False, False, False) == {"trainable": total, "total": total}  # GRPO
    finally:
        freeze(model, False, False, False)


def _checkpointed_layers(model):
    return sum(bool(getattr(m, "gradient_checkpointing", False)) for m in model.modules())


def test_gradient_checkpointing_on_request(tiny_path):
    model = load_model(tiny_path, gradient_checkpointing=True)
    assert _checkpointed_layers(model) >= 2  # the text decoder's layers at least
    assert _checkpointed_layers(load_model(tiny_path)) == 0


def test_load_model_explicit_dtype(tiny_path):
    assert load_model(tiny_path, dtype="bf16").dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("auto", torch.float32),
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),
        ("fp32", torch.float32),
    ],
)
def test_resolve_dtype_on_cpu(dtype, expected):
    assert resolve_dtype(dtype) == expected


def test_resolve_dtype_and_attn_reject_unknown():
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8")
    with pytest.raises(ValueError, match="attn_implementation"):
        resolve_attn_implementation("flash")
    assert resolve_attn_implementation("auto") == "sdpa"  # no CUDA here
    assert resolve_attn_implementation("eager") == "eager"


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a local folder and not a hub id"):
        load_model(tmp_path / "no" / "such-model")


def test_offline_uncached_hub_id_says_what_to_do(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        ModelNotFoundError, match=r"(?s)HF_HUB_OFFLINE is set.*model\.name_or_path=DIR"
    ):
        load_tokenizer("hcm-tests/no-such-model-hf")


def test_resolve_name_or_path_builds_tiny_only_when_asked(tmp_path):
    assert resolve_name_or_path("OpenGVLab/InternVL3-1B-hf", None) == "OpenGVLab/InternVL3-1B-hf"
    path = resolve_name_or_path(tmp_path / "m", {"seed": 3, "text_num_hidden_layers": 1})
    assert load_model(path).config.text_config.num_hidden_layers == 1


def test_ensure_tiny_model_concurrent_builders_agree(tmp_path):
    target = tmp_path / "shared"
    results, errors = [], []

    def build():
        try:
            results.append(ensure_tiny_model(target, seed=5))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [target] * 3
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]  # losers cleaned up their temp dirs
    assert json.loads((target / MARKER).read_text())["seed"] == 5
    reloaded = load_model(target)
    assert torch.equal(reloaded.lm_head.weight, build_tiny_model(seed=5).lm_head.weight)


def test_ensure_tiny_model_refuses_other_specs_and_partial_folders(tmp_path):
    ensure_tiny_model(tmp_path / "m", seed=0)
    with pytest.raises(FileExistsError, match="built with"):
        ensure_tiny_model(tmp_path / "m", seed=1)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="no finished tiny model"):
        ensure_tiny_model(partial)
