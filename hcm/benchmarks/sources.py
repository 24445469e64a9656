"""Rows of a local Hugging Face dataset copy: parquet files or a `datasets.save_to_disk` folder.

Nothing is downloaded at run time. Layouts read, for a split name such as "test":
  - parquet as the hub stores it: `<dir>/**/test-00000-of-00001.parquet`, `<dir>/**/test.parquet`
    or `<dir>/**/test/*.parquet` (what `huggingface-cli download --repo-type dataset` gives);
  - `DatasetDict.save_to_disk`: `<dir>/dataset_dict.json` and `<dir>/test/` holding
    `state.json` and `data-*.arrow` (Arrow IPC streams);
  - `Dataset.save_to_disk` of that split alone: `<dir>/state.json` and `data-*.arrow`.
Images are the `datasets.Image` feature's storage, {"bytes": ..., "path": ...}; an image stored by
path is read relative to the folder that holds the data files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class SourceNotFoundError(FileNotFoundError):
    """No local copy of a benchmark split where the config points."""


def _pyarrow():
    # imported on first use: only the public benchmarks read parquet (pyarrow adds ~0.5 s)
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:  # pragma: no cover - a dependency of hcm
        raise ImportError("reading benchmark files needs pyarrow: pip install pyarrow") from None
    return pyarrow


def parquet_files(folder: Path, split: str) -> list[Path]:
    """The parquet files of `split` under `folder`, in name order (shards in order)."""
    found = []
    for path in sorted(folder.rglob("*.parquet")):
        if path.stem == split or path.stem.startswith(f"{split}-") or path.parent.name == split:
            found.append(path)
    return found


def _arrow_folder(folder: Path, split: str) -> Path | None:
    if (folder / "dataset_dict.json").is_file() and (folder / split / "state.json").is_file():
        return folder / split
    if (folder / "state.json").is_file():
        return folder
    return None


def _read_arrow_folder(folder: Path):
    pa = _pyarrow()
    state = json.loads((folder / "state.json").read_text())
    tables = []
    for entry in state["_data_files"]:
        with pa.memory_map(str(folder / entry["filename"])) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return pa.concat_tables(tables) if tables else None


def read_split(folder: str | Path, split: str, what: str, hint: str) -> tuple[list[dict], Path]:
    """The rows of `split` as dicts, and the folder image paths are relative to.

    Raises SourceNotFoundError naming the folder, the layouts looked for and `hint` (how to
    get the files) when there is no copy.
    """
    folder = Path(folder)
    arrow = _arrow_folder(folder, split) if folder.is_dir() else None
    if arrow is not None:
        table = _read_arrow_folder(arrow)
        return (table.to_pylist() if table is not None else []), arrow
    files = parquet_files(folder, split) if folder.is_dir() else []
    if not files:
        raise SourceNotFoundError(
            f"{what}: no '{split}' split under {folder}. Put the Hugging Face copy there: "
            f"parquet files named {split}-*.parquet (any depth), or a datasets.save_to_disk "
            f"folder. {hint}"
        )
    pq = _pyarrow().parquet
    rows: list[dict] = []
    for path in files:
        rows.extend(pq.read_table(path).to_pylist())
    return rows, files[0].parent


def image_bytes(value: Any, base: Path, what: str) -> bytes:
    """The encoded image of a `datasets.Image` cell ({"bytes", "path"} or raw bytes)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            path = Path(value["path"])
            path = path if path.is_absolute() else base / path
            if path.is_file():
                return path.read_bytes()
            raise FileNotFoundError(f"{what}: image file {path} not found")
    raise ValueError(f"{what}: not an image cell ({type(value).__name__})")


def fingerprint(folder: str | Path) -> list[list]:
    """Names and sizes of the data files under `folder`: identifies a local copy cheaply."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".parquet", ".arrow", ".json"))
    return [[p.relative_to(folder).as_posix(), p.stat().st_size] for p in files]
