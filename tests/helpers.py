"""Small builders shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image

TESTS = Path(__file__).resolve().parent


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


def letter_e(completion: str) -> float:
    """A toy reward: the fraction of the characters that are "e" (0 for an empty completion).
    The random tiny model's completions vary in it, unlike the format and DPA rewards (0).

    >>> letter_e("tree")
    0.5
    """
    return completion.count("e") / len(completion) if completion else 0.0


def toy_reward_site() -> str:
    """A sitecustomize.py registering `letter_e` as a reward at interpreter start: written on the
    PYTHONPATH of a train.py subprocess (and so of every DDP rank Lightning re-launches), it lets
    the run's config name `module.rewards.letter_e`. It imports hcm before train.py's folder is
    on sys.path: from this checkout, not from wherever else hcm is installed."""
    return textwrap.dedent(
        f"""
        import sys

        sys.path[:0] = [{str(TESTS.parent)!r}]
        sys.path.append({str(TESTS)!r})
        from helpers import letter_e
        from hcm.rewards import REWARDS

        REWARDS["letter_e"] = letter_e
        """
    )
