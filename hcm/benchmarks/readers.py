"""The three public benchmarks of section 5.4 as `BenchmarkRecord`s, from their local copies.

Each reader turns its benchmark's published schema (below; README, "Public benchmarks")
into one record type: a question text with the options written out as the reference harnesses
show them, the images in order, the answer (an option letter, or RealWorldQA's open answer) and
the subtask the split is stratified by.

  RealWorldQA  `test`: question (options and instruction included), answer, image
  MuirBench    `test`: idx, task, question, options, answer (letter), image_list
  BLINK        one folder per subtask config, split `val`: idx, sub_task, question, choices,
               answer "(A)", image_1..image_4 (unused ones None), prompt
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hcm.benchmarks.sources import image_bytes, read_split
from hcm.choice import LETTERS

IMAGE_PLACEHOLDER = "<image>"
BLINK_SUBTASKS = (
    "Art_Style", "Counting", "Forensic_Detection", "Functional_Correspondence", "IQ_Test",
    "Jigsaw", "Multi-view_Reasoning", "Object_Localization", "Relative_Depth",
    "Relative_Reflectance", "Semantic_Correspondence", "Spatial_Relation",
    "Visual_Correspondence", "Visual_Similarity",
)  # fmt: skip
# "A. text" lines inside a RealWorldQA question (the pattern lmms-eval's filter uses)
_OPTION_LINE = re.compile(r"^\s*([A-Z])\.\s+(.*\S)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class BenchmarkRecord:
    """One question. `question` holds `<image>` where an image goes inline (MuirBench), or none
    (the images then precede the text); `options` are the option texts in letter order."""

    id: str
    question: str
    images: tuple[bytes, ...]
    answer: str
    subtask: str = ""
    options: tuple[str, ...] = ()


def _letter(answer: object, n_options: int, what: str) -> str:
    """ "B", "(B)", "b" -> "B", checked against the number of options."""
    text = str(answer).strip().strip("()").strip().upper()
    if len(text) != 1 or text not in LETTERS[: n_options or len(LETTERS)]:
        raise ValueError(f"{what}: answer {answer!r} is not one of {n_options} option letters")
    return text


def read_realworldqa(root: Path, split: str = "test") -> list[BenchmarkRecord]:
    rows, base = read_split(root, split, "RealWorldQA", _hint("xai-org/RealworldQA", root))
    return [_realworldqa_record(i, row, base) for i, row in enumerate(rows)]


def read_muirbench(root: Path, split: str = "test") -> list[BenchmarkRecord]:
    rows, base = read_split(root, split, "MuirBench", _hint("MUIRBENCH/MUIRBENCH", root))
    return [_muirbench_record(i, row, base) for i, row in enumerate(rows)]


def read_blink(
    root: Path, split: str = "val", subtasks: Sequence[str] = BLINK_SUBTASKS
) -> list[BenchmarkRecord]:
    records = []
    hint = _hint("BLINK-Benchmark/BLINK", root) + " (one folder per subtask)"
    for subtask in subtasks:
        rows, base = read_split(Path(root) / subtask, split, f"BLINK/{subtask}", hint)
        records += [_blink_record(subtask, i, row, base) for i, row in enumerate(rows)]
    return records


def _hint(repo: str, root: Path) -> str:
    return f"E.g. huggingface-cli download {repo} --repo-type dataset --local-dir {root}"


def _realworldqa_record(i: int, row: dict, base: Path) -> BenchmarkRecord:
    what = f"RealWorldQA row {i}"
    question = str(row["question"]).strip()
    options = tuple(text for _, text in _OPTION_LINE.findall(question))
    answer = str(row["answer"]).strip()
    if len(answer) == 1 and answer.upper() in LETTERS:
        answer = _letter(answer, len(options), what)
    image = image_bytes(row["image"], base, what)
    return BenchmarkRecord(f"rwqa-{i:04d}", question, (image,), answer, "", options)


def _muirbench_record(i: int, row: dict, base: Path) -> BenchmarkRecord:
    what = f"MuirBench row {i} (idx {row.get('idx')})"
    options = tuple(str(o) for o in row["options"])
    text = (
        str(row["question"]).strip()
        + "\n"
        + "\n".join(f"{LETTERS[k]}. {o}" for k, o in enumerate(options))
    )
    images = tuple(image_bytes(im, base, what) for im in row["image_list"])
    if text.count(IMAGE_PLACEHOLDER) not in (0, len(images)):
        # placeholders that don't match the images: show all images first instead
        text = text.replace(IMAGE_PLACEHOLDER, "")
    rid = f"muir-{row.get('idx', i)}"
    answer = _letter(row["answer"], len(options), what)
    return BenchmarkRecord(rid, text, images, answer, str(row["task"]), options)


def _blink_record(subtask: str, i: int, row: dict, base: Path) -> BenchmarkRecord:
    what = f"BLINK/{subtask} row {i} (idx {row.get('idx')})"
    options = tuple(str(c) for c in row["choices"])
    images = tuple(
        image_bytes(row[f"image_{k}"], base, what)
        for k in range(1, 5)
        if row.get(f"image_{k}") is not None
    )
    text = row.get("prompt") or (
        str(row["question"]).strip()
        + "\nSelect from the following choices.\n"
        + "\n".join(f"({LETTERS[k]}) {c}" for k, c in enumerate(options))
    )
    answer = _letter(row["answer"], len(options), what)
    rid = f"blink-{row.get('idx', f'{subtask}_{i}')}"
    return BenchmarkRecord(rid, text.strip(), images, answer, subtask, options)


READERS: dict[str, Callable[..., list[BenchmarkRecord]]] = {
    "realworldqa": read_realworldqa,
    "muirbench": read_muirbench,
    "blink": read_blink,
}
