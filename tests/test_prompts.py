"""The Appendix-B prompts from conf/ and their image placeholders."""

from pathlib import Path

import pytest
import yaml

from hcm.prompts import Prompt, expand_images, split_on_images

CONF = Path(__file__).resolve().parents[1] / "conf" / "prompt"


@pytest.mark.parametrize("name", ["cot", "direct"])
def test_config_prompts_are_valid(name):
    prompt = Prompt(**yaml.safe_load((CONF / f"{name}.yaml").read_text()))
    assert prompt.name == name
    assert ("<think>" in prompt.user) is (name == "cot")
    assert prompt.user.rstrip().endswith("# Output")


def test_expand_images_per_layout():
    text = "Original image: <image>\nGenerated images: <image>\nEnd"
    assert expand_images(text, "grid") == text
    sep = expand_images(text, "separate")
    letters = "A: <image> B: <image> C: <image> D: <image>"
    assert sep == f"Original image: <image>\nGenerated images: {letters}\nEnd"
    assert split_on_images(sep).count(None) == 5
    with pytest.raises(ValueError, match="image_layout"):
        expand_images(text, "mosaic")


def test_split_on_images():
    assert split_on_images("a <image> b<image>") == ["a ", None, " b", None]


def test_prompt_requires_two_images():
    with pytest.raises(ValueError, match="exactly two"):
        Prompt(name="x", user="no images", caption="<image><image>")


SWIFT_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
    "多模态大语言模型。"
)


def test_ms_swift_template_choices_are_one_override_away(compose_cfg):
    """ms-swift's internvl2_5 template: its default system prompt and up to 12 tiles per image
    (conf/prompt/*.yaml, conf/model/*.yaml); ours: no system prompt, 4 tiles."""
    import numpy as np
    from hydra.utils import instantiate
    from PIL import Image

    from hcm.model.inputs import tiles_per_row

    ours = compose_cfg("train", ["experiment=tiny_grpo"])
    swift = compose_cfg(
        "train", ["experiment=tiny_grpo", f'prompt.system="{SWIFT_SYSTEM}"', "model.max_patches=12"]
    )
    assert (ours.prompt.system, ours.model.max_patches) == (None, 4)
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), np.uint8))
    seen = {}
    for name, cfg in (("ours", ours), ("swift", swift)):
        dm = instantiate(cfg.data, _convert_="all")
        dm.prepare_data()
        dm.setup("validate")
        builder, tok = dm.prompt_collate.builder, dm.prompt_collate.builder.tokenizer
        prompt = tok.decode(dm.prompt_collate([dm.val_dataset[0]])["inputs"]["input_ids"][0])
        conv = [[{"role": "user", "content": [{"type": "image", "image": big}]}]]
        ids = builder.encode(conv)["input_ids"]
        image_token = tok.convert_tokens_to_ids(tok.context_image_token)
        seen[name] = (
            SWIFT_SYSTEM in prompt,
            tiles_per_row(ids, image_token, builder.image_seq_length),
        )
    assert seen == {"ours": (False, [5]), "swift": (True, [10])}  # 2x2 + thumbnail; 3x3 + one
