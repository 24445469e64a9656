"""Small builders shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def make_screening_root(root: Path, n: int = 2, **fields) -> list[dict]:
    """n samples of 8x8 PNGs under root/images and their manifest rows, plus `fields` each."""
    rows = []
    for i in range(n):
        folder = root / "images" / f"s{i}"
        folder.mkdir(parents=True)
        for name in ("original", "A", "B", "C", "D"):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{name}.png")
        rows.append(
            {
                "id": f"s{i}",
                "original": f"images/s{i}/original.png",
                "candidates": [f"images/s{i}/{x}.png" for x in "ABCD"],
                **fields,
            }
        )
    return rows
