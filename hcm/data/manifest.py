"""The on-disk screening dataset: one JSONL manifest per split plus image files.

A manifest line is one sample (paths relative to the manifest's folder, which is the dataset root):

    {"id": "train-000001",
     "original": "images/train-000001/original.png",
     "candidates": ["images/train-000001/A.png", "...B.png", "...C.png", "...D.png"],
     "answer": "AC",                          # acceptable candidates, "N" when none
     "dimensions": ["physical_shadow"],       # defect dimensions the sample tests (test split)
     "caption": "...", "weak_cot": "...", "answer_cot": "...",   # optional texts
     "meta": {...}}                           # optional, free-form (the generator's metadata)

`answer` is required in the labelled splits (train, test) and optional elsewhere (the paper's
pseudo-label split carries only weakly-supervised texts, the exploration split nothing).
Loading validates every record up front; an error names the file, line and field. Nothing is
dropped silently: `skip_invalid=True` skips bad records and returns a report of which.

Manifests may be hostile. Refused, each naming the line and field: a line over MAX_LINE_BYTES
(read in bounded pieces, so a file without newlines never has to fit in memory), bytes that are
not UTF-8 (a leading BOM is allowed), JSON that is malformed, nested too deep or holds a number
too long to convert, a key given twice, an unknown top-level field (a typo such as "anwser"
would otherwise leave a label out silently), a string with a lone surrogate escape (not
encodable, it would fail later in the tokenizer), a wrong type in any field, an id with control
characters or over MAX_ID_CHARS, and an image path that is absolute, escapes the dataset root
(`..`, a symlink out, a symlink loop), holds a NUL byte, or names no regular file.
`check_images=True` also opens every image's header (hcm.images.probe_image: format,
size, decompression bombs) so that a bad image is reported here rather than mid-epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hcm.data.records import LABELLED_SPLITS, TEXT_FIELDS, ScreeningRecord
from hcm.files import atomic_write_text
from hcm.images import probe_image
from hcm.screening import DIMENSIONS, OPTIONS, canonical_answer, shown

MAX_LINE_BYTES = 1 << 20  # a manifest line is a few hundred bytes; anything near 1 MiB is hostile
MAX_ID_CHARS = 256
FIELDS = ("id", "original", "candidates", "answer", "dimensions", *TEXT_FIELDS, "meta")


class ManifestError(ValueError):
    """A bad manifest record, located by file, line (1-based) and field."""

    def __init__(self, path: Path | str, line: int | None, field_name: str | None, message: str):
        self.path, self.line, self.field, self.message = str(path), line, field_name, message
        where = self.path + (f":{line}" if line is not None else "")
        what = f" field '{field_name}'" if field_name else ""
        super().__init__(f"{where}:{what} {message}")


@dataclass(frozen=True)
class LoadReport:
    """What `load_manifest` skipped, when asked to skip invalid records."""

    path: str
    loaded: int
    skipped: tuple[ManifestError, ...] = ()


def resolve_inside(root: Path, relative: object, what: str) -> Path:
    """Resolve a manifest path against the dataset root, refusing anything that escapes it."""
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"{what} must be a non-empty relative path string, got {shown(relative)}")
    if "\x00" in relative:
        raise ValueError(f"{what} contains a NUL byte: {shown(relative)}")
    if os.path.isabs(relative):
        raise ValueError(f"{what} is an absolute path ({shown(relative)}); paths must be relative")
    root = root.resolve()
    try:
        resolved = (root / relative).resolve()  # follows symlinks: a link out of root is caught
    except RuntimeError:  # Python < 3.13 reports a symlink loop so; 3.13 leaves it unresolved
        raise ValueError(f"{what} {shown(relative)} is a symlink loop") from None
    except (OSError, UnicodeError) as e:
        raise ValueError(f"{what} {shown(relative)} cannot be resolved ({e})") from None
    if not resolved.is_relative_to(root):
        raise ValueError(f"{what} {shown(relative)} escapes the dataset root {root}")
    return resolved


class _FieldError(Exception):
    def __init__(self, field_name: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field_name, message


def _check_file(path: Path, name: str, check_image) -> None:
    """A regular file (not a directory, FIFO or device), whose header is sane if asked."""
    try:
        if not path.exists():
            raise _FieldError(name, f"image file not found: {path}")
        if not path.is_file():
            raise _FieldError(name, f"not a regular file (a directory or device?): {path}")
    except OSError as e:  # a symlink loop inside root, a path too long, ...
        raise _FieldError(name, f"cannot stat {path}: {e}") from None
    if check_image is not None:
        try:
            check_image(path)
        except ValueError as e:  # ImageError
            raise _FieldError(name, str(e)) from None


def _parse_record(
    obj: object, root: Path, split: str | None, check_files: bool, check_image=None
) -> ScreeningRecord:
    """Build a record from one decoded JSON line; raises (field, message) via _FieldError."""
    if not isinstance(obj, dict):
        raise _FieldError(None, f"a record must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise _FieldError(unknown[0], f"unknown field(s) {shown(unknown)}; expected {list(FIELDS)}")
    for name, value in obj.items():
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            message = "holds a lone surrogate escape (not encodable as UTF-8)"
            raise _FieldError(name, message) from None

    rid = obj.get("id")
    if not isinstance(rid, str) or not rid:
        raise _FieldError("id", f"must be a non-empty string, got {shown(rid)}")
    if len(rid) > MAX_ID_CHARS or not rid.isprintable():
        raise _FieldError(
            "id", f"must be printable and at most {MAX_ID_CHARS} characters, got {shown(rid)}"
        )

    def path_of(value: object, name: str) -> Path:
        try:
            p = resolve_inside(root, value, name)
        except ValueError as e:
            raise _FieldError(name, str(e)) from None
        if check_files:
            _check_file(p, name, check_image)
        return p

    original = path_of(obj.get("original"), "original")
    cands = obj.get("candidates")
    if not isinstance(cands, list) or len(cands) != len(OPTIONS):
        raise _FieldError("candidates", f"must be a list of 4 paths (A-D), got {shown(cands)}")
    candidates = tuple(path_of(c, f"candidates[{i}]") for i, c in enumerate(cands))

    answer = obj.get("answer")
    if answer is None:
        if split in LABELLED_SPLITS:
            raise _FieldError("answer", f"missing in labelled split '{split}'")
    else:
        try:
            answer = canonical_answer(answer)
        except ValueError as e:
            raise _FieldError("answer", str(e)) from None

    dims = obj.get("dimensions")
    dims = [] if dims is None else dims
    if not isinstance(dims, list) or not all(isinstance(d, str) for d in dims):
        raise _FieldError("dimensions", f"must be a list of strings, got {shown(dims)}")
    bad = sorted(set(dims) - set(DIMENSIONS))
    if bad:
        raise _FieldError(
            "dimensions", f"unknown dimension(s) {shown(bad)}; expected {list(DIMENSIONS)}"
        )
    if len(set(dims)) != len(dims):
        raise _FieldError("dimensions", f"repeats a dimension: {shown(dims)}")

    texts = {}
    for name in TEXT_FIELDS:
        value = obj.get(name)
        if value is not None and not isinstance(value, str):
            raise _FieldError(name, f"must be a string, got {type(value).__name__}")
        texts[name] = value
    meta = obj.get("meta")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise _FieldError("meta", f"must be an object, got {type(meta).__name__}")
    return ScreeningRecord(
        rid, original, candidates, answer=answer, dimensions=tuple(dims), meta=meta, **texts
    )


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: a key given twice is an error (json keeps the last silently)."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _FieldError(key, "is given more than once")
        obj[key] = value
    return obj


def _lines(f, limit: int) -> Iterable[tuple[bytes | None, int]]:
    """(line, size) per line of a binary file; line is None when size exceeds `limit`.

    Reads at most limit + 1 bytes at a time, so a hostile line is never held in memory whole.
    """
    while raw := f.readline(limit + 1):
        if len(raw) <= limit:
            yield raw, len(raw)
            continue
        size = len(raw)
        while not raw.endswith(b"\n") and (raw := f.readline(limit + 1)):
            size += len(raw)
        yield None, size


def _decode(raw: bytes, first: bool) -> object:
    """One manifest line's bytes to a JSON value; _FieldError(None, ...) when it is not one."""
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")  # a BOM is allowed at the start
    except UnicodeDecodeError as e:
        raise _FieldError(None, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.strip():
        return None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise _FieldError(None, f"invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise _FieldError(None, "invalid JSON: nested too deeply") from None
    except ValueError as e:  # an integer too long to convert (sys.get_int_max_str_digits)
        raise _FieldError(None, f"invalid JSON: {e}") from None


def load_manifest(
    path: str | Path,
    split: str | None = None,
    *,
    skip_invalid: bool = False,
    check_files: bool = True,
    check_images: bool = False,
) -> tuple[list[ScreeningRecord], LoadReport]:
    """Read and validate a JSONL manifest. `split` defaults to the file's stem ("train.jsonl").

    Raises ManifestError on the first bad record unless `skip_invalid`, in which case bad records
    are left out and listed in the returned report. Duplicate ids are always bad records.
    `check_images` opens each image's header (format, size) without decoding the pixels.
    """
    path = Path(path)
    split = split if split is not None else path.stem
    if not path.is_file():
        raise ManifestError(path, None, None, "manifest file not found")
    check_image = probe_image if check_images and check_files else None
    root = path.parent
    records: list[ScreeningRecord] = []
    skipped: list[ManifestError] = []
    seen: dict[str, int] = {}
    with path.open("rb") as f:
        for lineno, (raw, size) in enumerate(_lines(f, MAX_LINE_BYTES), start=1):
            try:
                if raw is None:
                    raise _FieldError(None, f"line is {size} bytes (limit {MAX_LINE_BYTES})")
                obj = _decode(raw, first=lineno == 1)
                if obj is None:
                    continue
                record = _parse_record(obj, root, split, check_files, check_image)
                if record.id in seen:
                    raise _FieldError(
                        "id", f"duplicate id {shown(record.id)} (first on line {seen[record.id]})"
                    )
                seen[record.id] = lineno
                records.append(record)
            except _FieldError as e:
                error = ManifestError(path, lineno, e.field, e.message)
                if not skip_invalid:
                    raise error from None
                skipped.append(error)
    return records, LoadReport(str(path), len(records), tuple(skipped))


def record_to_json(record: ScreeningRecord, root: Path) -> dict[str, Any]:
    """The manifest form of a record, with paths made relative to `root`."""
    root = root.resolve()
    obj: dict[str, Any] = {
        "id": record.id,
        "original": Path(record.original).resolve().relative_to(root).as_posix(),
        "candidates": [Path(c).resolve().relative_to(root).as_posix() for c in record.candidates],
    }
    if record.answer is not None:
        obj["answer"] = record.answer
    if record.dimensions:
        obj["dimensions"] = list(record.dimensions)
    for name in TEXT_FIELDS:
        if getattr(record, name) is not None:
            obj[name] = getattr(record, name)
    if record.meta:
        obj["meta"] = dict(record.meta)
    return obj


def write_manifest(path: str | Path, records: Iterable[ScreeningRecord]) -> Path:
    """Atomically write records as a JSONL manifest; paths become relative to its folder."""
    path = Path(path)
    root = path.parent
    lines = [json.dumps(record_to_json(r, root), ensure_ascii=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path


def manifest_hash(path: str | Path) -> str:
    """sha256 of the manifest bytes: identifies the data a stage or a mining cache came from."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
