"""Torch datasets over screening samples, and the collators that turn them into model inputs.

SFT sources (Table 5) map a sample to one (prompt, target) pair each:
  caption     -> the caption prompt, target = the sample's caption        (pseudo-label split)
  weak_cot    -> the task prompt,    target = weakly-supervised CoT   (pseudo-label split)
  answer_cot  -> the task prompt,    target = answer-driven CoT       (train split)
  direct      -> the task prompt,    target = the answer letters      (train split; Table 4 +SFT)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset, IterableDataset

from hcm.data.messages import screening_messages
from hcm.data.records import ScreeningRecord, ScreeningSample, load_sample
from hcm.prompts import Prompt

SFT_SOURCES = {
    "caption": "pseudo_label",
    "weak_cot": "pseudo_label",
    "answer_cot": "train",
    "direct": "train",
}


def sft_target(sample: ScreeningSample, source: str) -> str | None:
    """The assistant text a sample teaches under an SFT source (None when it lacks that text)."""
    if source == "direct":
        return sample.answer
    if source not in SFT_SOURCES:
        raise ValueError(f"unknown SFT source {source!r}; expected one of {sorted(SFT_SOURCES)}")
    return getattr(sample, source)


class SampleDataset(Dataset):
    """Records decoded lazily into samples (images are read in the dataloader's workers)."""

    def __init__(self, records: Sequence[ScreeningRecord]):
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ScreeningSample:
        return load_sample(self.records[i])


@dataclass(frozen=True)
class SFTItem:
    sample: ScreeningSample
    source: str
    target: str


class SFTDataset(Dataset):
    """One item per (record, source) pair whose record carries that source's text."""

    def __init__(self, records_by_source: dict[str, Sequence[ScreeningRecord]]):
        self.items: list[tuple[ScreeningRecord, str]] = []
        for source, records in records_by_source.items():
            for r in records:
                has_text = r.answer if source == "direct" else getattr(r, source)
                if has_text:
                    self.items.append((r, source))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> SFTItem:
        record, source = self.items[i]
        sample = load_sample(record)
        return SFTItem(sample, source, sft_target(sample, source))


class StreamDataset(IterableDataset):
    """A sample stream (the synthetic generator's streaming mode) with a known per-rank length.

    With SFT `sources`, each fresh sample teaches one item per source; without, samples pass
    through as generation prompts. The length lets Lightning size epochs and the LR schedule.
    """

    def __init__(self, stream: IterableDataset, per_rank: int, sources: Sequence[str] = ()):
        self.stream, self.per_rank, self.sources = stream, per_rank, list(sources)

    def __len__(self) -> int:
        return self.per_rank * max(1, len(self.sources))

    def __iter__(self):
        for sample in self.stream:
            if not self.sources:
                yield sample
            for source in self.sources:
                yield SFTItem(sample, source, sft_target(sample, source))


def labels(samples: Sequence[ScreeningSample]) -> dict[str, list]:
    """What scoring needs besides the responses (`ScreeningScore.batch_keys`), and the ids."""
    return {
        "ids": [s.id for s in samples],
        "answers": [s.answer for s in samples],
        "dimensions": [list(s.dimensions) for s in samples],
    }


def prompt_messages(sample: ScreeningSample, prompt: Prompt, layout: str) -> list[dict]:
    """A sample as the chat messages of its generation prompt (no reply)."""
    return screening_messages(sample, prompt.user, layout, system=prompt.system)


@dataclass
class SFTCollator:
    """SFT items -> right-padded inputs with labels on the assistant reply only (eq. 1)."""

    builder: Any  # hcm.model.inputs.InputBuilder
    prompt: Prompt
    layout: str

    def __call__(self, items: Sequence[SFTItem]) -> dict:
        conversations = [
            screening_messages(
                it.sample,
                self.prompt.caption if it.source == "caption" else self.prompt.user,
                self.layout,
                target=it.target,
                system=self.prompt.system,
            )
            for it in items
        ]
        batch = self.builder.encode(
            conversations, add_generation_prompt=False, padding_side="right", with_labels=True
        )
        batch["ids"] = [it.sample.id for it in items]
        return batch


@dataclass
class PromptCollator:
    """Samples -> left-padded generation prompts plus the labels needed to score them."""

    builder: Any
    prompt: Prompt
    layout: str

    def __call__(self, samples: Sequence[ScreeningSample]) -> dict:
        conversations = [prompt_messages(s, self.prompt, self.layout) for s in samples]
        inputs = self.builder.encode(
            conversations, add_generation_prompt=True, padding_side="left", with_labels=False
        )
        return {"inputs": inputs, **labels(samples)}
