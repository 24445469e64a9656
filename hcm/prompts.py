"""The screening prompts of Appendix B (CoT and Direct), whose texts live in `conf/prompt/`.

A prompt's `user` text marks image positions with `<image>`. The paper's prompt has two: the
original image and "Generated images". With the `grid` layout (the prompt's literal reading, the
default) the second is one image, the four candidates in a labelled 2x2 grid; with the `separate`
layout it becomes four labelled images, one per candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

from hcm.screening import OPTIONS

IMAGE_PLACEHOLDER = "<image>"
LAYOUTS = ("grid", "separate")


@dataclass(frozen=True)
class Prompt:
    name: str
    user: str
    caption: str
    system: str | None = None

    def __post_init__(self) -> None:
        for field_name in ("user", "caption"):
            n = getattr(self, field_name).count(IMAGE_PLACEHOLDER)
            if n != 2:
                raise ValueError(
                    f"prompt '{self.name}' field '{field_name}' must hold exactly two "
                    f"{IMAGE_PLACEHOLDER} placeholders (original, generated), found {n}"
                )


def expand_images(text: str, layout: str) -> str:
    """Rewrite the 'generated images' placeholder for the layout: 2 images (grid) or 5."""
    if layout not in LAYOUTS:
        raise ValueError(f"image_layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "grid":
        return text
    head, sep, tail = text.rpartition(IMAGE_PLACEHOLDER)
    per_candidate = " ".join(f"{letter}: {IMAGE_PLACEHOLDER}" for letter in OPTIONS)
    return head + per_candidate + tail if sep else text


def split_on_images(text: str) -> list[str | None]:
    """Text segments with None where an image goes: "a <image> b" -> ["a ", None, " b"]."""
    parts: list[str | None] = []
    for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            parts.append(None)
        if chunk:
            parts.append(chunk)
    return parts
