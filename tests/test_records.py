"""The manifest contract: validation errors name file, line and field; writing is atomic."""

import json
from pathlib import Path

import pytest
from helpers import make_screening_root
from PIL import Image

from hcm.data.manifest import ManifestError, load_manifest, manifest_hash, write_manifest
from hcm.data.records import ScreeningRecord
from hcm.screening import canonical_answer


def make_root(tmp_path: Path, n: int = 2) -> list[dict]:
    return make_screening_root(
        tmp_path,
        n,
        answer="CA",
        dimensions=["physical_shadow"],
        answer_cot="<think>t</think><answer>AC</answer>",
    )


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_round_trip_and_canonical_answer(tmp_path):
    rows = make_root(tmp_path)
    records, report = load_manifest(write_lines(tmp_path / "train.jsonl", rows))
    assert report.loaded == 2 and not report.skipped
    assert records[0].answer == "AC"  # canonicalised
    assert records[0].candidates[2] == (tmp_path / "images/s0/C.png").resolve()
    out = write_manifest(tmp_path / "copy" / ".." / "test.jsonl", records)
    again, _ = load_manifest(out)
    assert again == records


@pytest.mark.parametrize(
    ("mutate", "field", "message"),
    [
        (lambda r: r.update(answer="AE"), "answer", "unknown option"),
        (lambda r: r.update(answer="NA"), "answer", "cannot be mixed"),
        (lambda r: r.update(answer="AA"), "answer", "duplicate letters"),
        (lambda r: r.pop("answer"), "answer", "missing in labelled split 'train'"),
        (lambda r: r.update(answer=3), "answer", "non-empty string"),
        (lambda r: r.update(candidates=r["candidates"][:3]), "candidates", "list of 4"),
        (lambda r: r.update(original="images/nope.png"), "original", "not found"),
        (lambda r: r.update(original="../../etc/passwd"), "original", "escapes the dataset root"),
        (lambda r: r.update(original="/etc/passwd"), "original", "absolute path"),
        (lambda r: r.update(dimensions=["lighting"]), "dimensions", "unknown dimension"),
        (lambda r: r.update(caption=5), "caption", "must be a string"),
        (lambda r: r.update(id=""), "id", "non-empty string"),
    ],
)
def test_bad_record_names_file_line_field(tmp_path, mutate, field, message):
    rows = make_root(tmp_path)
    mutate(rows[1])
    path = write_lines(tmp_path / "train.jsonl", rows)
    with pytest.raises(ManifestError, match=message) as err:
        load_manifest(path)
    assert (err.value.line, err.value.field) == (2, field)
    assert f"train.jsonl:2: field '{field}'" in str(err.value)


def test_duplicate_ids_and_broken_lines(tmp_path):
    rows = make_root(tmp_path)
    rows[1]["id"] = "s0"
    with pytest.raises(ManifestError, match="duplicate id 's0' \\(first on line 1\\)"):
        load_manifest(write_lines(tmp_path / "train.jsonl", rows))
    with pytest.raises(ManifestError, match="invalid JSON") as err:
        load_manifest(write_lines(tmp_path / "test.jsonl", [rows[0], "{not json"]))
    assert err.value.line == 2
    (tmp_path / "x.jsonl").write_bytes(b'{"id": "\xff"}\n')
    with pytest.raises(ManifestError, match="UTF-8"):
        load_manifest(tmp_path / "x.jsonl")


def test_symlink_out_of_root_is_refused(tmp_path):
    rows = make_root(tmp_path / "root")
    outside = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(outside)
    (tmp_path / "root/images/link.png").symlink_to(outside)
    rows[0]["original"] = "images/link.png"
    with pytest.raises(ManifestError, match="escapes"):
        load_manifest(write_lines(tmp_path / "root/train.jsonl", rows))


def test_skip_invalid_reports_which(tmp_path):
    rows = make_root(tmp_path, n=3)
    rows[1]["answer"] = "Z"
    records, report = load_manifest(write_lines(tmp_path / "train.jsonl", rows), skip_invalid=True)
    assert [r.id for r in records] == ["s0", "s2"]
    assert [(e.line, e.field) for e in report.skipped] == [(2, "answer")]


def test_unlabelled_splits_allow_missing_answer(tmp_path):
    rows = make_root(tmp_path)
    for r in rows:
        r.pop("answer")
    records, _ = load_manifest(write_lines(tmp_path / "exploration.jsonl", rows))
    assert records[0].answer is None


def test_write_is_atomic_on_failure(tmp_path):
    rows = make_root(tmp_path)
    path = write_lines(tmp_path / "train.jsonl", rows)
    before = manifest_hash(path)
    records, _ = load_manifest(path)
    bad = ScreeningRecord("x", Path("/elsewhere/o.png"), records[0].candidates)  # not under root
    with pytest.raises(ValueError):
        write_manifest(path, [*records, bad])
    assert manifest_hash(path) == before  # the old manifest is intact
    assert not list(tmp_path.glob(".train.jsonl.*"))  # no temp file left behind


@pytest.mark.parametrize(("raw", "canon"), [("DCB", "BCD"), ("N", "N"), ("A", "A")])
def test_canonical_answer(raw, canon):
    assert canonical_answer(raw) == canon
