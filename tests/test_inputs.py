"""InternVL3 inputs: image expansion, SFT labels, padding, multi-image batches, processor parity;
and the screening chat messages (2x2 grid, separate layout)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from hcm.data.messages import make_grid, screening_messages
from hcm.data.records import ScreeningSample
from hcm.model.inputs import IGNORE_INDEX, InputBuilder, repeat_batch
from hcm.model.loading import load_image_processor

SEQ = 4  # image tokens per tile of the tiny model
CONF = Path(__file__).resolve().parents[1] / "conf" / "prompt"


@pytest.fixture(scope="module")
def image_processor(tiny_path):
    return load_image_processor(tiny_path)


@pytest.fixture(scope="module")
def builder(tok, image_processor):
    return InputBuilder(tok, image_processor, max_patches=4, image_seq_length=SEQ)


def noise(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def user(*items):
    content = [
        {"type": "image", "image": x} if isinstance(x, Image.Image) else {"type": "text", "text": x}
        for x in items
    ]
    return {"role": "user", "content": content}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def unpadded(batch, row):
    keep = batch["attention_mask"][row].bool()
    return batch["input_ids"][row][keep].tolist()


# (height, width) -> tiles with max_patches=4 on 56 px tiles, from GotOcr2's closest-aspect rule:
# square -> 1x1 (2x2 only when the image covers more than half its area), 1:2 -> 2 + thumbnail,
# 3:1 -> 3 + thumbnail, big square -> 2x2 + thumbnail.
@pytest.mark.parametrize(
    ("size", "tiles"), [((56, 56), 1), ((56, 112), 3), ((120, 40), 4), ((200, 200), 5)]
)
def test_each_image_expands_to_tiles_times_seq_length(builder, tok, size, tiles):
    batch = builder.encode([[user("x ", noise(*size), "y")]], add_generation_prompt=True)
    ids = batch["input_ids"][0].tolist()
    ctx, start, end = tok.context_image_token_id, tok.start_image_token_id, tok.end_image_token_id
    assert batch["pixel_values"].shape == (tiles, 3, 56, 56)
    assert ids.count(ctx) == tiles * SEQ
    i = ids.index(start)
    assert ids[i + 1 : i + 1 + tiles * SEQ] == [ctx] * (tiles * SEQ)
    assert ids[i + 1 + tiles * SEQ] == end
    assert tok.decode(ids[:i]) == "<|im_start|>user\nx "
    assert tok.decode(ids[i + 2 + tiles * SEQ :]) == "\ny<|im_end|>\n<|im_start|>assistant\n"


def test_labels_keep_only_the_reply_and_its_end_marker(builder, tok):
    reply = "<think>I observed <A> ok</think><answer>B</answer>"
    conv = [user(noise(56, 112), "Which?"), assistant(reply)]
    batch = builder.encode([conv], with_labels=True)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    expected = tok(reply)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    kept = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    # the reply is the last tokens but the template's trailing "\n"
    assert kept == list(range(len(ids) - 1 - len(expected), len(ids) - 1))
    assert labels[kept].tolist() == expected == ids[kept].tolist()
    assert tok.decode(ids[-1:]) == "\n"


def test_labels_cover_every_assistant_turn(builder, tok):
    conv = [user("q1"), assistant("A"), user("q2"), assistant("N")]
    batch = builder.encode([conv], with_labels=True)
    labels = batch["labels"][0]
    eos = tok.eos_token_id
    expected = [*tok("A")["input_ids"], eos, *tok("N")["input_ids"], eos]
    assert labels[labels != IGNORE_INDEX].tolist() == expected


def test_left_and_right_padding(builder, tok):
    convs = [
        [user(noise(56, 56), "short"), assistant("A")],
        [user(noise(56, 112), "a longer question"), assistant("BC")],
    ]
    right = builder.encode(convs, with_labels=True, padding_side="right")
    left = builder.encode(convs, with_labels=True, padding_side="left")
    alone = [builder.encode([c], with_labels=True) for c in convs]
    n0 = alone[0]["input_ids"].shape[1]
    T = right["input_ids"].shape[1]
    assert T == alone[1]["input_ids"].shape[1] > n0
    pad = tok.pad_token_id
    assert right["attention_mask"][0].tolist() == [1] * n0 + [0] * (T - n0)
    assert left["attention_mask"][0].tolist() == [0] * (T - n0) + [1] * n0
    assert right["input_ids"][0, n0:].eq(pad).all() and left["input_ids"][0, : T - n0].eq(pad).all()
    assert (
        right["labels"][0, n0:].eq(IGNORE_INDEX).all()
        and left["labels"][0, : T - n0].eq(IGNORE_INDEX).all()
    )
    for row in range(2):
        assert unpadded(right, row) == unpadded(left, row) == unpadded(alone[row], 0)
    assert torch.equal(right["labels"][0, :n0], alone[0]["labels"][0])
    assert torch.equal(left["labels"][0, T - n0 :], alone[0]["labels"][0])
    assert torch.equal(right["pixel_values"], left["pixel_values"])


def test_multi_image_batch_keeps_placeholder_order(builder, image_processor, tok):
    a, b, c = noise(56, 56, 1), noise(120, 40, 2), noise(56, 112, 3)
    convs = [[user("1 ", a, " 2 ", b)], [user("no image")], [user(c, "3")]]
    batch = builder.encode(convs, add_generation_prompt=True, padding_side="left")
    kwargs = {"crop_to_patches": True, "max_patches": 4, "return_tensors": "pt"}
    per_image = [image_processor([im], **kwargs)["pixel_values"] for im in (a, b, c)]
    assert [p.shape[0] for p in per_image] == [1, 4, 3]
    assert torch.equal(batch["pixel_values"], torch.cat(per_image))  # (8, 3, 56, 56)
    counts = (batch["input_ids"] == tok.context_image_token_id).sum(dim=1).tolist()
    assert counts == [5 * SEQ, 0, 3 * SEQ]


def test_text_only_batch_has_no_pixel_values(builder):
    batch = builder.encode([[user("hello")]], add_generation_prompt=True)
    assert "pixel_values" not in batch and "labels" not in batch


def test_image_token_in_text_is_refused(builder):
    with pytest.raises(ValueError, match="image tokens may not appear"):
        builder.encode([[user(noise(56, 56), "sneaky <IMG_CONTEXT>")]])


def test_repeat_batch_repeats_rows_and_their_tiles(builder, tok):
    convs = [[user(noise(56, 112, 1), "a")], [user(noise(56, 56, 2), "b")]]  # 3 tiles, 1 tile
    batch = builder.encode(convs, add_generation_prompt=True, padding_side="left")
    out = repeat_batch(batch, 2, tok.context_image_token_id, SEQ)
    ids, pv = batch["input_ids"], batch["pixel_values"]
    assert torch.equal(out["input_ids"], ids[[0, 0, 1, 1]])
    assert torch.equal(out["attention_mask"], batch["attention_mask"][[0, 0, 1, 1]])
    assert torch.equal(out["pixel_values"], pv[[0, 1, 2, 0, 1, 2, 3, 3]])


# --- parity with transformers' InternVLProcessor ---------------------------------------------


def _sample(seed=0):
    images = (noise(80, 60, seed), *(noise(48, 64, seed + k) for k in range(1, 5)))
    return ScreeningSample(id="s", images=images, answer="B")


def _parity_conversations():
    prompt = yaml.safe_load((CONF / "cot.yaml").read_text())["user"]
    return [
        screening_messages(_sample(0), prompt, "grid"),
        screening_messages(_sample(5), prompt, "separate", system="Be careful."),
        [user("plain ", noise(56, 160, 9), " end")],
    ]


def _processor(tok, image_processor, video_processor):
    from transformers import InternVLProcessor

    return InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        image_seq_length=SEQ,
        chat_template=tok.chat_template,
    )


def _assert_parity(builder, processor):
    convs = _parity_conversations()
    for add_prompt, side in [(True, "left"), (False, "right")]:
        if not add_prompt:
            convs = [[*c, assistant("<think>x</think><answer>B</answer>")] for c in convs]
        ref = processor.apply_chat_template(
            convs,
            add_generation_prompt=add_prompt,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={
                "padding": True,
                "padding_side": side,
                "max_patches": builder.max_patches,
            },
        )
        mine = builder.encode(convs, add_generation_prompt=add_prompt, padding_side=side)
        assert (
            set(ref.keys()) == set(mine.keys()) == {"input_ids", "attention_mask", "pixel_values"}
        )
        for key in mine:
            assert torch.equal(ref[key], mine[key]), key


def test_parity_with_internvl_processor_images(builder, tok, image_processor, monkeypatch):
    """The real InternVLProcessor code on images; its video processor (torchvision) stubbed out.

    transformers 5.23 checks the video processor's class against one that needs torchvision, so
    that check alone is bypassed; no video goes through it.
    """
    from transformers.processing_utils import ProcessorMixin
    from transformers.video_processing_utils import BaseVideoProcessor

    check = ProcessorMixin.check_argument_for_proper_class

    def skip_video(self, name, arg):
        return None if name == "video_processor" else check(self, name, arg)

    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", skip_video)
    _assert_parity(builder, _processor(tok, image_processor, BaseVideoProcessor()))


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None,
    reason="InternVLProcessor needs torchvision for its video processor (GPU machine only)",
)
def test_parity_with_internvl_processor_unmodified(builder, tok, image_processor):
    from transformers import InternVLVideoProcessor

    _assert_parity(builder, _processor(tok, image_processor, InternVLVideoProcessor()))


# --- chat messages -----------------------------------------------------------------------------

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def test_make_grid_layout_and_labels():
    cands = [Image.new("RGB", (80, 96), c) for c in COLORS]
    grid = make_grid(cands)
    assert grid.size == (2 * 80 + 2, 2 * 96 + 2)
    px = grid.load()
    for i, color in enumerate(COLORS):  # A B / C D, each filling its cell away from the label
        x, y = (i % 2) * 82, (i // 2) * 98
        assert px[x + 70, y + 90] == color
    assert px[80, 10] == px[10, 96] == (128, 128, 128)  # gutters
    s = 96 // 48  # glyph scale: 5x7 bitmap, one glyph pixel = s x s
    # "A" in cell (0, 0): glyph row 0 is 01110, row 3 is 11111; box border black, inside white
    assert px[(1 + 0) * s, (1 + 0) * s] == (255, 255, 255)
    assert px[(1 + 1) * s, (1 + 0) * s] == (0, 0, 0)
    assert px[(1 + 0) * s, (1 + 3) * s + 1] == (0, 0, 0)
    # "D" in cell (1, 1): glyph row 0 is 11110 -> last column white, first black
    x0, y0 = 82, 98
    black, white = (0, 0, 0), (255, 255, 255)
    assert px[x0 + (1 + 0) * s, y0 + s] == black and px[x0 + (1 + 4) * s, y0 + s] == white


def test_screening_messages_grid_layout(tok):
    sample = _sample()
    prompt = "Look.\nOriginal image: <image>\nGenerated images: <image>\n# Output"
    messages = screening_messages(sample, prompt, "grid", target="<answer>B</answer>", system="S")
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    content = messages[1]["content"]
    assert [c["type"] for c in content] == ["text", "image", "text", "image", "text"]
    assert content[1]["image"] is sample.images[0]
    assert content[3]["image"].size == (2 * 64 + 2, 2 * 48 + 2)  # the 2x2 grid of candidates
    assert messages[2]["content"][0]["text"] == "<answer>B</answer>"
    text = tok.apply_chat_template(messages[1:2], tokenize=False)
    assert text == (
        "<|im_start|>user\nLook.\nOriginal image: <IMG_CONTEXT>\n"
        "Generated images: <IMG_CONTEXT>\n# Output<|im_end|>\n"
    )


def test_screening_messages_separate_layout():
    sample = _sample()
    prompt = "Original image: <image>\nGenerated images: <image>\n# Output"
    content = screening_messages(sample, prompt, "separate")[0]["content"]
    images = [c["image"] for c in content if c["type"] == "image"]
    assert all(a is b for a, b in zip(images, sample.images, strict=True))
    texts = [c["text"] for c in content if c["type"] == "text"]
    assert texts == ["Original image: ", "Generated images: A: ", "B: ", "C: ", "D: ", "# Output"]
