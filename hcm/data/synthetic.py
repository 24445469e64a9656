"""The procedural synthetic screening benchmark, the project's default dataset.

No real screening data can be downloaded, so this module draws samples of the paper's shape
(Table 1): an original product image and four candidates A-D, each clean or carrying controlled
defects from the four dimensions of section 3.1 (families in `hcm.data.render.FAMILIES`). Labels
and texts are read off the generator's metadata, so they are true to the pixels.

Every sample is a pure function of (seed, split, index): files written by `write_dataset` and
samples drawn by `SyntheticStream` agree, and neither order nor worker count matters.

Departures from the paper, and why:
- The CoT's final choice is the whole label ("AC"), not one letter: a label lists every
  acceptable candidate and the CoT is conditioned on it (the paper's answer-driven CoT).
- Weak CoTs (the paper's Qwen-VL-Max pseudo-labels, about 38% accurate) are made like the true
  CoT from corrupted metadata; their accuracy is a parameter.
- `defect_strength` (0..1) scales how visible defects are, so difficulty can be set to leave
  reinforcement learning headroom above SFT (a small model saturates the easy setting).
"""

from __future__ import annotations

import argparse
import colorsys
import json
import os
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from hcm.data.records import (
    NONE_ANSWER,
    OPTIONS,
    SPLITS,
    ScreeningRecord,
    ScreeningSample,
    atomic_write_text,
    write_manifest,
)
from hcm.data.render import (
    BASE_ASPECT,
    CAPPED_SHAPES,
    EXTRA_MARKS,
    EXTRA_OBJECTS,
    FAMILIES,
    MARKS,
    SHADOW_DEPTH,
    SHAPES,
    render_candidate,
    render_original,
)
from hcm.data.synthetic_text import TEXT_STYLES, weak_cot_text

GENERATOR_VERSION = "1"
MARKER = "dataset.json"
PAPER_SIZES = {"train": 1044, "test": 468, "pseudo_label": 10724, "exploration": 115809}
DEFAULT_SIZES = {"train": 64, "test": 32, "pseudo_label": 64, "exploration": 0}
# What each split keeps (paper Table 1); `meta` is kept everywhere for per-family reporting.
SPLIT_FIELDS = {
    "train": ("answer", "caption", "answer_cot", "weak_cot"),
    "test": ("answer", "dimensions"),
    "pseudo_label": ("caption", "weak_cot"),
    "exploration": (),
}
DEFAULT_FAMILY_WEIGHTS = {
    "colour": 1.0,
    "shape": 1.0,
    "label": 1.0,
    "parts_missing": 0.5,
    "quantity": 1.0,
    "shadow_missing": 1.0,
    "shadow_toward_light": 1.0,
    "shadow_inconsistent": 0.5,
    "floating": 1.0,
    "tilted": 0.5,
    "cropped": 0.5,
    "extra_object": 1.0,
    "extra_mark": 0.5,
}
WALLS = {"beige": (232, 220, 196), "light grey": (222, 222, 222), "pale blue": (204, 220, 236)}
WALLS |= {"cream": (245, 238, 214), "pale green": (210, 230, 208)}
FLOORS = {"grey": (150, 150, 150), "wooden": (168, 124, 84), "dark grey": (100, 100, 104)}
FLOORS |= {"tan": (196, 170, 130), "slate blue": (110, 124, 150)}
CAPS = ([240, 240, 240], [30, 30, 30], [180, 180, 190])
PNG_COMPRESSION = 1  # zlib level: these flat images compress well even at 1, and 1 is fast


@dataclass
class SyntheticConfig:
    """The generator's knobs (conf/data/synthetic.yaml, key `generator`).

    Mean answer length: with K ~ Binomial(4, p_clean) clean candidates the answer has K letters,
    or 1 ("N") when K = 0, so E|answer| = 4p + (1-p)^4; p = 0.395 gives 1.580 + 0.134 = 1.714,
    the paper's test split (1.7136; random-guess baseline 1.714 / 5 = 34.3%).
    """

    image_size: int = 112
    defect_strength: float = 0.7  # 0 = subtle defects, 1 = glaring ones
    p_clean: float = 0.395  # chance a candidate has no defect
    p_second_defect: float = 0.15  # chance a defective candidate gets one from a second dimension
    p_two_units: float = 0.25  # chance the original shows two units of the product
    family_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FAMILY_WEIGHTS))
    weak_cot_accuracy: float = 0.38  # fraction of weak CoTs whose answer is the label (paper 38%)
    weak_misname_prob: float = 0.3  # chance a weak CoT names a defect by the wrong family
    text_style: str = "full"  # captions and CoTs: "full" sentences or "compact" (a few words each)

    def __post_init__(self) -> None:
        self.family_weights = {str(k): float(v) for k, v in dict(self.family_weights).items()}
        unknown = sorted(set(self.family_weights) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown defect families {unknown}; expected {list(FAMILIES)}")
        if any(w < 0 for w in self.family_weights.values()):
            raise ValueError(f"family weights must be >= 0, got {self.family_weights}")
        # shadow_inconsistent needs two units, so some other family must be drawable
        if not any(w > 0 for f, w in self.family_weights.items() if f != "shadow_inconsistent"):
            raise ValueError("some defect family other than shadow_inconsistent needs weight > 0")
        probabilities = ("p_clean", "p_second_defect", "p_two_units", "weak_cot_accuracy")
        for name in ("defect_strength", *probabilities, "weak_misname_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.text_style not in TEXT_STYLES:
            raise ValueError(
                f"text_style must be one of {sorted(TEXT_STYLES)}, got {self.text_style!r}"
            )
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")


def sample_id(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


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
    return meta


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
    caption, cot = TEXT_STYLES[cfg.text_style]
    return ScreeningSample(
        id=sample_id(split, index),
        images=render_images(meta, cfg.image_size),
        answer=answer_of(meta),
        dimensions=dimensions_of(meta),
        caption=caption(meta, cfg.image_size),
        weak_cot=weak_cot_text(meta, cfg.text_style),
        answer_cot=cot(meta),
        meta=meta,
    )


def split_view(sample: ScreeningSample, split: str) -> ScreeningSample:
    """The sample with only the labels and texts the split carries (SPLIT_FIELDS)."""
    keep = SPLIT_FIELDS[split]
    dropped = {f: None for f in ("answer", "caption", "weak_cot", "answer_cot") if f not in keep}
    return replace(sample, **dropped, dimensions=sample.dimensions if "dimensions" in keep else ())


def _write_one(
    root: Path, cfg: SyntheticConfig, seed: int, split: str, index: int
) -> ScreeningRecord:
    s = split_view(generate_sample(cfg, seed, split, index), split)
    folder = root / "images" / s.id
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png" for name in ("original", *OPTIONS)]
    for path, image in zip(paths, s.images, strict=True):
        image.save(path, format="PNG", compress_level=PNG_COMPRESSION)
    texts = {"caption": s.caption, "weak_cot": s.weak_cot, "answer_cot": s.answer_cot}
    return ScreeningRecord(
        s.id, paths[0], tuple(paths[1:]), s.answer, s.dimensions, **texts, meta=s.meta
    )


def _marker(sizes: Mapping[str, int], cfg: SyntheticConfig, seed: int) -> dict[str, Any]:
    obj = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "sizes": dict(sizes),
        "config": asdict(cfg),
    }
    return json.loads(json.dumps(obj, sort_keys=True))


def write_dataset(
    root: str | Path,
    sizes: Mapping[str, int],
    cfg: SyntheticConfig | None = None,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Path]:
    """Write images and one manifest per split under `root`; the marker `dataset.json` last."""
    cfg, root = cfg or SyntheticConfig(), Path(root)
    bad = {s: n for s, n in sizes.items() if s not in SPLITS or int(n) < 0}
    if bad:
        raise ValueError(f"sizes must map splits {SPLITS} to counts >= 0, got {bad}")
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).unlink(missing_ok=True)  # a rewrite in progress is not a complete dataset
    manifests: dict[str, Path] = {}
    bar = tqdm(total=sum(int(n) for n in sizes.values()), disable=not progress, desc="synthetic")
    pool = get_context().Pool(workers) if workers > 1 else None
    try:
        for split, n in sizes.items():
            job = partial(_write_one, root, cfg, seed, split)
            records = []
            results = (
                pool.imap(job, range(int(n)), chunksize=16) if pool else map(job, range(int(n)))
            )
            for record in results:
                records.append(record)
                bar.update()
            manifests[split] = write_manifest(root / f"{split}.jsonl", records)
    finally:
        bar.close()
        if pool:
            pool.close()
            pool.join()
    atomic_write_text(
        root / MARKER, json.dumps(_marker(sizes, cfg, seed), indent=1, sort_keys=True)
    )
    return manifests


def dataset_complete(
    root: str | Path, sizes: Mapping[str, int], cfg: SyntheticConfig, seed: int
) -> bool:
    """True when `root` holds a finished dataset written with exactly these arguments."""
    root = Path(root)
    try:
        found = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return found == _marker(sizes, cfg, seed) and all(
        (root / f"{s}.jsonl").is_file() for s in sizes
    )


class SyntheticStream(torch.utils.data.IterableDataset):
    """A fresh sample every step, for training on an unbounded synthetic stream.

    Samples come from split f"{name}-e{epoch}", so each epoch draws new ones. Sample j of a rank
    (j = 0, 1, ...) has index rank + world * j, and worker w of W takes j = w, w + W, ...:

        world=2, W=2   rank 0: worker 0 -> 0, 4, 8, ...   worker 1 -> 2, 6, 10, ...
                       rank 1: worker 0 -> 1, 5, 9, ...   worker 1 -> 3, 7, 11, ...

    so no two workers or ranks ever draw the same sample, and a run is reproducible for a given
    (seed, epoch, world, workers). `samples_per_epoch` (None = endless) is the total over ranks;
    each rank draws samples_per_epoch // world, so ranks stay in step. Call `set_epoch` before
    each epoch (it reaches workers unless they are persistent).
    """

    def __init__(
        self,
        cfg: SyntheticConfig | None = None,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        name: str = "stream",
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.cfg = cfg or SyntheticConfig()
        self.seed, self.samples_per_epoch, self.name = seed, samples_per_epoch, name
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def __iter__(self) -> Iterator[ScreeningSample]:
        rank, world = self._rank_world()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        per_rank = None if self.samples_per_epoch is None else self.samples_per_epoch // world
        j = worker
        while per_rank is None or j < per_rank:
            yield generate_sample(
                self.cfg, self.seed, f"{self.name}-e{self.epoch}", rank + world * j
            )
            j += workers


def main(argv: list[str] | None = None) -> dict[str, Path]:
    ap = argparse.ArgumentParser(
        prog="python -m hcm.data.synthetic",
        description="Write the synthetic screening benchmark (images, one manifest per split).",
    )
    ap.add_argument("--out", required=True, type=Path, help="dataset root folder")
    ap.add_argument("--seed", type=int, default=0)
    for split in SPLITS:
        flag = "--" + split.replace("_", "-")
        ap.add_argument(flag, type=int, default=DEFAULT_SIZES[split], help=f"{split} samples")
    ap.add_argument(
        "--paper-sizes", action="store_true", help=f"use the paper's sizes {PAPER_SIZES}"
    )
    ap.add_argument("--image-size", type=int, default=SyntheticConfig.image_size)
    ap.add_argument("--defect-strength", type=float, default=SyntheticConfig.defect_strength)
    ap.add_argument("--workers", type=int, default=1, help="worker processes")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    sizes = dict(PAPER_SIZES) if args.paper_sizes else {s: getattr(args, s) for s in SPLITS}
    cfg = SyntheticConfig(image_size=args.image_size, defect_strength=args.defect_strength)
    manifests = write_dataset(args.out, sizes, cfg, args.seed, args.workers, not args.no_progress)
    for split, path in manifests.items():
        print(f"{split}: {sizes[split]} samples -> {path}")
    return manifests


if __name__ == "__main__":
    main()
