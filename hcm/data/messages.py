"""The screening prompt as chat messages: images in place, the candidates gridded or separate.

With the `grid` layout the four candidates are one image, a labelled 2x2 grid (A B / C D); with
`separate`, four images each tagged with its letter in the text (see `hcm.prompts`).
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

from hcm.data.records import ScreeningSample
from hcm.model.chat import chat_messages
from hcm.prompts import expand_images
from hcm.screening import OPTIONS

# 5x7 bitmap glyphs: crisp at any integer scale, identical on every platform (a TrueType font's
# rendering depends on the FreeType build, and would change the model's pixels).
_GLYPHS = {
    "A": ("01110", "10001", "10001", "11111", "10001", "10001", "10001"),
    "B": ("11110", "10001", "10001", "11110", "10001", "10001", "11110"),
    "C": ("01110", "10001", "10000", "10000", "10000", "10001", "01110"),
    "D": ("11110", "10001", "10001", "10001", "10001", "10001", "11110"),
}
GUTTER_COLOR = (128, 128, 128)


def _draw_label(draw: ImageDraw.ImageDraw, x: int, y: int, letter: str, scale: int) -> None:
    """A black letter on a white box with a black border, its top-left corner at (x, y)."""
    glyph = _GLYPHS.get(letter)
    if glyph is None:
        raise ValueError(f"no glyph for label {letter!r}; available: {sorted(_GLYPHS)}")
    w, h = (len(glyph[0]) + 2) * scale, (len(glyph) + 2) * scale
    draw.rectangle([x, y, x + w - 1, y + h - 1], fill="white", outline="black")
    for r, row in enumerate(glyph):
        for c, bit in enumerate(row):
            if bit == "1":
                px, py = x + (c + 1) * scale, y + (r + 1) * scale
                draw.rectangle([px, py, px + scale - 1, py + scale - 1], fill="black")


def make_grid(
    candidates: Sequence[Image.Image], labels: Sequence[str] = OPTIONS, gutter: int = 2
) -> Image.Image:
    """The candidates in a 2x2 grid (A B / C D), each labelled in its top-left corner.

    Cells take the first candidate's size; the letter is 7/48 of the cell height or more (at
    least 7 px) so it stays legible after the image processor downsizes the grid.
    """
    if len(candidates) != 4 or len(labels) != 4:
        raise ValueError(f"need 4 candidates and 4 labels, got {len(candidates)}, {len(labels)}")
    w, h = candidates[0].size
    grid = Image.new("RGB", (2 * w + gutter, 2 * h + gutter), GUTTER_COLOR)
    draw = ImageDraw.Draw(grid)
    scale = max(1, h // 48)
    for i, (image, letter) in enumerate(zip(candidates, labels, strict=True)):
        x, y = (i % 2) * (w + gutter), (i // 2) * (h + gutter)
        grid.paste(image.convert("RGB").resize((w, h)), (x, y))
        _draw_label(draw, x, y, letter, scale)
    return grid


def screening_messages(
    sample: ScreeningSample,
    prompt_text: str,
    layout: str,
    target: str | None = None,
    system: str | None = None,
) -> list[dict]:
    """The chat messages for one sample: [system], user (text and images), [assistant target].

    The chat template writes a newline after each image, which stands for the separator (a
    newline or a space) that opened the text after it: the rendered prompt then reads line for
    line as Appendix B, and the separate layout's "A: <image> B: ..." one candidate per line.
    """
    original, *candidates = sample.images
    text = expand_images(prompt_text, layout)
    images = [original, make_grid(candidates)] if layout == "grid" else [original, *candidates]
    return chat_messages(text, images, target, system)
