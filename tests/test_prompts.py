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
