"""Hard-case classification and the cache file: round trip, corruption, checksums, matching."""

import json

import numpy as np
import pytest

from hcm.data.hard_cases import HardCaseFileError, HardCaseSet, _field_sha256
from hcm.mining import classify

SHA = "ab" * 32
PARAMS = {"greedy": True, "k": 1, "pass_threshold": 1.0, "prompt": "cot"}


@pytest.mark.parametrize(
    ("correct", "threshold", "hard", "easy"),
    [
        # greedy k=1: wrong = hard, right = easy, for any threshold in (0, 1]
        ({"b": [False], "a": [True], "c": [True]}, 1.0, ["b"], ["a", "c"]),
        ({"b": [False], "a": [True]}, 0.01, ["b"], ["a"]),
        # k=4: pass rates s1 1.0, s2 0.75, s3 0.25, s4 0.0
        (
            {
                "s1": [True] * 4,
                "s2": [True, True, False, True],
                "s3": [False, True, False, False],
                "s4": [False] * 4,
            },
            1.0,
            ["s2", "s3", "s4"],
            ["s1"],
        ),
        (
            {"s2": [True, True, False, True], "s3": [False, True, False, False]},
            0.75,  # the boundary is inclusive
            ["s3"],
            ["s2"],
        ),
        ({"s3": [False, True, False, False], "s4": [False] * 4}, 0.25, ["s4"], ["s3"]),
        ({"x": [np.True_], "y": [np.False_]}, 1.0, ["y"], ["x"]),
        ({}, 1.0, [], []),
    ],
)
def test_classify(correct, threshold, hard, easy):
    assert classify(correct, threshold) == (hard, easy)


def test_classify_sorts_ids():
    ids = [f"train-{i:03d}" for i in (5, 1, 9, 3)]
    hard, easy = classify({i: [n % 2 == 0] for n, i in enumerate(ids)})
    assert hard == ["train-001", "train-003"] and easy == ["train-005", "train-009"]


@pytest.mark.parametrize(
    ("correct", "threshold", "match"),
    [
        ({"a": []}, 1.0, "no answers"),
        ({"a": [1]}, 1.0, "bools"),
        ({"a": [True]}, 0.0, r"\(0, 1\]"),
        ({"a": [True]}, 1.5, r"\(0, 1\]"),
        ({"": [True]}, 1.0, "non-empty strings"),
    ],
)
def test_classify_errors(correct, threshold, match):
    with pytest.raises(ValueError, match=match):
        classify(correct, threshold)


def make_set(**overrides):
    args = {
        "hard_ids": ("t3", "t1"),
        "easy_ids": ("t2", "t4"),
        "model": "outputs/sft/last.ckpt",
        "fingerprint": "f00d",
        "manifest_sha256": SHA,
        "params": PARAMS,
        "created": "2026-11-23T10:00:00+00:00",
    }
    return HardCaseSet(**{**args, **overrides})


def test_round_trip(tmp_path):
    cases = make_set(params={**PARAMS, "layouts": ("grid",)})
    path = cases.save(tmp_path / "sub" / "hard_cases.json")
    loaded = HardCaseSet.load(path)
    assert loaded == cases
    assert loaded.hard_ids == ("t1", "t3")  # stored sorted
    assert loaded.params["layouts"] == ["grid"]
    assert [p.name for p in path.parent.iterdir()] == ["hard_cases.json"]  # no temp file left


def test_created_defaults_to_an_utc_timestamp():
    created = HardCaseSet(("a",), (), "m", "fp", SHA, {}).created
    assert created.endswith("+00:00") and created[:2] == "20"


def _edit(path, fn):
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d["content"]["hard_ids"].append("t9"), "content.hard_ids"),
        (lambda d: d["content"].update(model="other"), "content.model"),
        (lambda d: d["content"]["params"].update(k=8), "content.params"),
        (lambda d: d["sha256"].update(easy_ids="0" * 64), "content.easy_ids"),
        (lambda d: d["content"].pop("fingerprint"), "content.fingerprint"),
        (lambda d: d.update(schema_version=2), "schema_version"),
        (lambda d: d.update(content=[]), "content"),
    ],
)
def test_edited_file_names_the_field(tmp_path, edit, field):
    path = make_set().save(tmp_path / "h.json")
    _edit(path, edit)
    with pytest.raises(HardCaseFileError) as err:
        HardCaseSet.load(path)
    assert err.value.field == field
    assert str(path) in str(err.value)


def test_checksum_mismatch_message(tmp_path):
    path = make_set().save(tmp_path / "h.json")
    _edit(path, lambda d: d["content"]["easy_ids"].remove("t2"))
    with pytest.raises(HardCaseFileError, match=r"easy_ids.*does not match its sha256"):
        HardCaseSet.load(path)


def test_consistent_but_invalid_content_is_refused(tmp_path):
    # a writer that recomputes checksums still cannot smuggle in an id that is hard and easy
    path = make_set().save(tmp_path / "h.json")
    doc = json.loads(path.read_text())
    doc["content"]["easy_ids"].append("t1")
    doc["sha256"]["easy_ids"] = _field_sha256(doc["content"]["easy_ids"])
    path.write_text(json.dumps(doc))
    with pytest.raises(HardCaseFileError, match="both hard and easy") as err:
        HardCaseSet.load(path)
    assert err.value.field == "content.easy_ids"


@pytest.mark.parametrize("cut", [0, 1, 40, -3])
def test_truncated_file(tmp_path, cut):
    path = make_set().save(tmp_path / "h.json")
    text = path.read_text()
    path.write_text(text[:cut] if cut >= 0 else text[:cut].rstrip("}\n "))
    with pytest.raises(HardCaseFileError, match="not valid JSON"):
        HardCaseSet.load(path)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(HardCaseFileError, match="not found"):
        HardCaseSet.load(tmp_path / "absent.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(HardCaseFileError, match="UTF-8"):
        HardCaseSet.load(tmp_path / "bin.json")


def test_a_cache_matches_only_with_every_provenance_field():
    cases = make_set()
    same = {"model": cases.model, "fingerprint": "f00d", "manifest_sha256": SHA, "params": PARAMS}
    assert cases.mismatches(**same) == []
    assert cases.mismatches(**{**same, "params": dict(reversed(PARAMS.items()))}) == []  # key order
    for key, value in [
        ("model", "other.ckpt"),
        ("fingerprint", "beef"),
        ("manifest_sha256", "cd" * 32),
        ("params", {**PARAMS, "k": 4}),
        ("params", {k: v for k, v in PARAMS.items() if k != "prompt"}),
    ]:
        assert [m.split(":")[0] for m in cases.mismatches(**{**same, key: value})] == [key]


def test_indices_maps_hard_ids_to_dataset_positions():
    cases = make_set()
    assert cases.indices(["t4", "t3", "t2", "t1"]) == [1, 3]
    assert cases.indices(["t1", "x", "t3"]) == [0, 2]
    with pytest.raises(ValueError, match=r"not in the dataset, e.g. \['t3'\]"):
        cases.indices(["t1", "t2"])
    with pytest.raises(ValueError, match="appears twice"):
        cases.indices(["t1", "t3", "t1"])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"easy_ids": ("t1",)}, "both hard and easy"),
        ({"hard_ids": ("t1", "t1")}, "repeated"),
        ({"hard_ids": "t1"}, "list of non-empty id strings"),
        ({"manifest_sha256": "abc"}, "64 lowercase hex"),
        ({"created": "yesterday"}, "ISO 8601"),
        ({"model": ""}, "model"),
        ({"params": {"f": object()}}, "plain JSON"),
    ],
)
def test_constructor_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_set(**overrides)
