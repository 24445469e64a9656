"""Hostile and broken inputs (issue 7): each is refused with an error naming the file, line,
record and field, or converted correctly; none crashes deep inside a training step.

Complements tests/test_records.py (which covers `..`, an absolute path, a symlinked file out of
the root, a missing original, a non-UTF-8 id, duplicate ids, answer=3 and bad answer letters).

Hostile cases covered here: 63, in 62 tests (2 of them inputs that must be accepted).
- Manifest lines (10): a huge line in the middle and one without a final newline (the next
  record still loads), reads bounded by the line limit, bytes that are not UTF-8, a UTF-8 BOM
  (accepted), JSON nested too deeply, an integer too long to convert, a key given twice, a lone
  surrogate escape, a line that is not a JSON object.
- Field types (24, table-driven): answer as list / null / true / "" / object in a labelled split;
  candidates as a 4-letter string / object / 5 paths / ints / null; dimensions as a string / a
  list holding an int / a repeated dimension; id as int / list / with an ANSI escape / too long;
  meta as list / 0 / ""; a text field as a list; an unknown field in an unlabelled split; and a
  megabyte-long wrong value whose error message stays short.
- Paths (9): `..` hidden after a real folder, `//` absolute, a NUL byte, a symlinked folder out
  of the root, a symlink loop, a missing candidate, a directory, a FIFO, a zero-byte image with
  check_images.
- Images (17): a PNG bomb past PIL's limit, one past ours (MAX_PIXELS), truncated PNG and JPEG,
  a zero-byte file, a directory, a text file, an EPS file (refused unopened: PIL would run
  Ghostscript), and conversions checked pixel by pixel: CMYK JPEG, palette PNG with
  transparency, 16-bit greyscale PNG, a 32-bit "I" image holding 8-bit values, LA, RGBA, L and
  RGB PNGs with a tRNS colour key, and an EXIF-rotated JPEG.
- Where errors surface (3): load_sample names record and field; so does a DataLoader worker;
  check_images reports a bomb at manifest load, with line and field.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import make_screening_root
from PIL import Image
from torch.utils.data import DataLoader

from hcm.data import manifest as manifest_mod
from hcm.data.datasets import SampleDataset
from hcm.data.manifest import ManifestError, load_manifest
from hcm.data.records import load_sample
from hcm.images import ImageError, decode_image, load_image, probe_image


def make_root(root: Path, n: int = 2) -> list[dict]:
    return make_screening_root(root, n, answer="A")


def write_raw(path: Path, lines: list[bytes | dict]) -> Path:
    path.write_bytes(
        b"".join(x if isinstance(x, bytes) else json.dumps(x).encode() + b"\n" for x in lines)
    )
    return path


def png_with_header(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring width x height, with one tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def noisy(mode: str = "RGB", size: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode)


# -- manifest lines ------------------------------------------------------------------------------
@pytest.mark.parametrize("final_newline", [True, False])
def test_huge_line_is_refused_in_bounded_reads_and_the_next_line_loads(
    tmp_path, monkeypatch, final_newline
):
    monkeypatch.setattr(manifest_mod, "MAX_LINE_BYTES", 1000)
    rows = make_root(tmp_path)
    huge = b'{"id": "' + b"x" * 5000 + b'"}' + (b"\n" if final_newline else b"")
    lines = [rows[0], huge, rows[1]] if final_newline else [rows[0], rows[1], huge]
    path = write_raw(tmp_path / "train.jsonl", lines)
    records, report = load_manifest(path, skip_invalid=True)
    assert [r.id for r in records] == ["s0", "s1"]
    (err,) = report.skipped
    assert err.line == (2 if final_newline else 3)
    assert f"line is {len(huge)} bytes (limit 1000)" in str(err)


def test_lines_never_reads_more_than_the_limit_at_once():
    sizes: list[int] = []

    class Recording(io.BytesIO):
        def readline(self, size=-1):
            sizes.append(size)
            return super().readline(size)

    f = Recording(b"ok\n" + b"y" * 10_000 + b"\nlast")
    assert list(manifest_mod._lines(f, 100)) == [(b"ok\n", 3), (None, 10_001), (b"last", 4)]
    assert sizes and all(0 < s <= 101 for s in sizes)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"id": "s9", "caption": "caf\xe9"}\n', r"train.jsonl:2: not valid UTF-8 .* at byte 28"),
        (b"[" * 100_000 + b"\n", "nested too deeply"),
        (b'{"id": "s9", "meta": {"n": ' + b"9" * 5000 + b"}}\n", "invalid JSON: .*digits"),
        (b'"just a string"\n', "must be a JSON object, got str"),
    ],
)
def test_undecodable_lines_name_file_and_line(tmp_path, line, message):
    rows = make_root(tmp_path)
    path = write_raw(tmp_path / "train.jsonl", [rows[0], line])
    with pytest.raises(ManifestError, match=message) as err:
        load_manifest(path)
    assert (err.value.line, err.value.field) == (2, None)


def test_utf8_bom_at_the_start_is_accepted(tmp_path):
    rows = make_root(tmp_path)
    path = write_raw(
        tmp_path / "train.jsonl", [b"\xef\xbb\xbf" + json.dumps(rows[0]).encode() + b"\n"]
    )
    records, _ = load_manifest(path)
    assert records[0].id == "s0"


def test_duplicate_key_and_lone_surrogate_name_the_field(tmp_path):
    rows = make_root(tmp_path)
    twice = json.dumps(rows[1])[:-1] + ', "answer": "B"}'
    with pytest.raises(ManifestError, match="field 'answer' is given more than once"):
        load_manifest(write_raw(tmp_path / "train.jsonl", [rows[0], twice.encode() + b"\n"]))
    surrogate = json.dumps({**rows[1], "caption": "x"}).replace('"x"', '"\\ud800"')
    with pytest.raises(ManifestError, match="field 'caption' holds a lone surrogate") as err:
        load_manifest(write_raw(tmp_path / "test.jsonl", [rows[0], surrogate.encode() + b"\n"]))
    assert err.value.line == 2


# -- field types ---------------------------------------------------------------------------------
BIG = "z" * (1 << 19)


@pytest.mark.parametrize(
    ("split", "change", "field", "message"),
    [
        ("train", {"answer": ["A"]}, "answer", "non-empty string, got \\['A'\\]"),
        ("train", {"answer": None}, "answer", "missing in labelled split 'train'"),
        ("test", {"answer": True}, "answer", "non-empty string, got True"),
        ("train", {"answer": ""}, "answer", "non-empty string"),
        ("train", {"answer": {"A": 1}}, "answer", "non-empty string"),
        ("train", {"candidates": "ABCD"}, "candidates", "list of 4 paths"),
        ("train", {"candidates": {"A": "a.png"}}, "candidates", "list of 4 paths"),
        ("train", {"candidates": ["images/s1/A.png"] * 5}, "candidates", "list of 4 paths"),
        ("train", {"candidates": [1, 2, 3, 4]}, "candidates[0]", "path string, got 1"),
        ("train", {"candidates": None}, "candidates", r"list of 4 paths \(A-D\), got None"),
        ("test", {"dimensions": "physical_shadow"}, "dimensions", "list of strings"),
        ("test", {"dimensions": ["physical_shadow", 2]}, "dimensions", "list of strings"),
        ("test", {"dimensions": ["physical_shadow"] * 2}, "dimensions", "repeats a dimension"),
        ("train", {"id": 7}, "id", "non-empty string, got 7"),
        ("train", {"id": ["s1"]}, "id", "non-empty string"),
        ("train", {"id": "s1\x1b[31m"}, "id", "printable"),
        ("train", {"id": "s" * 300}, "id", "at most 256 characters"),
        ("train", {"meta": ["a"]}, "meta", "must be an object, got list"),
        ("train", {"meta": 0}, "meta", "must be an object, got int"),
        ("train", {"meta": ""}, "meta", "must be an object, got str"),
        ("pseudo_label", {"weak_cot": ["a"]}, "weak_cot", "must be a string, got list"),
        ("exploration", {"anwser": "A"}, "anwser", "unknown field.*'anwser'"),
        ("train", {"dimensions": None}, None, None),  # null = no dimensions: accepted
        ("train", {"answer": [BIG]}, "answer", "non-empty string, got \\['zzz"),
    ],
)
def test_wrong_field_types_name_the_field(tmp_path, split, change, field, message):
    rows = make_root(tmp_path)
    rows[1].update(change)
    path = write_raw(tmp_path / f"{split}.jsonl", rows)
    if message is None:
        records, _ = load_manifest(path)
        assert records[1].dimensions == ()
        return
    with pytest.raises(ManifestError, match=message) as err:
        load_manifest(path)
    assert (err.value.line, err.value.field) == (2, field)
    assert f"{split}.jsonl:2: field '{field}'" in str(err.value)
    assert len(str(err.value)) < 600  # a megabyte-long value is quoted cut short


# -- paths ---------------------------------------------------------------------------------------
def _fifo(root: Path) -> str:
    os.mkfifo(root / "images" / "fifo.png")
    return "images/fifo.png"


def _dir_link_out(root: Path) -> str:
    outside = root.parent / "outside"
    outside.mkdir()
    Image.new("RGB", (4, 4)).save(outside / "a.png")
    (root / "images" / "out").symlink_to(outside, target_is_directory=True)
    return "images/out/a.png"


def _loop(root: Path) -> str:
    (root / "images" / "l1").symlink_to(root / "images" / "l2")
    (root / "images" / "l2").symlink_to(root / "images" / "l1")
    return "images/l1"


def _empty(root: Path) -> str:
    (root / "images" / "empty.png").write_bytes(b"")
    return "images/empty.png"


@pytest.mark.parametrize(
    ("make_path", "message"),
    [
        (lambda root: "images/s1/../../../outside.png", "escapes the dataset root"),
        (lambda root: "//etc/passwd", "absolute path"),
        (lambda root: "images/s1/A.png\x00.txt", "NUL byte"),
        (_dir_link_out, "escapes the dataset root"),
        (_loop, "symlink loop|cannot stat|not found"),
        (lambda root: "images/s1/nope.png", "image file not found"),
        (lambda root: "images/s1", "not a regular file"),
        (_fifo, "not a regular file"),
        (_empty, "not an image in a supported format"),
    ],
)
def test_bad_candidate_paths_are_refused_naming_the_field(tmp_path, make_path, message):
    root = tmp_path / "root"
    rows = make_root(root)
    rows[1]["candidates"][2] = make_path(root)
    path = write_raw(root / "train.jsonl", rows)
    with pytest.raises(ManifestError, match=message) as err:
        load_manifest(path, check_images=True)
    assert (err.value.line, err.value.field) == (2, "candidates[2]")


# -- images --------------------------------------------------------------------------------------
def _truncated(fmt: str):
    def make(path: Path) -> None:
        buf = io.BytesIO()
        noisy().save(buf, fmt)
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])

    return make


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(png_with_header(100_000, 100_000)), "decompression bomb"),
        (lambda p: p.write_bytes(b""), "not an image in a supported format"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_text("id,answer\ns0,A\n"), "not an image in a supported format"),
        (
            lambda p: p.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"),
            "supported",
        ),
        (_truncated("PNG"), "cannot decode image"),
        (_truncated("JPEG"), "cannot decode image"),
    ],
)
def test_broken_images_raise_image_error_naming_the_file(tmp_path, make, message):
    path = tmp_path / "img.png"
    make(path)
    with pytest.raises(ImageError, match=message) as err:
        load_image(path)
    assert str(err.value).startswith(str(path))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(png_with_header(100_000, 100_000)), "decompression bomb"),
        (lambda p: p.write_bytes(b""), "not an image in a supported format"),
        (
            lambda p: p.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"),
            "supported",
        ),
        (_truncated("PNG"), "cannot decode image"),
    ],
)
def test_in_memory_images_are_refused_alike_naming_them(tmp_path, make, message):
    # the public benchmarks' images come as bytes from parquet cells
    path = tmp_path / "img.png"
    make(path)
    with pytest.raises(ImageError, match=message) as err:
        decode_image(path.read_bytes(), "rwqa-0003 image 0")
    assert str(err.value).startswith("rwqa-0003 image 0: ")


def test_our_pixel_limit_applies_before_decoding(tmp_path):
    noisy(size=100).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="100x100 image exceeds 5000 pixels"):
        probe_image(tmp_path / "big.png", max_pixels=5000)
    assert probe_image(tmp_path / "big.png") == (100, 100)


def pixels(image: Image.Image) -> list[tuple[int, ...]]:
    assert image.mode == "RGB"
    return [tuple(int(v) for v in p) for p in np.asarray(image).reshape(-1, 3)]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    im = Image.new("CMYK", (16, 8), (0, 0, 0, 0))  # left half white
    im.paste((255, 0, 0, 0), (8, 0, 16, 8))  # right half full cyan
    im.save(tmp_path / "c.jpg", quality=100)
    out = np.asarray(load_image(tmp_path / "c.jpg"), dtype=int)
    assert np.abs(out[4, 2] - (255, 255, 255)).max() <= 3
    assert np.abs(out[4, 13] - (0, 255, 255)).max() <= 3


def test_palette_png_with_transparency_composites_over_white(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    im.save(tmp_path / "p.png", transparency=0)
    assert pixels(load_image(tmp_path / "p.png")) == [(255, 255, 255), (200, 0, 0)]


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert [p[0] for p in pixels(load_image(tmp_path / "g16.png"))] == [0, 1, 128, 255]


def test_32_bit_image_of_8_bit_values_is_not_stretched(tmp_path):
    Image.fromarray(np.array([[0, 100]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    assert pixels(load_image(tmp_path / "i.tif")) == [(0, 0, 0), (100, 100, 100)]


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("LA", [(0, 0), (0, 255), (0, 128)], [(255, 255, 255), (0, 0, 0), (127, 127, 127)]),
        ("RGBA", [(255, 0, 0, 128), (0, 0, 255, 0)], [(255, 127, 127), (255, 255, 255)]),
    ],
)
def test_alpha_is_composited_over_white(tmp_path, mode, values, expected):
    im = Image.new(mode, (len(values), 1))
    for x, v in enumerate(values):
        im.putpixel((x, 0), v)
    im.save(tmp_path / "a.png")
    assert pixels(load_image(tmp_path / "a.png")) == expected


@pytest.mark.parametrize(
    ("mode", "key", "other"),
    [("L", 7, 200), ("RGB", (1, 2, 3), (9, 8, 7))],
)
def test_trns_colour_key_is_transparent(tmp_path, mode, key, other):
    im = Image.new(mode, (2, 1), key)
    im.putpixel((1, 0), other)
    im.save(tmp_path / "t.png", transparency=key)
    opaque = (other,) * 3 if mode == "L" else other
    assert pixels(load_image(tmp_path / "t.png")) == [(255, 255, 255), opaque]


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (16, 8), (255, 255, 255))
    im.paste((0, 0, 0), (0, 0, 8, 8))  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turns it 90 degrees clockwise
    im.save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = np.asarray(load_image(tmp_path / "r.jpg"), dtype=int)
    assert out.shape == (16, 8, 3)  # upright: 8 wide, 16 high
    assert out[2, 4].max() < 20 and out[13, 4].min() > 235  # black on top after the turn


# -- where errors surface ------------------------------------------------------------------------
def _bad_candidate(tmp_path: Path):
    rows = make_root(tmp_path)
    bad = tmp_path / "images" / "s1" / "C.png"
    buf = io.BytesIO()
    noisy().save(buf, "PNG")
    bad.write_bytes(buf.getvalue()[:200])  # header fine, pixel stream truncated
    records, _ = load_manifest(write_raw(tmp_path / "train.jsonl", rows), check_images=True)
    return records


def test_load_sample_names_record_and_field(tmp_path):
    records = _bad_candidate(tmp_path)  # the header probe passes: truncation shows on decoding
    assert load_sample(records[0]).images[0].size == (8, 8)
    with pytest.raises(ImageError, match=r"^record s1 field 'candidates\[2\]': .*C.png: cannot"):
        load_sample(records[1])


def test_dataloader_worker_error_names_record_and_field(tmp_path):
    records = _bad_candidate(tmp_path)
    loader = DataLoader(SampleDataset(records), batch_size=1, num_workers=1, collate_fn=list)
    with pytest.raises(
        ImageError, match=r"(?s)worker process 0.*record s1 field 'candidates\[2\]'"
    ):
        list(loader)


def test_check_images_reports_a_bomb_at_manifest_load(tmp_path):
    rows = make_root(tmp_path)
    (tmp_path / "images" / "s1" / "B.png").write_bytes(png_with_header(100_000, 100_000))
    path = write_raw(tmp_path / "train.jsonl", rows)
    with pytest.raises(ManifestError, match="decompression bomb") as err:
        load_manifest(path, check_images=True)
    assert (err.value.line, err.value.field) == (2, "candidates[1]")
    records, _ = load_manifest(path)  # header checks off: found only when decoding
    with pytest.raises(ImageError, match=r"record s1 field 'candidates\[1\]'.*bomb"):
        load_sample(records[1])
