"""A synthetic sample read off its metadata: the label, the dimensions, the images and texts,
and the view of it that each split keeps (paper Table 1)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from hcm.data.records import ScreeningSample
from hcm.data.synthetic.config import SyntheticConfig
from hcm.data.synthetic.render import render_candidate, render_original
from hcm.data.synthetic.scene import sample_meta
from hcm.data.synthetic.text import TEXT_STYLES, answer_cot_text, weak_cot_text
from hcm.screening import NONE_ANSWER

# What each split keeps (paper Table 1); `meta` is kept everywhere for per-family reporting.
SPLIT_FIELDS = {
    "train": ("answer", "caption", "answer_cot", "weak_cot"),
    "val": ("answer", "dimensions"),  # held out like test
    "test": ("answer", "dimensions"),
    "pseudo_label": ("caption", "weak_cot"),
    "exploration": (),
}


def sample_id(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def answer_of(meta: Mapping[str, Any]) -> str:
    """The defect-free candidates in order, "N" when there are none."""
    return "".join(c["letter"] for c in meta["candidates"] if not c["defects"]) or NONE_ANSWER


def dimensions_of(meta: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(sorted({d["dimension"] for c in meta["candidates"] for d in c["defects"]}))


def render_images(meta: Mapping[str, Any], size: int) -> tuple[Any, ...]:
    """(original, A, B, C, D) as RGB PIL images."""
    p = meta["product"]
    cands = [render_candidate(p, c["scene"], c["defects"], size) for c in meta["candidates"]]
    return (render_original(p, size), *cands)


def generate_sample(cfg: SyntheticConfig, seed: int, split: str, index: int) -> ScreeningSample:
    """Sample `index` of `split`, with every label and text (see `split_view` for a split's)."""
    meta = sample_meta(cfg, seed, split, index)
    caption = TEXT_STYLES[cfg.text_style][0]
    return ScreeningSample(
        id=sample_id(split, index),
        images=render_images(meta, cfg.image_size),
        answer=answer_of(meta),
        dimensions=dimensions_of(meta),
        caption=caption(meta, cfg.image_size),
        weak_cot=weak_cot_text(meta, cfg.text_style),
        answer_cot=answer_cot_text(meta, cfg.text_style),
        meta=meta,
    )


def split_view(sample: ScreeningSample, split: str) -> ScreeningSample:
    """The sample with only the labels and texts the split carries (SPLIT_FIELDS)."""
    keep = SPLIT_FIELDS[split]
    dropped = {f: None for f in ("answer", "caption", "weak_cot", "answer_cot") if f not in keep}
    return replace(sample, **dropped, dimensions=sample.dimensions if "dimensions" in keep else ())
