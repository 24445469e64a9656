"""Per-sample predictions, as lmms-eval's `--log_samples`: what the model answered, and why it
scored what it did.

Every evaluation writes `predictions.jsonl` beside its `metrics.json`, and hard-case mining one
beside its cache (`hard_cases/predictions.jsonl` next to `hard_cases.json`). One JSON object per
line, in the split's order, judged by the same metric that scores the run:

    {"id": "test-000003", "label": "AC", "dimensions": ["physical_shadow"],
     "completion": "<think>...</think><answer>A</answer>", "parsed": "A",
     "correct": true, "dpa": 0.5, "faithful": true,
     "images": ["../../data/synthetic-s0-24/images/test-000003/original.png", ...]}

`parsed` is the answer read from the completion (null: invalid). `faithful` says whether that
answer is the set the completion's own CoT calls acceptable (null: the CoT does not state a
verdict for each of the four candidates; hcm.judgement). `images` are the original and
A-D, relative to the file's folder. A sample held only in memory (a public benchmark's parquet
cells) has no files: its thumbnails are written now into `thumbs/` and named instead. Mining rows
add `hard` and `pass_rate` (the share of its k answers that were right; the completion shown is
the first). Public-benchmark rows carry `subtask` and `options` instead of `dimensions`/`dpa`.

Validation inside a training stage writes none: it scores the same test split that the
pipeline's eval stage then writes predictions for, and per-epoch files would add a gather across
ranks and a file of every sample to each epoch for what the `val/score/*` curve already shows.

`publish` writes the file atomically, then the gallery page (`hcm.gallery`) and, with a W&B
logger, the same rows as a W&B Table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hcm.files import atomic_write_text
from hcm.gallery import PREDICTIONS, THUMBS, log_table, save_thumbnail, write_gallery
from hcm.images import decode_image

log = logging.getLogger(__name__)


def gather_rows(rows: list[dict], world_size: int) -> list[dict]:
    """Every rank's rows on every rank, once per id: a DistributedSampler pads the last shard
    by repeating samples."""
    if world_size > 1 and torch.distributed.is_initialized():
        shards: list = [None] * world_size
        torch.distributed.all_gather_object(shards, rows)
        rows = [r for shard in shards for r in shard]
    first: dict[str, dict] = {}
    for r in rows:
        first.setdefault(r["id"], r)
    return list(first.values())


def image_refs(record: Any, folder: Path) -> list[str]:
    """A sample's images relative to `folder`: its files, or thumbnails made now from the
    encoded images a record holds in memory."""
    refs = []
    for k, image in enumerate(record.images):
        if isinstance(image, bytes):
            name = hashlib.sha256(image).hexdigest()[:24] + ".jpg"
            dest = folder / THUMBS / name
            if not dest.is_file():
                save_thumbnail(decode_image(image, f"{record.id} image {k}"), dest)
            refs.append(f"{THUMBS}/{name}")
        else:
            refs.append(Path(os.path.relpath(Path(image).resolve(), folder.resolve())).as_posix())
    return refs


def write_predictions(folder: Path, rows: Sequence[dict], records: Sequence[Any]) -> Path:
    """`folder/predictions.jsonl`: the rows in the records' order, each with its images."""
    folder = Path(folder)
    by_id = {r["id"]: r for r in rows}
    missing = [r.id for r in records if r.id not in by_id]
    if missing or len(by_id) != len(records):
        raise ValueError(
            f"{len(by_id)} predictions for {len(records)} samples (first missing: {missing[:3]})"
        )
    lines = [
        json.dumps({**by_id[r.id], "images": image_refs(r, folder)}, ensure_ascii=False)
        for r in records
    ]
    path = folder / PREDICTIONS
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path


def publish(
    folder: Path,
    rows: Sequence[dict],
    records: Sequence[Any],
    data_root: Path,
    loggers: Sequence[Any] = (),
    key: str = "test/predictions",
) -> Path:
    """Write predictions.jsonl, its gallery page and (W&B) table; the predictions file."""
    path = write_predictions(folder, rows, records)
    page, saved, cells = write_gallery(path, roots=[Path(data_root)])
    log_table(loggers, key, saved, cells, Path(folder))
    log.info("%d predictions in %s; gallery %s", len(saved), path, page)
    return path
