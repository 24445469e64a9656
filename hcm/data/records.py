"""The data contract: one screening sample, as a manifest names it and as the model sees it.

A `ScreeningRecord` is a manifest line, its images still files (the manifest format, its reading
and its checks: `hcm.data.manifest`); a `ScreeningSample` holds the images decoded
(`hcm.data.images.load_sample`), or drawn directly by the synthetic generator's stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPLITS = ("train", "test", "pseudo_label", "exploration")
LABELLED_SPLITS = ("train", "test")
TEXT_FIELDS = ("caption", "weak_cot", "answer_cot")


@dataclass(frozen=True)
class ScreeningRecord:
    """One sample: the original product image, four generated candidates A-D and their labels."""

    id: str
    original: Path
    candidates: tuple[Path, Path, Path, Path]
    answer: str | None = None
    dimensions: tuple[str, ...] = ()
    caption: str | None = None
    weak_cot: str | None = None
    answer_cot: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> tuple[Path, ...]:
        return (self.original, *self.candidates)

    @property
    def image_fields(self) -> tuple[tuple[str, Path], ...]:
        """(manifest field, path) of each image, for errors that name the field."""
        return (
            ("original", self.original),
            *((f"candidates[{i}]", c) for i, c in enumerate(self.candidates)),
        )


@dataclass(frozen=True)
class ScreeningSample:
    """A sample in memory, images decoded: what the model layer consumes.

    Built from a record by `hcm.data.images.load_sample`, or drawn directly by the synthetic
    generator's streaming mode. `images` is (original, A, B, C, D), RGB PIL images.
    """

    id: str
    images: tuple[Any, ...]
    answer: str | None = None
    dimensions: tuple[str, ...] = ()
    caption: str | None = None
    weak_cot: str | None = None
    answer_cot: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
