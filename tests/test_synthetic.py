"""The synthetic benchmark: determinism, labels true to the pixels per defect family, label
statistics, texts, files, CLI and the streaming dataset."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from hcm.data import synthetic as syn
from hcm.data.manifest import load_manifest
from hcm.data.records import SPLITS
from hcm.data.synthetic import dataset as syn_dataset
from hcm.data.synthetic import text as syn_text
from hcm.data.synthetic.render import (
    FAMILIES,
    SUN,
    render_candidate,
    render_original,
    shade,
    shadow_color,
)
from hcm.data.synthetic.sample import answer_of, dimensions_of, split_view
from hcm.data.synthetic.scene import make_defect, sample_meta
from hcm.files import folder_lock
from hcm.screening import DIMENSIONS, OPTIONS

REPO = Path(__file__).resolve().parents[1]
CPU_GENERATOR = yaml.safe_load((REPO / "conf/data/synthetic_cpu.yaml").read_text())["synthetic"][
    "generator"
]
SIZE = 112
WALL, FLOOR, BODY = (230, 220, 200), (150, 150, 150), (30, 60, 220)
SHADOW = shadow_color(FLOOR)
SCENE_COLORS = [WALL, FLOOR, SHADOW, shade(FLOOR, 0.85), SUN]
BASE_ROW = round(0.85 * SIZE)  # the contact line: the product's lowest row is BASE_ROW - 1
COT_RE = re.compile(
    r"<think>I observed <A> (.+), <B> (.+), <C> (.+), <D> (.+), "
    r"so I ultimately chose ([A-D]+|N)\.</think><answer>([A-D]+|N)</answer>"
)


def product(**kw):
    p = {"shape": "box", "aspect": 0.6, "count": 1, "body": list(BODY), "cap": None, "stripes": 0}
    p |= {"stripe": [250, 200, 0], "label": [250, 250, 250], "mark": "cross"}
    return p | {"mark_color": [20, 20, 20]} | kw


def scene(**kw):
    s = {"layout": "top-bottom", "side": None, "light": "left", "x": 0.5, "height": 0.4}
    s |= {"base": 0.85, "horizon": 0.5, "wall_name": "beige", "floor_name": "grey"}
    return s | {"wall": list(WALL), "floor": list(FLOOR)} | kw


def defect(family, p, sc, strength=0.7, **override):
    d = make_defect(family, np.random.default_rng(0), strength, p, sc)
    d["params"] |= override
    return d


def pixels(img):
    return np.asarray(img, dtype=np.int16)


def is_color(a, color):
    return np.all(a == np.array(color), axis=-1)


def product_mask(a):
    """Everything that is not wall, floor, floor line, shadow or sun."""
    return ~np.any([is_color(a, c) for c in SCENE_COLORS], axis=0)


def bbox(mask):
    rows, cols = np.nonzero(mask)
    return rows.min(), rows.max(), cols.min(), cols.max()


def components(mask, min_size=4):
    """Number of 4-connected blobs of at least `min_size` pixels."""
    seen, count = np.zeros_like(mask), 0
    for r, c in zip(*np.nonzero(mask), strict=True):
        if seen[r, c]:
            continue
        queue, size = deque([(r, c)]), 0
        seen[r, c] = True
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                inside = 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]
                if inside and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        count += size >= min_size
    return count


def render_pair(family, p=None, sc=None, strength=0.7, **override):
    p, sc = p or product(), sc or scene()
    d = defect(family, p, sc, strength, **override)
    return pixels(render_candidate(p, sc, [], SIZE)), pixels(render_candidate(p, sc, [d], SIZE)), d


# --- determinism ---------------------------------------------------------------------------


def test_same_seed_split_index_gives_identical_pixels_and_texts():
    cfg = syn.SyntheticConfig()
    a, b = syn.generate_sample(cfg, 3, "train", 5), syn.generate_sample(cfg, 3, "train", 5)
    assert a.id == "train-000005"
    assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]
    for name in ("answer", "caption", "answer_cot", "weak_cot"):
        assert getattr(a, name) == getattr(b, name)
    assert all(im.mode == "RGB" and im.size == (SIZE, SIZE) for im in a.images)
    for other in (syn.generate_sample(cfg, 4, "train", 5), syn.generate_sample(cfg, 3, "test", 5)):
        assert a.images[0].tobytes() != other.images[0].tobytes()


# --- labels true to the pixels, per defect family --------------------------------------------


@pytest.mark.parametrize("strength", [0.0, 0.7, 1.0])
def test_floating_leaves_a_floor_coloured_gap_under_the_product(strength):
    clean, bad, d = render_pair("floating", strength=strength)
    gap = round(d["params"]["gap"] * SIZE)
    assert gap >= 4
    _, clean_low, c0, c1 = bbox(product_mask(clean))
    assert clean_low == BASE_ROW - 1  # standing: no gap
    _, low, _, _ = bbox(product_mask(bad))
    assert low == BASE_ROW - 1 - gap
    assert is_color(bad[low + 1 : BASE_ROW, c0 : c1 + 1], FLOOR).all()


def test_floating_gap_grows_with_defect_strength():
    gaps = [defect("floating", product(), scene(), s)["params"]["gap"] for s in (0.0, 0.5, 1.0)]
    assert gaps == sorted(gaps) and gaps[0] < gaps[-1]


def test_missing_shadow_leaves_the_lit_floor_and_changes_nothing_else():
    clean, bad, _ = render_pair("shadow_missing", strength=1.0)
    shadow = is_color(clean, SHADOW)
    assert shadow.sum() > 50
    diff = np.any(clean != bad, axis=-1)
    assert np.array_equal(diff, shadow)
    assert is_color(bad[shadow], FLOOR).all()


def test_subtle_missing_shadow_is_faint():
    clean, bad, d = render_pair("shadow_missing", strength=0.7)
    region = is_color(clean, SHADOW)
    clean_drop = (np.array(FLOOR) - clean[region]).mean()
    bad_drop = (np.array(FLOOR) - bad[region]).mean()
    assert 0 < d["params"]["opacity"] < 0.2
    assert 0 <= bad_drop < clean_drop / 3


@pytest.mark.parametrize("light", ["left", "right"])
def test_shadow_toward_light_lies_on_the_suns_side(light):
    sc = scene(light=light)
    clean, bad, _ = render_pair("shadow_toward_light", sc=sc)
    _, _, c0, c1 = bbox(product_mask(clean))
    centre = (c0 + c1) / 2
    toward_sun = -1 if light == "left" else 1
    clean_cols = np.nonzero(is_color(clean, SHADOW))[1]
    bad_cols = np.nonzero(is_color(bad, SHADOW))[1]
    assert np.sign(clean_cols.mean() - centre) == -toward_sun
    assert np.sign(bad_cols.mean() - centre) == toward_sun
    # the defect only moves the shadow
    diff = np.any(clean != bad, axis=-1)
    assert not (diff & ~(is_color(clean, SHADOW) | is_color(bad, SHADOW))).any()


def test_inconsistent_shadows_point_both_ways():
    p = product(count=2, aspect=0.4)
    clean, bad, _ = render_pair("shadow_inconsistent", p=p, unit=0)
    _, _, c0, c1 = bbox(product_mask(clean))
    assert components(product_mask(clean)) == 2
    clean_cols, bad_cols = (
        np.nonzero(is_color(clean, SHADOW))[1],
        np.nonzero(is_color(bad, SHADOW))[1],
    )
    assert not (clean_cols < c0).any() and (clean_cols > c1).any()  # light left: all to the right
    assert (bad_cols < c0).any() and (bad_cols > c1).any()  # unit 0 now casts to the left
    diff = np.any(clean != bad, axis=-1)
    assert not (diff & ~(is_color(clean, SHADOW) | is_color(bad, SHADOW))).any()


@pytest.mark.parametrize(("strength", "min_delta"), [(0.0, 15), (0.7, 60)])
def test_colour_change_shifts_the_mean_product_colour(strength, min_delta):
    clean, bad, d = render_pair("colour", strength=strength)
    m_clean, m_bad = product_mask(clean), product_mask(bad)
    assert np.array_equal(m_clean, m_bad)  # same shape, new colour
    delta = np.abs(clean[m_clean].mean(0) - bad[m_bad].mean(0)).sum()
    assert delta >= min_delta
    assert is_color(bad, d["params"]["body"]).sum() == is_color(clean, BODY).sum() > 100


def test_colour_shift_grows_with_defect_strength():
    shifts = [
        abs(defect("colour", product(), scene(), s)["params"]["hue_shift"]) for s in (0, 0.5, 1)
    ]
    assert shifts == sorted(shifts) and shifts[0] < shifts[-1]


@pytest.mark.parametrize("family", ["extra_object", "extra_mark", "label", "colour"])
def test_defect_changes_pixels_only_where_it_should(family):
    clean, bad, _ = render_pair(family)
    r0, r1, c0, c1 = bbox(product_mask(clean))
    inside = np.zeros(clean.shape[:2], bool)
    inside[r0 : r1 + 1, c0 : c1 + 1] = True
    diff = np.any(clean != bad, axis=-1)
    assert diff.sum() >= 10
    if family == "extra_object":  # a fabricated item beside the product, not on it
        assert not (diff & inside).any()
    else:  # a fabricated mark, a changed label or colour: on the product only
        assert not (diff & ~inside).any()


def test_extra_object_size_grows_with_defect_strength():
    areas = []
    for s in (0.0, 1.0):
        clean, bad, _ = render_pair("extra_object", strength=s)
        areas.append(np.any(clean != bad, axis=-1).sum())
    assert areas[0] * 2 < areas[1]


@pytest.mark.parametrize("count", [1, 2])
def test_quantity_changes_the_number_of_product_blobs(count):
    p = product(count=count, aspect=0.4)
    clean, bad, d = render_pair("quantity", p=p)
    assert components(product_mask(clean)) == count
    assert components(product_mask(bad)) == d["params"]["count"] != count


def test_quantity_in_the_original_image():
    p = product(count=2, aspect=0.4)
    a = pixels(render_original(p, SIZE))
    assert components(~is_color(a, (255, 255, 255))) == 2


@pytest.mark.parametrize("shape", ["box", "bottle"])
def test_shape_change_changes_the_product_outline(shape):
    p = product(shape=shape)
    clean, bad, _ = render_pair("shape", p=p)
    r0, r1, c0, c1 = bbox(product_mask(clean))
    b0, b1, d0, d1 = bbox(product_mask(bad))
    ratio_clean, ratio_bad = (c1 - c0 + 1) / (r1 - r0 + 1), (d1 - d0 + 1) / (b1 - b0 + 1)
    assert abs(ratio_bad / ratio_clean - 1) >= 0.1


def test_missing_cap_lowers_the_top_of_a_bottle():
    cap = (200, 30, 30)
    p = product(shape="bottle", aspect=0.45, cap=list(cap))
    clean, bad, _ = render_pair("parts_missing", p=p, part="cap")
    assert bbox(product_mask(bad))[0] > bbox(product_mask(clean))[0]
    assert not is_color(bad, cap).any() and is_color(clean, cap).any()


def test_tilted_product_rests_on_a_corner():
    clean, bad, _ = render_pair("tilted")
    low_clean, low_bad = bbox(product_mask(clean))[1], bbox(product_mask(bad))[1]
    assert low_clean == low_bad == BASE_ROW - 1  # still touching the floor
    assert product_mask(clean)[low_clean].sum() >= 15  # flat bottom
    assert product_mask(bad)[low_bad].sum() <= 4  # one corner


def test_cropped_product_is_cut_by_the_frame():
    clean, bad, d = render_pair("cropped", sc=scene(x=0.3))
    assert d["params"]["edge"] == "left"
    assert not product_mask(clean)[:, 0].any() and product_mask(bad)[:, 0].any()
    assert product_mask(bad).sum() < 0.8 * product_mask(clean).sum()


def test_every_sampled_defect_is_visible():
    cfg = syn.SyntheticConfig()
    seen = set()
    for i in range(40):
        meta = sample_meta(cfg, 0, "test", i)
        for c in meta["candidates"]:
            if c["defects"]:
                clean = render_candidate(meta["product"], c["scene"], [], 64)
                bad = render_candidate(meta["product"], c["scene"], c["defects"], 64)
                assert clean.tobytes() != bad.tobytes(), c
                seen.update(d["family"] for d in c["defects"])
    assert seen == set(FAMILIES)


# --- labels and texts from the metadata ------------------------------------------------------


def test_answer_and_dimensions_follow_the_metadata():
    cfg = syn.SyntheticConfig()
    for i in range(50):
        s = syn.generate_sample(cfg, 1, "test", i) if i < 5 else None
        meta = s.meta if s else sample_meta(cfg, 1, "test", i)
        clean = [c["letter"] for c in meta["candidates"] if not c["defects"]]
        dims = {d["dimension"] for c in meta["candidates"] for d in c["defects"]}
        assert answer_of(meta) == ("".join(clean) or "N")
        assert dimensions_of(meta) == tuple(sorted(dims))
        assert set(dims) <= set(DIMENSIONS)
        for c in meta["candidates"]:  # one family per dimension
            assert len({d["dimension"] for d in c["defects"]}) == len(c["defects"]) <= 2
        if s:
            assert (s.answer, s.dimensions) == (answer_of(meta), dimensions_of(meta))
            json.dumps(s.meta)


def test_mean_answer_length_matches_the_paper():
    cfg = syn.SyntheticConfig()
    lengths = [len(answer_of(sample_meta(cfg, 0, "test", i))) for i in range(1000)]
    expected = 4 * cfg.p_clean + (1 - cfg.p_clean) ** 4
    assert abs(expected - 1.7136) < 0.01
    assert abs(np.mean(lengths) - 1.7136) < 0.1


@pytest.mark.parametrize("accuracy", [0.38, 0.8])
def test_weak_cot_accuracy_is_as_configured(accuracy):
    cfg = syn.SyntheticConfig(weak_cot_accuracy=accuracy)
    hits = 0
    for i in range(800):
        meta = sample_meta(cfg, 0, "pseudo_label", i)
        weak = COT_RE.fullmatch(syn_text.weak_cot_text(meta))
        hits += weak.group(5) == answer_of(meta)
        assert (weak.group(5) == answer_of(meta)) == meta["weak"]["correct"]
    assert abs(hits / 800 - accuracy) < 0.05


def test_answer_cot_has_the_paper_format_and_names_the_real_defects():
    cfg = syn.SyntheticConfig()
    for i in range(30):
        meta = sample_meta(cfg, 2, "train", i)
        m = COT_RE.fullmatch(syn_text.cot_text(meta))
        assert m and m.group(5) == m.group(6) == answer_of(meta)
        for k, c in enumerate(meta["candidates"]):
            says_ok = "matches the original" in m.group(k + 1)
            assert says_ok == (not c["defects"])


def test_texts_describe_specific_defects():
    p, sc = product(), scene(light="right")
    meta = {"product": p, "candidates": []}
    for letter, family in zip(
        OPTIONS, ["floating", "shadow_toward_light", "quantity", "colour"], strict=True
    ):
        meta["candidates"].append(
            {"letter": letter, "scene": sc, "defects": [defect(family, p, sc)]}
        )
    cot, caption = syn_text.cot_text(meta), syn_text.caption_text(meta, SIZE)
    assert "<A> the box floats above the floor" in cot
    assert "<B> the shadow falls toward the sun on the right" in cot
    assert "<C> the number of boxes changed from 1 to 2" in cot
    assert cot.endswith("so I ultimately chose N.</think><answer>N</answer>")
    assert "Original image: one blue box with a white label showing a cross" in caption
    assert "floats about 12 px above the floor" in caption
    assert "Image C: a beige wall above a grey floor; two blue boxes" in caption


COMPACT_COT_RE = re.compile(
    r"<think>(A: [a-z ,]+\. B: [a-z ,]+\. C: [a-z ,]+\. D: [a-z ,]+\.)</think>"
    r"<answer>([A-D]+|N)</answer>"
)


def test_compact_texts_describe_what_each_candidate_shows():
    cfg = syn.SyntheticConfig(text_style="compact")
    for i in range(80):
        s = syn.generate_sample(cfg, 3, "train", i)
        m = COMPACT_COT_RE.fullmatch(s.answer_cot)
        assert m and m.group(2) == s.answer, s.answer_cot
        weak = COMPACT_COT_RE.fullmatch(s.weak_cot)
        assert weak and (weak.group(2) == s.answer) == s.meta["weak"]["correct"]
        for c in s.meta["candidates"]:
            caption = re.search(rf"\b{c['letter']}: ([a-z ,]+)\.", s.caption).group(1)
            observed = re.search(rf"\b{c['letter']}: ([a-z ,]+)\.", m.group(1)).group(1)
            said, families = caption.split(", "), {d["family"] for d in c["defects"]}
            # the CoT observes what the caption says, plus what changed against the original
            compared = [syn_text.COMPARED_WORDS[f] for f in families & set(syn_text.COMPARED_WORDS)]
            *observed, verdict = observed.split(", ")
            assert sorted(observed) == sorted(said + compared)
            assert verdict == ("unacceptable" if families else "acceptable")
            # a clean candidate stands on the floor with its shadow, and nothing else is seen
            assert (caption == "floor, shadow") == (not families - set(syn_text.COMPARED_WORDS))
            assert ("floating" in said) == ("floating" in families)
            assert ("extra object" in said) == ("extra_object" in families)
            gone = [d for d in c["defects"] if d["family"] == "shadow_missing"]
            assert ("no shadow" in said) == any(d["params"]["opacity"] == 0 for d in gone)


def test_compact_cot_fits_the_cpu_completion_budget():
    from hcm.model.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    data = yaml.safe_load((REPO / "conf/data/synthetic_cpu.yaml").read_text())
    cfg = syn.SyntheticConfig(**data["synthetic"]["generator"])
    budget = yaml.safe_load((REPO / "conf/experiment/cpu_hcm.yaml").read_text())
    cots = [syn.generate_sample(cfg, 0, "x", i).answer_cot for i in range(300)]
    assert max(len(tok(cot).input_ids) for cot in cots) < budget["max_completion_length"]


def _samples_digest(cfg, fields=("answer", "caption", "weak_cot", "answer_cot", "meta")):
    """sha256 of 24 samples' images and `fields`."""
    h = hashlib.sha256()
    for split in ("train", "test", "pseudo_label", "x"):
        for i in range(6):
            s = syn.generate_sample(cfg, 3, split, i)
            h.update(b"".join(im.tobytes() for im in s.images))
            for f in fields:
                value = getattr(s, f)
                h.update((json.dumps(value, sort_keys=True) if f == "meta" else value).encode())
    return h.hexdigest()


def test_answer_cot_error_rate_zero_leaves_every_sample_as_before():
    # digests of the samples made before answer_cot_error_rate existed
    full, compact = syn.SyntheticConfig(image_size=48), syn.SyntheticConfig(**CPU_GENERATOR)
    assert _samples_digest(full).startswith("9b0b6d1d1f90d367")
    assert _samples_digest(compact).startswith("0d94d503b9dbd2ce")
    # at a rate > 0 only the answer-driven CoT (and the metadata's record of it) changes
    same = ("answer", "caption", "weak_cot")
    noisy = syn.SyntheticConfig(**CPU_GENERATOR | {"answer_cot_error_rate": 0.5})
    assert _samples_digest(noisy, same) == _samples_digest(compact, same)
    assert _samples_digest(noisy, ("answer_cot",)) != _samples_digest(compact, ("answer_cot",))


def _verdicts(cot, style):
    """{letter: (what is said of it, acceptable?)} read off a CoT of either style."""
    if style == "full":
        m = COT_RE.fullmatch(cot)
        return {
            L: (m.group(k + 1), "matches the original" in m.group(k + 1))
            for k, L in enumerate(OPTIONS)
        }
    m = COMPACT_COT_RE.fullmatch(cot)
    said = dict(re.findall(r"([A-D]): ([a-z ,]+)\.", m.group(1)))
    return {L: (said[L], said[L].endswith(", acceptable")) for L in OPTIONS}


@pytest.mark.parametrize("style", ["full", "compact"])
@pytest.mark.parametrize("rate", [0.3, 1.0])
def test_answer_cot_errors_change_observations_never_verdicts(style, rate):
    cfg = syn.SyntheticConfig(
        **CPU_GENERATOR | {"text_style": style, "answer_cot_error_rate": rate}
    )
    bad = wrong = 0
    kinds = set()
    for i in range(400):
        meta = sample_meta(cfg, 0, "train", i)
        cot, truth = syn_text.answer_cot_text(meta, style), syn_text.TEXT_STYLES[style][1](meta)
        assert cot.endswith(f"<answer>{answer_of(meta)}</answer>")
        errors = {e["letter"]: e for e in meta.get("annotator", {"errors": []})["errors"]}
        said, true = _verdicts(cot, style), _verdicts(truth, style)
        for c in meta["candidates"]:
            letter, families = c["letter"], [d["family"] for d in c["defects"]]
            assert said[letter][1] == (not families)  # every verdict is the label's
            bad += bool(families)
            e = errors.get(letter)
            assert (said[letter][0] != true[letter][0]) == (e is not None)  # written as recorded
            if e is None:
                continue
            wrong += 1
            kinds.add(e["kind"])
            assert families and e["true"] == families and e["claimed"]
            claimed = e["claimed"]
            if e["kind"] == "misnamed":  # one family replaced by another
                assert len(claimed) == len(families) and set(claimed) != set(families)
            elif e["kind"] == "extra":  # one that is not there added
                assert claimed[: len(families)] == families and len(claimed) == len(families) + 1
            else:  # one of two defects left out
                assert len(families) == 2 and len(claimed) == 1 and claimed[0] in families
    assert kinds == {"misnamed", "extra", "missed"}
    assert abs(wrong / bad - rate) < 0.05  # (every error possible with these three families)


def test_compact_weak_cot_on_the_pseudo_label_split_is_right_at_its_accuracy():
    cfg = syn.SyntheticConfig(**CPU_GENERATOR)  # compact texts, weak_cot_accuracy 0.38
    assert cfg.text_style == "compact" and cfg.weak_cot_accuracy == 0.38
    hits, n = 0, 2500
    for i in range(n):
        meta = sample_meta(cfg, 0, "pseudo_label", i)
        weak = COMPACT_COT_RE.fullmatch(syn_text.weak_cot_text(meta, "compact"))
        hits += weak.group(2) == answer_of(meta)
    assert abs(hits / n - 0.38) < 0.03  # 3 binomial standard deviations (measured 0.380)
    s = split_view(syn.generate_sample(cfg, 0, "pseudo_label", 0), "pseudo_label")
    assert s.answer is None and s.answer_cot is None
    assert COMPACT_COT_RE.fullmatch(s.weak_cot)
    assert re.fullmatch(r"A: [a-z ,]+\. B: [a-z ,]+\. C: [a-z ,]+\. D: [a-z ,]+\.", s.caption)


def test_text_style_is_checked():
    with pytest.raises(ValueError, match="text_style"):
        syn.SyntheticConfig(text_style="terse")


def test_split_view_keeps_the_fields_of_table_1():
    s = syn.generate_sample(syn.SyntheticConfig(image_size=48), 0, "x", 0)
    train, test = split_view(s, "train"), split_view(s, "test")
    pseudo, explore = split_view(s, "pseudo_label"), split_view(s, "exploration")
    assert train.answer and train.answer_cot and train.caption and not train.dimensions
    assert test.answer and test.caption is None and test.answer_cot is None
    assert (
        pseudo.answer is None and pseudo.answer_cot is None and pseudo.caption and pseudo.weak_cot
    )
    assert explore.answer is explore.caption is explore.weak_cot is explore.answer_cot is None


def test_config_yaml_matches_the_defaults():
    conf = yaml.safe_load((REPO / "conf" / "data" / "synthetic.yaml").read_text())
    assert conf["synthetic"]["generator"] == asdict(syn.SyntheticConfig())


def test_config_rejects_bad_knobs():
    with pytest.raises(ValueError, match="unknown defect families"):
        syn.SyntheticConfig(family_weights={"glitter": 1.0})
    with pytest.raises(ValueError, match="defect_strength"):
        syn.SyntheticConfig(defect_strength=1.5)


# --- files, CLI and stream -----------------------------------------------------------------


def test_write_dataset_round_trips_through_load_manifest(tmp_path, monkeypatch):
    cfg, sizes = (
        syn.SyntheticConfig(image_size=48),
        {"train": 3, "val": 2, "test": 2, "pseudo_label": 2, "exploration": 1},
    )
    assert not syn.dataset_complete(tmp_path, sizes, cfg, 7)
    manifests = syn.write_dataset(tmp_path, sizes, cfg, seed=7, progress=False)
    assert syn.dataset_complete(tmp_path, sizes, cfg, 7)
    assert not syn.dataset_complete(tmp_path, sizes | {"train": 4}, cfg, 7)
    assert not syn.dataset_complete(tmp_path, sizes, cfg, 8)
    for split in SPLITS:
        records, report = load_manifest(manifests[split])
        assert len(records) == sizes[split] and not report.skipped
    test_records, _ = load_manifest(manifests["test"])
    r = test_records[1]
    s = syn.generate_sample(cfg, 7, "test", 1)
    assert r.id == s.id and r.answer == s.answer and r.dimensions == s.dimensions
    assert r.caption is None and r.answer_cot is None
    on_disk = [np.asarray(Image.open(path).convert("RGB")) for path in r.images]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(on_disk, s.images, strict=True))
    pseudo, _ = load_manifest(manifests["pseudo_label"])
    assert pseudo[0].answer is None and pseudo[0].weak_cot and pseudo[0].answer_cot is None
    val, _ = load_manifest(manifests["val"])  # held out like test, its own samples
    assert [r.id for r in val] == ["val-000000", "val-000001"] and val[0].answer_cot is None
    assert val[0].answer == syn.generate_sample(cfg, 7, "val", 0).answer
    assert not {r.original for r in val} & {r.original for r in test_records}


def _mtimes(root):
    return {p: p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_write_dataset_is_whole_or_absent_and_never_repeated(tmp_path, monkeypatch):
    cfg, sizes = syn.SyntheticConfig(image_size=32), {"train": 2, "test": 1}
    root = tmp_path / "data"
    syn.write_dataset(root, sizes, cfg, progress=False)
    before = _mtimes(root)
    assert syn.dataset_complete(root, sizes, cfg, 0) and len(before) > 10
    syn.write_dataset(root, sizes, cfg, progress=False)  # the same dataset: nothing rewritten
    assert _mtimes(root) == before

    # a write that dies half way leaves no folder under the final name, nor its temporary one
    def boom(path, records):
        raise RuntimeError("disk full")

    other = tmp_path / "other"
    with monkeypatch.context() as m:
        m.setattr(syn_dataset, "write_manifest", boom)
        with pytest.raises(RuntimeError, match="disk full"):
            syn.write_dataset(other, sizes, cfg, progress=False)
        assert not other.exists() and not list(tmp_path.glob(".other.tmp-*"))
        # nor does a rewrite of another dataset's folder that dies: the old one stays whole
        with pytest.raises(RuntimeError, match="disk full"):
            syn.write_dataset(root, sizes | {"train": 3}, cfg, progress=False)
        assert _mtimes(root) == before
    syn.write_dataset(other, sizes, cfg, progress=False)  # the next write completes
    assert syn.dataset_complete(other, sizes, cfg, 0)
    syn.write_dataset(root, sizes | {"train": 3}, cfg, progress=False)  # another dataset: replaced
    assert syn.dataset_complete(root, sizes | {"train": 3}, cfg, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "data",
        "data.lock",
        "other",
        "other.lock",
    ]


def test_concurrent_write_waits_for_the_lock_then_reads_the_finished_folder(tmp_path):
    cfg, sizes = syn.SyntheticConfig(image_size=32), {"train": 1, "test": 1}
    root = tmp_path / "data"
    with folder_lock(root):  # another job is writing `root`
        waiter = threading.Thread(
            target=syn.write_dataset, args=(root, sizes, cfg), kwargs={"progress": False}
        )
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and not root.exists()
        syn.write_dataset(tmp_path / "elsewhere", sizes, cfg, progress=False)
        (tmp_path / "elsewhere").rename(root)  # the other job's finished folder
        before = _mtimes(root)
    waiter.join(timeout=60)
    assert not waiter.is_alive() and _mtimes(root) == before  # found it finished: no rewrite


def test_data_folder_is_named_by_what_makes_the_data(compose_cfg):
    def root(*overrides):
        return compose_cfg("train", ["data=synthetic_cpu", *overrides]).data.root

    base = root()
    assert base != root("data.synthetic.generator.defect_strength=0.9")
    assert base != root("data.synthetic.seed=1") != root("data.synthetic.sizes.val=8")
    assert base == root("data.synthetic.workers=2")  # how it is made is not what it is
    assert base == root("data.synthetic.generator.defect_strength=1.0")  # (the cpu value)
    sizes, cfg, seed = syn.dataset_args(compose_cfg("train", ["data=synthetic_cpu"]).data.synthetic)
    assert base.endswith("/synthetic-cpu-" + syn.dataset_digest(sizes, cfg, seed))
    paper = compose_cfg("train", ["data=synthetic_cpu_paper"]).data
    assert paper.root != base and paper.val_split == "val" and paper.eval_split == "test"


def test_write_dataset_with_workers_matches_one_process(tmp_path):
    cfg, sizes = syn.SyntheticConfig(image_size=40), {"train": 6, "test": 0}
    one = syn.write_dataset(tmp_path / "one", sizes, cfg, seed=1, progress=False)
    two = syn.write_dataset(tmp_path / "two", sizes, cfg, seed=1, workers=2, progress=False)
    assert one["train"].read_text() == two["train"].read_text()


def test_cli_writes_a_dataset_and_has_help(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        syn_dataset.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--paper-sizes" in help_text and "--defect-strength" in help_text
    run = [sys.executable, "-m", "hcm.data.synthetic"]
    args = ["--out", str(tmp_path), "--train", "2", "--test", "1", "--pseudo-label", "1"]
    subprocess.run([*run, *args, "--image-size", "40", "--no-progress"], check=True, cwd=REPO)
    records, _ = load_manifest(tmp_path / "train.jsonl")
    assert [r.id for r in records] == ["train-000000", "train-000001"]
    marker = json.loads((tmp_path / syn_dataset.MARKER).read_text())
    assert marker["sizes"] == {"train": 2, "val": 0, "test": 1, "pseudo_label": 1, "exploration": 0}
    assert marker["config"]["image_size"] == 40


def _stream_ids(stream, workers):
    ids = []
    for w in range(workers):
        info = type("Info", (), {"id": w, "num_workers": workers})
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.utils.data, "get_worker_info", lambda info=info: info)
            ids.append([s.id for s in stream])
    return ids


def test_stream_workers_and_ranks_draw_distinct_reproducible_samples():
    cfg = syn.SyntheticConfig(image_size=32)
    streams = [syn.SyntheticStream(cfg, 0, 16, rank=r, world_size=2) for r in range(2)]
    ids = [_stream_ids(s, 2) for s in streams]
    flat = [i for rank in ids for worker in rank for i in worker]
    assert len(flat) == len(set(flat)) == 16  # each rank 8 samples, split over its 2 workers
    assert ids[0][1] == [
        "stream-e0-000002",
        "stream-e0-000006",
        "stream-e0-000010",
        "stream-e0-000014",
    ]
    assert _stream_ids(streams[0], 2) == ids[0]  # reproducible
    streams[0].set_epoch(1)
    assert _stream_ids(streams[0], 2)[0][0] == "stream-e1-000000"
    a, b = next(iter(streams[0])), syn.generate_sample(cfg, 0, "stream-e1", 0)
    assert a.images[1].tobytes() == b.images[1].tobytes()


def test_stream_through_a_dataloader_with_two_workers():
    stream = syn.SyntheticStream(syn.SyntheticConfig(image_size=32), seed=0, samples_per_epoch=6)
    loader = torch.utils.data.DataLoader(stream, batch_size=1, num_workers=2, collate_fn=list)
    ids = [batch[0].id for batch in loader]
    assert sorted(ids) == [f"stream-e0-{i:06d}" for i in range(6)]
