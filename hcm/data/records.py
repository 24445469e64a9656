"""The data contract: one screening sample, as a manifest names it and as the model sees it.

A `ScreeningRecord` is a manifest line, its images still files (the manifest format, its reading
and its checks: `hcm.data.manifest`); a `ScreeningSample` holds the images decoded
(`load_sample`), or drawn directly by the synthetic generator's stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hcm.images import MAX_PIXELS, ImageError, load_image

# `val`: held-out samples to choose SFT lengths and tune GRPO on, so that `test` is only ever
# scored (the paper has no such split; the synthetic generator draws it like the others).
SPLITS = ("train", "val", "test", "pseudo_label", "exploration")
LABELLED_SPLITS = ("train", "val", "test")
TEXT_FIELDS = ("caption", "weak_cot", "answer_cot")


@dataclass(frozen=True, kw_only=True)
class Labels:
    """What a sample says about its candidates, on disk or in memory: the acceptable set, the
    defect dimensions, the texts SFT learns from (TEXT_FIELDS) and the generator's metadata."""

    answer: str | None = None
    dimensions: tuple[str, ...] = ()
    caption: str | None = None
    weak_cot: str | None = None
    answer_cot: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def labels(self) -> dict[str, Any]:
        """The label fields by name: what a record hands to its decoded sample."""
        return {f.name: getattr(self, f.name) for f in fields(Labels)}


@dataclass(frozen=True)
class ScreeningRecord(Labels):
    """One sample: the original product image, four generated candidates A-D and their labels."""

    id: str
    original: Path
    candidates: tuple[Path, Path, Path, Path]

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
class ScreeningSample(Labels):
    """A sample in memory, images decoded: what the model layer consumes.

    Built from a record by `load_sample`, or drawn directly by the synthetic
    generator's streaming mode. `images` is (original, A, B, C, D), RGB PIL images.
    """

    id: str
    images: tuple[Any, ...]


def load_sample(record: ScreeningRecord, max_pixels: int = MAX_PIXELS) -> ScreeningSample:
    """Decode a record's five images (original, A-D); errors name the record and field."""
    images = []
    for name, path in record.image_fields:
        try:
            images.append(load_image(path, max_pixels))
        except ImageError as e:
            raise ImageError(f"record {record.id} field '{name}': {e}") from None
    return ScreeningSample(id=record.id, images=tuple(images), **record.labels())
