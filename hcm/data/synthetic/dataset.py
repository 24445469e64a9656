"""The synthetic benchmark on disk: images and one manifest per split, a marker written last,
and the command line that writes it (`python -m hcm.data.synthetic --help`).

A dataset's folder is written whole or not at all: under the lock `<root>.lock`, into a temporary
folder beside it, renamed to `root` when complete. A concurrent job waits for the lock, then finds
the finished folder; a crash leaves none under `root`. Configs name the folder by
`dataset_digest` (`${hcm.synthetic_digest:${data.synthetic}}`), so that two configs that make
different data never share one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from hcm.data.manifest import write_manifest
from hcm.data.records import SPLITS, ScreeningRecord
from hcm.data.synthetic.config import (
    DEFAULT_SIZES,
    GENERATOR_VERSION,
    PAPER_SIZES,
    SyntheticConfig,
)
from hcm.data.synthetic.sample import generate_sample, split_view
from hcm.files import atomic_write_text, folder_lock, replace_folder
from hcm.screening import OPTIONS

log = logging.getLogger(__name__)

MARKER = "dataset.json"
PNG_COMPRESSION = 1  # zlib level: these flat images compress well even at 1, and 1 is fast


def _write_one(
    root: Path, cfg: SyntheticConfig, seed: int, split: str, index: int
) -> ScreeningRecord:
    s = split_view(generate_sample(cfg, seed, split, index), split)
    folder = root / "images" / s.id
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png" for name in ("original", *OPTIONS)]
    for path, image in zip(paths, s.images, strict=True):
        image.save(path, format="PNG", compress_level=PNG_COMPRESSION)
    return ScreeningRecord(s.id, paths[0], tuple(paths[1:]), **s.labels())


def _marker(sizes: Mapping[str, int], cfg: SyntheticConfig, seed: int) -> dict[str, Any]:
    obj = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "sizes": dict(sizes),
        "config": asdict(cfg),
    }
    return json.loads(json.dumps(obj, sort_keys=True))


def dataset_args(synthetic: Mapping[str, Any]) -> tuple[dict[str, int], SyntheticConfig, int]:
    """(sizes, generator config, seed) of a `data.synthetic` node (conf/data/synthetic.yaml)."""
    cfg = SyntheticConfig(**synthetic.get("generator", {}))
    return dict(synthetic["sizes"]), cfg, synthetic.get("seed", 0)


def dataset_digest(sizes: Mapping[str, int], cfg: SyntheticConfig, seed: int) -> str:
    """A short hash of everything that makes the data, the marker's content: the generator's
    version, its whole config (defaults filled in), the seed and the split sizes."""
    text = json.dumps(_marker(sizes, cfg, seed), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_dataset(
    root: str | Path,
    sizes: Mapping[str, int],
    cfg: SyntheticConfig | None = None,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Path]:
    """Make `root` hold this dataset, images and one manifest per split, unless it already does
    (`dataset_complete`); written whole under the lock `<root>.lock` (module docstring).
    Returns each split's manifest."""
    cfg, root = cfg or SyntheticConfig(), Path(root).absolute()
    bad = {s: n for s, n in sizes.items() if s not in SPLITS or int(n) < 0}
    if bad:
        raise ValueError(f"sizes must map splits {SPLITS} to counts >= 0, got {bad}")
    with folder_lock(root, "another job writing this dataset"):
        if not dataset_complete(root, sizes, cfg, seed):
            log.info("writing the synthetic screening benchmark into %s", root)
            for stale in root.parent.glob(f".{root.name}.tmp-*"):  # left by a crashed write
                shutil.rmtree(stale, ignore_errors=True)
            tmp = root.parent / f".{root.name}.tmp-{time.time_ns()}"
            try:
                _write_splits(tmp, sizes, cfg, seed, workers, progress)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            replace_folder(tmp, root)
    return {split: root / f"{split}.jsonl" for split in sizes}


def _write_splits(root: Path, sizes, cfg: SyntheticConfig, seed, workers, progress) -> None:
    """Images and one manifest per split under `root`, the marker `dataset.json` last."""
    root.mkdir(parents=True)
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
            write_manifest(root / f"{split}.jsonl", records)
    finally:
        bar.close()
        if pool:
            pool.close()
            pool.join()
    atomic_write_text(
        root / MARKER, json.dumps(_marker(sizes, cfg, seed), indent=1, sort_keys=True)
    )


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
