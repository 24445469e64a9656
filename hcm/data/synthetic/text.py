"""Texts of the synthetic benchmark, read off a sample's metadata: caption and CoTs.

The caption describes what each image shows (product, colours, layout, light, shadow, surface)
without verdicts. The CoT follows the paper's format (Appendix B), one observation per candidate,

    <think>I observed <A> ..., <B> ..., <C> ..., <D> ..., so I ultimately chose X.</think>
    <answer>X</answer>            (on one line)

naming each candidate's real defects, or that it is consistent and physically plausible. The weak
CoT is the same text made from a weak annotator's claims (`meta["weak"]["claims"]`), and the
answer-driven CoT from the answer-driven annotator's (`meta["annotator"]["claims"]`, present when
it made a mistake: `answer_cot_error_rate`), whose verdicts are always the label's.

The `compact` style is for models that must learn in minutes on a CPU (the full CoT runs to ~140
tokens of the tiny tokenizer, the compact one ~50). Its caption states in a few words what each
candidate shows of placement, shadow and extra items, without verdicts, and its CoT is those
observations (plus what changed against the original), a verdict per candidate, and the answer:

    A: floor, shadow. B: floating, shadow. C: floor, no shadow, extra object. D: floor, shadow.
    <think>A: floor, shadow, acceptable. B: floating, shadow, unacceptable. C: floor, no shadow,
    extra object, unacceptable. D: floor, shadow, acceptable.</think><answer>AD</answer>
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping
from typing import Any

from hcm.data.synthetic.render import apply_defects
from hcm.screening import NONE_ANSWER

NOUNS = {"bottle": "bottle", "box": "box", "jar": "jar", "tube": "tube", "blister": "blister pack"}
PLURALS = {
    "bottle": "bottles",
    "box": "boxes",
    "jar": "jars",
    "tube": "tubes",
    "blister": "blister packs",
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


def color_name(color: list[int]) -> str:
    """A plain colour word for an RGB triple, for captions and CoTs."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in color))
    if s < 0.2:
        return "white" if v > 0.85 else "black" if v < 0.25 else "grey"
    bins = [(0.04, "red"), (0.11, "orange"), (0.18, "yellow"), (0.45, "green"), (0.53, "teal")]
    bins += [(0.7, "blue"), (0.83, "purple"), (0.93, "pink"), (1.01, "red")]
    name = next(n for edge, n in bins if h < edge)
    return f"dark {name}" if v < 0.45 else name


# A defect family's phrase, where it needs no more than the fields `defect_phrase` fills in.
PHRASES = {
    "quantity": "the number of {plural} changed from {product[count]} to {q[count]}",
    "shadow_toward_light": (
        "the shadow falls toward the sun on the {light}, which is physically wrong"
    ),
    "shadow_inconsistent": "the shadows of the {plural} point in different directions",
    "floating": "the {noun} floats above the floor without support",
    "tilted": "the {noun} is tilted and balances on one corner, which is physically impossible",
    "cropped": "the {noun} is cut off by the {q[edge]} edge of the image",
    "extra_object": "there is an extra {colour} {q[kind]} the original does not have",
    "extra_mark": "a {colour} {q[kind]} appears on the {noun}, unlike the original",
}


def defect_phrase(product: Mapping, scene: Mapping, d: Mapping) -> str:
    noun, q, f = NOUNS[product["shape"]], d["params"], d["family"]
    if f in PHRASES:
        colour = color_name(q["color"]) if "color" in q else None
        fields = {"noun": noun, "plural": PLURALS[product["shape"]], "light": scene["light"]}
        return PHRASES[f].format(**fields, colour=colour, product=product, q=q)
    if f == "colour":
        was, now = color_name(product["body"]), color_name(q["body"])
        shift = "shifted" if was == now else f"changed from {was} to {now}"
        return f"the {noun}'s colour {shift}, which does not match the original"
    if f == "shape":
        if q["shape"] != product["shape"]:
            return f"the product became a {NOUNS[q['shape']]} instead of a {noun}"
        wider = "wider" if q["aspect"] > product["aspect"] else "narrower"
        return f"the {noun} is {wider} than the original"
    if f == "label":
        return f"the label shows {mark_words(q['mark'])} instead of {mark_words(product['mark'])}"
    if f == "parts_missing":
        return f"the {noun}'s {q['part']} {'are' if q['part'] == 'stripes' else 'is'} missing"
    if f == "shadow_missing":
        return f"the {noun} casts {'no' if q['opacity'] == 0 else 'almost no'} shadow under the sun"
    raise ValueError(f"unknown defect family {f!r}")


def mark_words(mark: str) -> str:
    if mark.startswith("text:"):
        return f'the text "{mark[5:]}"'
    return "bars" if mark == "bars" else f"a {mark}"


def cot_text(meta: Mapping[str, Any], claims: Mapping[str, list] | None = None) -> str:
    """The paper's CoT format, one observation per candidate; `claims` override the truth."""
    product, parts, chosen = meta["product"], [], []
    for c in meta["candidates"]:
        defects = (claims or {}).get(c["letter"], c["defects"])
        if defects:
            seen = " and ".join(defect_phrase(product, c["scene"], d) for d in defects)
        else:
            chosen.append(c["letter"])
            seen = (
                f"the {NOUNS[product['shape']]} matches the original and its lighting, shadow "
                "and placement are physically plausible"
            )
        parts.append(f"<{c['letter']}> {seen}")
    x = "".join(chosen) or NONE_ANSWER
    think = f"I observed {', '.join(parts)}, so I ultimately chose {x}."
    return f"<think>{think}</think><answer>{x}</answer>"


def weak_cot_text(meta: Mapping[str, Any], style: str = "full") -> str:
    return TEXT_STYLES[style][1](meta, meta["weak"]["claims"])


def answer_cot_text(meta: Mapping[str, Any], style: str = "full") -> str:
    """The answer-driven CoT: the truth, less the annotator's mistakes (none at error rate 0)."""
    return TEXT_STYLES[style][1](meta, meta.get("annotator", {}).get("claims"))


# What a compact caption cannot show (it describes one image; these need the original beside it).
COMPARED_WORDS = {
    "colour": "colour changed",
    "shape": "shape changed",
    "label": "label changed",
    "parts_missing": "part missing",
    "quantity": "quantity changed",
}


def compact_seen(product: Mapping, defects: list) -> list[str]:
    """What one candidate shows of placement, shadow and extra items, in a few words each."""
    st = apply_defects(product, defects)
    seen = ["floating" if st.gap else "tilted" if st.angle else "floor"]
    if st.crop:
        seen.append("cropped")
    if st.shadow_opacity == 0:
        seen.append("no shadow")
    elif st.shadow_opacity < 0.5:
        seen.append("faint shadow")
    elif any(r < 0 for r in st.reach):  # a negative reach points toward the sun
        seen.append("shadow toward light")
    else:
        seen.append("shadow")
    return seen + ["extra object"] * bool(st.extra_object) + ["extra mark"] * bool(st.extra_mark)


def compact_cot_text(meta: Mapping[str, Any], claims: Mapping[str, list] | None = None) -> str:
    """The CoT as observations in a few words per candidate, each with its verdict, then the
    answer: a candidate is acceptable when it stands on the floor with its shadow, nothing else is
    seen and nothing changed against the original. `claims` override the truth."""
    parts, chosen = [], []
    for c in meta["candidates"]:
        defects = (claims or {}).get(c["letter"], c["defects"])
        if not defects:
            chosen.append(c["letter"])
        seen = compact_seen(meta["product"], defects)
        seen += [COMPARED_WORDS[d["family"]] for d in defects if d["family"] in COMPARED_WORDS]
        seen.append("unacceptable" if defects else "acceptable")
        parts.append(f"{c['letter']}: {', '.join(seen)}.")
    x = "".join(chosen) or NONE_ANSWER
    return f"<think>{' '.join(parts)}</think><answer>{x}</answer>"


def compact_caption_text(meta: Mapping[str, Any], size: int = 112) -> str:
    """What each candidate shows of placement, shadow and extra items, in a few words."""
    del size  # the compact caption gives no distances
    parts = []
    for c in meta["candidates"]:
        parts.append(f"{c['letter']}: {', '.join(compact_seen(meta['product'], c['defects']))}.")
    return " ".join(parts)


def product_words(p: Mapping[str, Any]) -> str:
    n = p["count"]
    noun = NOUNS[p["shape"]] if n == 1 else PLURALS[p["shape"]]
    details = [f"a {color_name(p['cap'])} cap"] if p["cap"] else []
    if p["stripes"]:
        stripe = "stripe" if p["stripes"] == 1 else "stripes"
        details.append(f"{COUNT_WORDS[p['stripes']]} {color_name(p['stripe'])} {stripe}")
    if p["label"]:
        details.append(f"a {color_name(p['label'])} label showing {mark_words(p['mark'])}")
    words = f"{COUNT_WORDS[n]} {color_name(p['body'])} {noun}"
    if len(details) > 1:
        details = [", ".join(details[:-1]) + " and " + details[-1]]
    return f"{words} with {details[0]}" if details else words


def _candidate_caption(letter: str, product, scene, defects, size: int) -> str:
    st = apply_defects(product, defects)
    p, n = st.product, st.product["count"]
    verb = "stands on" if n == 1 else "stand on"
    if st.gap:
        verb = f"float{'s' if n == 1 else ''} about {round(st.gap * size)} px above"
    elif st.angle:
        verb = (
            f"{'is' if n == 1 else 'are'} tilted by {abs(st.angle):.0f} degrees, on one corner on"
        )
    where = "in the lower middle"
    if scene["layout"] == "left-right":
        where = f"in the {scene['side']} half"
    if st.crop:
        where += f", cut off by the {st.crop[0]} edge"
    if st.shadow_opacity == 0:
        shadow = "there is no shadow"
    elif st.shadow_opacity < 0.5:
        shadow = "there is only a faint shadow"
    else:
        away = 1 if scene["light"] == "left" else -1
        sides = {"right" if away * r > 0 else "left" for r in st.reach}
        the = "the shadow falls" if n == 1 else "the shadows fall"
        shadow = f"{the} to the {sides.pop()}" if len(sides) == 1 else "the shadows fall both ways"
    text = (
        f"Image {letter}: a {scene['wall_name']} wall above a {scene['floor_name']} floor; "
        f"{product_words(p)} {verb} the floor {where}; "
        f"the sun is in the top-{scene['light']} corner and {shadow}"
    )
    if st.extra_object:
        q = st.extra_object
        text += f"; a {color_name(q['color'])} {q['kind']} stands on the floor beside it"
    if st.extra_mark:
        q = st.extra_mark
        text += f"; a {color_name(q['color'])} {q['kind']} is on the {NOUNS[p['shape']]}"
    return text + "."


def caption_text(meta: Mapping[str, Any], size: int = 112) -> str:
    """A factual description of the original and each candidate (no verdicts)."""
    product = meta["product"]
    lines = [f"Original image: {product_words(product)}, on a white background."]
    for c in meta["candidates"]:
        lines.append(_candidate_caption(c["letter"], product, c["scene"], c["defects"], size))
    return " ".join(lines)


# style -> (caption, CoT) writers; SyntheticConfig.text_style picks one.
TEXT_STYLES = {
    "full": (caption_text, cot_text),
    "compact": (compact_caption_text, compact_cot_text),
}
