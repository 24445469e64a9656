"""A synthetic sample's random choices, as JSON-serialisable metadata: the product, each
candidate's scene and defects, what a weak annotator claims, and the mistakes of the answer-driven
annotator. Images, labels and texts are all
read off this metadata (`hcm.data.synthetic.sample`), so they are true to the pixels.

Every draw comes from one generator seeded by (seed, split, index): a sample is a pure function of
them, whatever the order or the number of workers that make it. The answer-driven annotator's
mistakes come from a second generator, seeded by (seed, split, index, 1), so that its error rate
changes nothing else in a sample (at rate 0 a sample is the one drawn before the knob existed).
"""

from __future__ import annotations

import colorsys
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from hcm.data.synthetic.config import GENERATOR_VERSION, SyntheticConfig
from hcm.data.synthetic.render import (
    BASE_ASPECT,
    CAPPED_SHAPES,
    EXTRA_MARKS,
    EXTRA_OBJECTS,
    FAMILIES,
    MARKS,
    SHADOW_DEPTH,
    SHAPES,
)
from hcm.screening import OPTIONS

WALLS = {"beige": (232, 220, 196), "light grey": (222, 222, 222), "pale blue": (204, 220, 236)}
WALLS |= {"cream": (245, 238, 214), "pale green": (210, 230, 208)}
FLOORS = {"grey": (150, 150, 150), "wooden": (168, 124, 84), "dark grey": (100, 100, 104)}
FLOORS |= {"tan": (196, 170, 130), "slate blue": (110, 124, 150)}
CAPS = ([240, 240, 240], [30, 30, 30], [180, 180, 190])


def _rng(seed: int, split: str, index: int, *stream: int) -> np.random.Generator:
    """The sample's generator; `stream` names another, independent one for the same sample."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index, *stream])


def _hsv(h: float, s: float, v: float) -> list[int]:
    return [round(c * 255) for c in colorsys.hsv_to_rgb(h % 1.0, s, v)]


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _sample_product(rng: np.random.Generator, cfg: SyntheticConfig) -> dict[str, Any]:
    shape = str(rng.choice(SHAPES))
    if shape in CAPPED_SHAPES:
        cap = CAPS[rng.integers(3)] if rng.random() < 0.7 else _hsv(rng.random(), 0.7, 0.7)
    else:
        cap = None
    return {
        "shape": shape,
        "aspect": round(BASE_ASPECT[shape] * _u(rng, 0.85, 1.15), 3),
        "count": 2 if rng.random() < cfg.p_two_units else 1,
        "body": _hsv(rng.random(), _u(rng, 0.55, 0.95), _u(rng, 0.5, 0.92)),
        "cap": cap,
        "stripes": int(rng.integers(0, 3)),
        "stripe": _hsv(rng.random(), _u(rng, 0.6, 0.9), _u(rng, 0.6, 0.95)),
        "label": _hsv(rng.random(), _u(rng, 0.0, 0.12), _u(rng, 0.93, 1.0)),
        "mark": _sample_mark(rng),
        "mark_color": _hsv(rng.random(), _u(rng, 0.5, 0.9), _u(rng, 0.15, 0.4)),
    }


def _sample_mark(rng: np.random.Generator, exclude: str | None = None) -> str:
    kinds = [m for m in MARKS if m != (exclude or "").split(":")[0] or m == "text"]
    kind = str(rng.choice(kinds))
    while kind == "text":
        mark = "text:" + "".join(chr(65 + int(i)) for i in rng.integers(0, 26, size=2))
        if mark != exclude:
            return mark
    return kind


def _sample_scene(rng, layout: str, product: Mapping, wall: str, floor: str) -> dict[str, Any]:
    """One candidate's scene. Layouts as in the paper's section 1: top-bottom puts the product
    in the middle of the lower half, left-right in the left or right half (then taller)."""
    side = None
    if layout == "top-bottom":
        x, height, max_width = 0.5 + _u(rng, -0.12, 0.12), _u(rng, 0.34, 0.44), 0.8
    else:
        side = str(rng.choice(["left", "right"]))
        x = (0.27 if side == "left" else 0.73) + _u(rng, -0.04, 0.04)
        height, max_width = _u(rng, 0.46, 0.58), 0.44
    n, a = product["count"], product["aspect"]
    height = min(height, max_width / (n * a * 1.15))  # the original group fits its region
    base = _u(rng, 0.8, 0.97 - SHADOW_DEPTH * height)  # the shadow stays inside the frame
    jitter = [int(j) for j in rng.integers(-6, 7, size=6)]
    return {
        "layout": layout,
        "side": side,
        "light": str(rng.choice(["left", "right"])),
        "x": round(x, 4),
        "height": round(height, 4),
        "base": round(base, 4),
        "horizon": round(_u(rng, 0.4, base - 0.1), 4),
        "wall_name": wall,
        "wall": [min(255, max(0, c + j)) for c, j in zip(WALLS[wall], jitter[:3], strict=True)],
        "floor_name": floor,
        "floor": [min(255, max(0, c + j)) for c, j in zip(FLOORS[floor], jitter[3:], strict=True)],
    }


def _applicable(family: str, product: Mapping, chosen: list[dict]) -> bool:
    families = {d["family"] for d in chosen}
    if FAMILIES[family] in {FAMILIES[f] for f in families}:
        return False  # one family per dimension
    if family == "shadow_inconsistent":
        return product["count"] >= 2 and "quantity" not in families
    return not (family == "quantity" and "shadow_inconsistent" in families)


def _pick_family(rng, cfg: SyntheticConfig, product, chosen, exclude=()) -> str | None:
    names = [
        f
        for f, w in cfg.family_weights.items()
        if w > 0 and f not in exclude and _applicable(f, product, chosen)
    ]
    if not names:
        return None
    w = np.array([cfg.family_weights[f] for f in names])
    return names[int(rng.choice(len(names), p=w / w.sum()))]


def make_defect(family: str, rng, s: float, product: Mapping, scene: Mapping) -> dict[str, Any]:
    """A defect of `family` whose visibility grows with the strength `s` in [0, 1]."""
    sign = 1 if rng.random() < 0.5 else -1
    if family == "colour":
        shift = sign * (0.06 + 0.34 * s)  # hue turn: ~22 degrees at s=0, 144 at s=1
        h, sat, v = colorsys.rgb_to_hsv(*(c / 255 for c in product["body"]))
        q = {"body": _hsv(h + shift, sat, v), "hue_shift": round(shift, 4)}
    elif family == "shape":
        if rng.random() < 0.3 + 0.5 * s:
            new = str(rng.choice([x for x in SHAPES if x != product["shape"]]))
            aspect = BASE_ASPECT[new] * _u(rng, 0.85, 1.15)
        else:
            new, aspect = product["shape"], product["aspect"] * (1 + 0.15 + 0.45 * s) ** sign
        q = {"shape": new, "aspect": round(aspect, 3)}
    elif family == "label":
        recolour = rng.random() < s
        label = _hsv(rng.random(), 0.7, 0.85) if recolour else product["label"]
        q = {"mark": _sample_mark(rng, exclude=product["mark"]), "label": label}
    elif family == "parts_missing":
        parts = [p for p in ("cap", "stripes", "label") if product[p]]
        q = {"part": str(rng.choice(parts))}
    elif family == "quantity":
        n = product["count"]
        q = {"count": n + 1 if n == 1 or (n < 3 and sign > 0) else n - 1}
    elif family == "shadow_missing":
        q = {"opacity": round((1 - s) * 0.35, 4)}  # a faint residue when subtle
    elif family in ("shadow_toward_light", "shadow_inconsistent"):
        q = {"reach": round(-(0.3 + 0.7 * s), 4)}
        if family == "shadow_inconsistent":
            q["unit"] = int(rng.integers(product["count"]))
    elif family == "floating":
        q = {"gap": round(0.04 + 0.1 * s, 4)}  # 4.5-16 px at 112 px
    elif family == "tilted":
        q = {"angle": round(sign * (8 + 32 * s), 2)}
    elif family == "cropped":
        edge = "left" if scene["x"] < 0.5 else "right"
        q = {"edge": edge, "fraction": round(0.15 + 0.4 * s, 4)}
    elif family == "extra_object":
        kind, color = str(rng.choice(EXTRA_OBJECTS)), _hsv(rng.random(), 0.75, 0.8)
        q = {"kind": kind, "color": color, "size": round(0.06 + 0.12 * s, 4)}
    elif family == "extra_mark":
        kind, color = str(rng.choice(EXTRA_MARKS)), _hsv(rng.random(), 0.85, 0.9)
        q = {"kind": kind, "color": color, "size": round(0.2 + 0.35 * s, 4)}
    else:
        raise ValueError(f"unknown defect family {family!r}")
    return {"family": family, "dimension": FAMILIES[family], "params": q}


def _sample_defects(rng, cfg: SyntheticConfig, product, scene) -> list[dict[str, Any]]:
    chosen: list[dict[str, Any]] = []
    for k in range(2):
        if k and rng.random() >= cfg.p_second_defect:
            break
        family = _pick_family(rng, cfg, product, chosen)
        if family is not None:
            chosen.append(make_defect(family, rng, cfg.defect_strength, product, scene))
    return chosen


def _sample_weak(rng, cfg: SyntheticConfig, product, candidates) -> dict[str, Any]:
    """Corrupt the truth into what a weak annotator claims: with probability 1 - accuracy one or
    two candidates' verdicts flip (a missed or a hallucinated defect), which always changes the
    answer; defects may also be named by the wrong family without changing any verdict."""
    correct = bool(rng.random() < cfg.weak_cot_accuracy)
    flips = [] if correct else list(rng.choice(len(OPTIONS), 1 if rng.random() < 0.7 else 2, False))
    claims: dict[str, list] = {}
    for k, c in enumerate(candidates):
        if k in flips:
            claims[c["letter"]] = (
                [] if c["defects"] else _sample_defects(rng, cfg, product, c["scene"])
            )
        elif c["defects"] and rng.random() < cfg.weak_misname_prob:
            exclude = [d["family"] for d in c["defects"]]
            family = _pick_family(rng, cfg, product, [], exclude=exclude)
            if family is not None:
                claims[c["letter"]] = [
                    make_defect(family, rng, cfg.defect_strength, product, c["scene"])
                ]
    return {"correct": correct, "claims": claims}


ANNOTATOR_ERRORS = ("misnamed", "extra", "missed")
ANNOTATOR_STREAM = 1  # the answer-driven annotator's own generator (`_rng`)


def _annotator_error(rng, cfg: SyntheticConfig, product, c) -> tuple[str, list[dict]] | None:
    """One mistake in what the answer-driven annotator writes of an unacceptable candidate, as
    (kind, the defects it claims), or None when the family weights leave no family to claim:
    - misnamed: one real defect named by another family ("floating" for a missing shadow);
    - extra: a defect the candidate does not have, claimed beside its real ones;
    - missed: one of two defects left out. A candidate with one defect cannot have one missed,
      so it gets a misnamed or an extra one instead (each half the time).
    The claims are never empty, so the verdict stays "unacceptable"."""
    defects = c["defects"]
    kinds = ANNOTATOR_ERRORS if len(defects) > 1 else ANNOTATOR_ERRORS[:2]
    kind = kinds[int(rng.integers(len(kinds)))]
    k = int(rng.integers(len(defects)))  # the real defect misnamed or missed
    others = defects[:k] + defects[k + 1 :]
    if kind == "missed":
        return kind, others
    chosen, exclude = (others, [defects[k]["family"]]) if kind == "misnamed" else (defects, [])
    family = _pick_family(rng, cfg, product, chosen, exclude=exclude)
    if family is None:
        return None
    claimed = make_defect(family, rng, cfg.defect_strength, product, c["scene"])
    return kind, [*chosen, claimed]


def _sample_annotator(cfg: SyntheticConfig, seed, split, index, product, candidates) -> dict:
    """What the answer-driven annotator, given the true answer, writes wrongly: each unacceptable
    candidate, with probability `answer_cot_error_rate`, gets one `_annotator_error`. Acceptable
    candidates are left alone: an annotator who knows a candidate is acceptable does not claim a
    defect on it. So every verdict, and the answer, stays the label's."""
    rng = _rng(seed, split, index, ANNOTATOR_STREAM)
    claims: dict[str, list] = {}
    errors: list[dict[str, Any]] = []
    for c in candidates:
        if not c["defects"] or rng.random() >= cfg.answer_cot_error_rate:
            continue
        error = _annotator_error(rng, cfg, product, c)
        if error is not None:
            kind, claims[c["letter"]] = error
            true, said = ([d["family"] for d in ds] for ds in (c["defects"], claims[c["letter"]]))
            errors.append({"letter": c["letter"], "kind": kind, "true": true, "claimed": said})
    return {"claims": claims, "errors": errors}


def sample_meta(cfg: SyntheticConfig, seed: int, split: str, index: int) -> dict[str, Any]:
    """All of a sample's random choices, JSON-serialisable; images and texts derive from it."""
    rng = _rng(seed, split, index)
    product = _sample_product(rng, cfg)
    layout = str(rng.choice(["top-bottom", "left-right"]))
    wall, floor = str(rng.choice(list(WALLS))), str(rng.choice(list(FLOORS)))
    candidates = []
    for letter in OPTIONS:
        scene = _sample_scene(rng, layout, product, wall, floor)
        clean = rng.random() < cfg.p_clean
        defects = [] if clean else _sample_defects(rng, cfg, product, scene)
        candidates.append({"letter": letter, "scene": scene, "defects": defects})
    meta = {"generator_version": GENERATOR_VERSION, "seed": seed, "split": split, "index": index}
    meta |= {"layout": layout, "product": product, "candidates": candidates}
    meta["weak"] = _sample_weak(rng, cfg, product, candidates)
    if cfg.answer_cot_error_rate > 0:  # (at 0 the metadata stays as it was before the knob)
        annotator = _sample_annotator(cfg, seed, split, index, product, candidates)
        if annotator["errors"]:  # `meta["annotator"]`: the claims and errors, when any
            meta["annotator"] = annotator
    return meta
