"""Drawing of the synthetic screening images: a product on white, and the product in a scene.

What a picture shows is a pure function of JSON-able metadata: a product dict, a scene dict and a
list of defect dicts (`hcm.data.synthetic.scene` samples them). So a test can render a
candidate clean and with one defect and check the difference pixel by pixel. Drawing is crisp
(flat fills, no anti-aliasing) so that the wall, the floor and a shadow have exact colours; a
tilted product is the exception (rotation resamples its edges).

The scene: a wall, a floor starting at the horizon, the sun in a top corner (the light side), the
product standing on the floor at the `base` row and a cast shadow on the floor. The sun is in the
picture, so it is behind the product: the shadow falls toward the viewer (down the image) and
sideways away from the sun. Geometry is in fractions of the image side, so any size works.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

# Defect families the renderer draws, each under one of hcm.screening.DIMENSIONS.
FAMILIES: dict[str, str] = {
    "colour": "appearance_deformation",
    "shape": "appearance_deformation",
    "label": "appearance_deformation",
    "parts_missing": "appearance_deformation",
    "quantity": "appearance_deformation",
    "shadow_missing": "physical_shadow",
    "shadow_toward_light": "physical_shadow",
    "shadow_inconsistent": "physical_shadow",
    "floating": "placement_layout",
    "tilted": "placement_layout",
    "cropped": "placement_layout",
    "extra_object": "extension_rationality",
    "extra_mark": "extension_rationality",
}
SHAPES = ("bottle", "box", "jar", "tube", "blister")
CAPPED_SHAPES = ("bottle", "jar", "tube")
# width / height of one unit of each shape
BASE_ASPECT = {"bottle": 0.42, "box": 0.68, "jar": 0.8, "tube": 0.36, "blister": 0.6}
MARKS = ("circle", "cross", "triangle", "bars", "text")
EXTRA_OBJECTS = ("ball", "cube", "cone", "capsule")
EXTRA_MARKS = ("star", "badge", "sparkle")

SHADOW_DARKNESS = 0.45  # fraction of the floor's brightness a full shadow takes away
SHADOW_LENGTH = 0.6  # sideways reach of a shadow, in unit heights
SHADOW_DEPTH = 0.12  # how far a shadow comes toward the viewer, in unit heights
ORIGINAL_HEIGHT = 0.6  # unit height in the original image, fraction of the side
MAX_GROUP_WIDTH = 0.94  # products wider than this (fraction of the side) are drawn smaller
EXTRA_MARGIN = 4  # px of free floor an extra object needs beyond its size (2 each side)
UNIT_SPACING = 0.15  # gap between units, in unit widths (>= 2 px keeps them separate blobs)
WHITE = (255, 255, 255)
SUN = (255, 205, 40)
BUBBLE = (205, 208, 218)

RGB = tuple[int, int, int]
_SIN = [0.0, 0.588, 0.951, 0.951, 0.588, 0.0, -0.588, -0.951, -0.951, -0.588]  # 10 star points
_COS = [1.0, 0.809, 0.309, -0.309, -0.809, -1.0, -0.809, -0.309, 0.309, 0.809]
_RAYS = [(1.0, 0.0), (0.707, 0.707), (0.0, 1.0), (-0.707, 0.707)]  # the sun's 8 rays
_RAYS += [(-x, -y) for x, y in _RAYS]


def rgb(value: Sequence[int]) -> RGB:
    r, g, b = value
    return (int(r), int(g), int(b))


def shade(color: Sequence[int], factor: float) -> RGB:
    r, g, b = color
    return (round(r * factor), round(g * factor), round(b * factor))


def shadow_color(floor: Sequence[int], opacity: float = 1.0) -> RGB:
    """The exact colour of a shadow of the given opacity on a floor of colour `floor`."""
    return shade(floor, 1.0 - SHADOW_DARKNESS * opacity)


@dataclass
class Staged:
    """What a candidate shows once its defects are applied: the drawing's inputs."""

    product: dict[str, Any]
    reach: list[float]  # per unit, signed shadow reach: 1 = full length away from the sun
    shadow_opacity: float = 1.0
    gap: float = 0.0  # lift above the floor, fraction of the side
    angle: float = 0.0  # tilt in degrees, counter-clockwise
    crop: tuple[str, float] | None = None  # (edge, fraction of the product outside the frame)
    extra_object: dict[str, Any] | None = None
    extra_mark: dict[str, Any] | None = None


def apply_defects(product: Mapping[str, Any], defects: Sequence[Mapping[str, Any]]) -> Staged:
    """Fold a candidate's defects into the product and placement it is drawn with."""
    p = dict(product)
    families = [d["family"] for d in defects]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown defect families {unknown}; expected one of {list(FAMILIES)}")
    for d in defects:  # appearance first: the unit count decides how many shadows there are
        f, q = d["family"], d["params"]
        if f == "colour":
            p["body"] = q["body"]
        elif f == "shape":
            p["shape"], p["aspect"] = q["shape"], q["aspect"]
            if p["shape"] not in CAPPED_SHAPES:
                p["cap"] = None
        elif f == "label":
            p["mark"], p["label"] = q["mark"], q["label"]
        elif f == "parts_missing":
            p[q["part"]] = 0 if q["part"] == "stripes" else None
        elif f == "quantity":
            p["count"] = q["count"]
    st = Staged(p, reach=[1.0] * p["count"])
    for d in defects:
        f, q = d["family"], d["params"]
        if f == "shadow_missing":
            st.shadow_opacity = q["opacity"]
        elif f == "shadow_toward_light":
            st.reach = [q["reach"]] * p["count"]
        elif f == "shadow_inconsistent":
            st.reach[q["unit"]] = q["reach"]
        elif f == "floating":
            st.gap = q["gap"]
        elif f == "tilted":
            st.angle = q["angle"]
        elif f == "cropped":
            st.crop = (q["edge"], q["fraction"])
        elif f == "extra_object":
            st.extra_object = dict(q)
        elif f == "extra_mark":
            st.extra_mark = dict(q)
    return st


def unit_geometry(
    product: Mapping[str, Any], unit_h: int, max_width: float
) -> tuple[int, int, int]:
    """(unit height, unit width, spacing) in px, shrunk until the whole group fits `max_width`."""
    n, aspect = product["count"], product["aspect"]
    per_h = n * aspect + (n - 1) * UNIT_SPACING * aspect  # group width per px of unit height
    unit_h = max(4, min(unit_h, int(max_width / per_h)))
    unit_w = max(3, round(unit_h * aspect))
    return unit_h, unit_w, max(2, round(UNIT_SPACING * unit_w))


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _draw_mark(d: ImageDraw.ImageDraw, mark: str, box: tuple[int, int, int, int], color: RGB):
    x0, y0, x1, y1 = box
    w, h = x1 - x0 + 1, y1 - y0 + 1
    if mark == "circle":
        r = max(1, min(w, h) // 2 - 1)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif mark == "cross":
        t = max(1, h // 4)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        d.rectangle((x0 + w // 5, cy - t // 2, x1 - w // 5, cy - t // 2 + t - 1), fill=color)
        d.rectangle((cx - t // 2, y0 + 1, cx - t // 2 + t - 1, y1 - 1), fill=color)
    elif mark == "triangle":
        d.polygon(
            [((x0 + x1) // 2, y0 + 1), (x1 - w // 5, y1 - 1), (x0 + w // 5, y1 - 1)], fill=color
        )
    elif mark == "bars":
        t = max(1, w // 9)
        for k in (1, 4, 7):
            d.rectangle((x0 + k * t, y0 + 1, x0 + k * t + t - 1, y1 - 1), fill=color)
    elif mark.startswith("text:"):
        text = mark[5:]
        font = _font(max(6, min(h, round(w / (0.7 * len(text))))))  # a glyph is ~0.6 em wide
        d.text(((x0 + x1) / 2, (y0 + y1) / 2), text, fill=color, font=font, anchor="mm")
    else:
        raise ValueError(f"unknown label mark {mark!r}")


def _draw_extra_mark(d: ImageDraw.ImageDraw, mark: Mapping[str, Any], cx: int, cy: int, r: int):
    color = rgb(mark["color"])
    if mark["kind"] == "badge":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif mark["kind"] == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rad * _SIN[k], cy - rad * _COS[k]))
        d.polygon(pts, fill=color)
    elif mark["kind"] == "sparkle":
        q = max(1, r // 3)
        d.polygon([(cx, cy - r), (cx + q, cy), (cx, cy + r), (cx - q, cy)], fill=color)
        d.polygon([(cx - r, cy), (cx, cy - q), (cx + r, cy), (cx, cy + q)], fill=color)
    else:
        raise ValueError(f"unknown extra mark {mark['kind']!r}")


def _draw_unit(d, p: Mapping[str, Any], x0: int, w: int, h: int, mark: Mapping | None) -> None:
    """One unit of the product in the box (x0, 0, x0+w-1, h-1) of the sprite."""

    def box(fx0: float, fy0: float, fx1: float, fy1: float) -> tuple[int, int, int, int]:
        return (x0 + round(fx0 * w), round(fy0 * h), x0 + round(fx1 * w) - 1, round(fy1 * h) - 1)

    body, cap, shape = rgb(p["body"]), p["cap"] and rgb(p["cap"]), p["shape"]
    label_x = (0.15, 0.85)
    if shape == "bottle":
        if cap:
            d.rectangle(box(0.3, 0, 0.7, 0.12), fill=cap)
        d.rectangle(box(0.22, 0.1, 0.78, 0.26), fill=body)
        d.rounded_rectangle(box(0, 0.22, 1, 1), radius=max(1, round(0.18 * w)), fill=body)
        region = (0.32, 0.95)
    elif shape == "box":
        d.rectangle(box(0, 0, 1, 1), fill=body)
        d.rectangle(box(0, 0, 1, 0.1), fill=shade(body, 0.8))
        region = (0.14, 0.95)
    elif shape == "jar":
        if cap:
            d.rectangle(box(0.04, 0, 0.96, 0.2), fill=cap)
        d.rounded_rectangle(box(0, 0.18, 1, 1), radius=max(1, round(0.22 * w)), fill=body)
        region = (0.3, 0.92)
    elif shape == "tube":
        d.rectangle(box(0, 0, 1, 0.07), fill=shade(body, 0.75))
        top, bot = round(0.07 * h), round(0.86 * h) - 1
        d.polygon(
            [
                (x0, top),
                (x0 + w - 1, top),
                (x0 + round(0.8 * w) - 1, bot),
                (x0 + round(0.2 * w), bot),
            ],
            fill=body,
        )
        if cap:
            d.rectangle(box(0.3, 0.86, 0.7, 1), fill=cap)
        region, label_x = (0.12, 0.78), (0.25, 0.75)
    elif shape == "blister":
        d.rectangle(box(0, 0, 1, 1), fill=body)
        for row in range(3):
            for col in range(2):
                fx, fy = 0.12 + 0.44 * col, 0.42 + 0.18 * row
                d.ellipse(box(fx, fy, fx + 0.32, fy + 0.14), fill=BUBBLE)
        region = (0.04, 0.4)
    else:
        raise ValueError(f"unknown product shape {shape!r}")
    r0, r1 = region
    t = max(1, round(0.06 * h))
    stripe_rows = {0: [], 1: [r1 * h - t], 2: [r0 * h, r1 * h - t]}[min(p["stripes"], 2)]
    for y in stripe_rows:
        lx0, lx1 = (0, 1) if shape != "tube" else label_x
        d.rectangle(
            (x0 + round(lx0 * w), round(y), x0 + round(lx1 * w) - 1, round(y) + t - 1),
            fill=rgb(p["stripe"]),
        )
    if p["label"]:
        lh = max(3, round(0.36 * (r1 - r0) * h))
        ly0 = round((r0 + r1) / 2 * h - lh / 2)
        lbox = (x0 + round(label_x[0] * w), ly0, x0 + round(label_x[1] * w) - 1, ly0 + lh - 1)
        d.rectangle(lbox, fill=rgb(p["label"]))
        _draw_mark(d, p["mark"], lbox, rgb(p["mark_color"]))
    if mark:
        r = max(1, round(mark["size"] * w / 2))
        _draw_extra_mark(d, mark, x0 + w - 1 - r, round(r0 * h) + r, r)


def draw_product(product: Mapping[str, Any], unit_h: int, unit_w: int, spacing: int, mark=None):
    """The product's units side by side on a transparent RGBA sprite (extra mark on unit 0)."""
    n = product["count"]
    img = Image.new("RGBA", (n * unit_w + (n - 1) * spacing, unit_h), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    for k in range(n):
        _draw_unit(d, product, k * (unit_w + spacing), unit_w, unit_h, mark if k == 0 else None)
    return img


def render_original(product: Mapping[str, Any], size: int) -> Image.Image:
    """The original product image: the product alone, centred on white, no shadow."""
    img = Image.new("RGB", (size, size), WHITE)
    unit_h, unit_w, sp = unit_geometry(product, round(ORIGINAL_HEIGHT * size), 0.9 * size)
    sprite = draw_product(product, unit_h, unit_w, sp)
    img.paste(sprite, ((size - sprite.width) // 2, round(0.8 * size) - unit_h), sprite)
    return img


def _shadow(d, xl: int, xr: int, base: int, reach: float, unit_h: int, away: int, color: RGB):
    """A parallelogram on the floor from the contact line [xl, xr] at row `base`, down and aside."""
    dx = round(away * reach * SHADOW_LENGTH * unit_h)
    dy = max(1, round(SHADOW_DEPTH * unit_h))
    d.polygon([(xl, base), (xr, base), (xr + dx, base + dy), (xl + dx, base + dy)], fill=color)


def _draw_extra_object(d, obj: Mapping[str, Any], cx: int, base: int, s: int, away: int, floor):
    _shadow(d, cx - s // 2, cx + s // 2, base, 1.0, s, away, shadow_color(floor))
    color = rgb(obj["color"])
    x0, y0, x1, y1 = cx - s // 2, base - s, cx - s // 2 + s - 1, base - 1
    if obj["kind"] == "ball":
        d.ellipse((x0, y0, x1, y1), fill=color)
    elif obj["kind"] == "cube":
        d.rectangle((x0, y0, x1, y1), fill=color)
        d.rectangle((x0, y0, x1, y0 + max(1, s // 5)), fill=shade(color, 0.8))
    elif obj["kind"] == "cone":
        d.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color)
    elif obj["kind"] == "capsule":
        y0 = base - max(2, s // 2)
        d.rounded_rectangle((x0, y0, x1, y1), radius=max(1, (y1 - y0) // 2), fill=color)
        d.rectangle(((x0 + x1) // 2, y0, x1 - (y1 - y0) // 2, y1), fill=shade(color, 0.6))
    else:
        raise ValueError(f"unknown extra object {obj['kind']!r}")


def render_candidate(
    product: Mapping[str, Any],
    scene: Mapping[str, Any],
    defects: Sequence[Mapping[str, Any]],
    size: int,
) -> Image.Image:
    """One generated candidate: the product (with `defects` applied) composited into its scene."""
    st = apply_defects(product, defects)
    wall, floor = rgb(scene["wall"]), rgb(scene["floor"])
    img = Image.new("RGB", (size, size), wall)
    d = ImageDraw.Draw(img)
    horizon, base = round(scene["horizon"] * size), round(scene["base"] * size)
    d.rectangle((0, horizon, size - 1, size - 1), fill=floor)
    d.line((0, horizon, size - 1, horizon), fill=shade(floor, 0.85))
    left_light = scene["light"] == "left"
    away = 1 if left_light else -1
    sx, sy, r = (0.12 if left_light else 0.88) * size, 0.12 * size, 0.06 * size
    for k in range(8):  # rays, then the disc over them
        dx, dy = _RAYS[k]
        d.line((sx + dx * r, sy + dy * r, sx + dx * 1.6 * r, sy + dy * 1.6 * r), fill=SUN)
    d.ellipse((sx - r, sy - r, sx + r, sy + r), fill=SUN)

    # the product's size and place; shrunk while an extra object lacks room beside it
    obj_size = round(st.extra_object["size"] * size) if st.extra_object else 0
    max_width, n = MAX_GROUP_WIDTH * size, st.product["count"]
    while True:
        unit_h, unit_w, sp = unit_geometry(st.product, round(scene["height"] * size), max_width)
        group_w = n * unit_w + (n - 1) * sp
        left = min(max(1, round(scene["x"] * size - group_w / 2)), size - 1 - group_w)
        if st.crop:
            edge, frac = st.crop
            out = round(frac * group_w)
            left = -out if edge == "left" else size - group_w + out
        sprite = draw_product(st.product, unit_h, unit_w, sp, st.extra_mark)
        if st.angle:
            sprite = sprite.rotate(st.angle, resample=Image.Resampling.BICUBIC, expand=True)
            sprite = sprite.crop(sprite.getchannel("A").getbbox())
        px = left + (group_w - sprite.width) // 2
        lo, hi = max(0, px), min(size, px + sprite.width)  # the product's columns in the frame
        if max(lo, size - hi) >= obj_size + EXTRA_MARGIN or unit_h <= 4:
            break
        max_width = 0.85 * min(max_width, group_w)

    if st.shadow_opacity > 0:
        color = shadow_color(floor, st.shadow_opacity)
        for k in range(n):
            xl = left + k * (unit_w + sp)
            _shadow(d, xl, xl + unit_w - 1, base, st.reach[k], unit_h, away, color)
    bottom = base - round(st.gap * size)  # the product's lowest row is bottom - 1
    img.paste(sprite, (px, bottom - sprite.height), sprite)
    if st.extra_object:
        cx = lo // 2 if lo >= size - hi else (hi + size) // 2  # the middle of the wider side
        _draw_extra_object(d, st.extra_object, cx, base, obj_size, away, floor)
    return img
