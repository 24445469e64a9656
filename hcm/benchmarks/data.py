"""Benchmark questions as model inputs: decoded samples, chat messages and the two collators.

A question's images go where its text has `<image>` (MuirBench writes them inline); otherwise
they precede the text, one per line, tagged "Image-k:" when there are several (InternVL's
multi-image convention). Batches have the keys of the screening collators (`inputs`, `ids`,
`answers`; `input_ids`... with `labels` for SFT) plus what `BenchmarkAccuracy` reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from hcm.benchmarks.readers import IMAGE_PLACEHOLDER, BenchmarkRecord
from hcm.images import decode_image
from hcm.model.chat import chat_messages


@dataclass(frozen=True)
class BenchmarkPrompt:
    """How a question is asked: `user` is the user turn around the question text (`{question}`),
    `target` the SFT answer (`{answer}`); `remove` lists phrases dropped from questions first
    (RealWorldQA's "answer directly" instruction, under the CoT prompt)."""

    name: str
    user: str = "{question}"
    target: str = "{answer}"
    remove: tuple[str, ...] = ()
    system: str | None = None

    def text(self, question: str) -> str:
        for phrase in self.remove:
            question = question.replace(phrase, "")
        return self.user.replace("{question}", question.strip())


@dataclass(frozen=True)
class BenchmarkSample:
    id: str
    question: str
    images: tuple[Any, ...]  # RGB PIL images
    answer: str
    subtask: str = ""
    options: tuple[str, ...] = field(default=())


def decode(record: BenchmarkRecord) -> BenchmarkSample:
    images = tuple(decode_image(b, f"{record.id} image {k}") for k, b in enumerate(record.images))
    return BenchmarkSample(
        record.id, record.question, images, record.answer, record.subtask, record.options
    )


class BenchmarkDataset(Dataset):
    """Records decoded lazily (images are decoded in the dataloader's workers)."""

    def __init__(self, records: Sequence[BenchmarkRecord]):
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> BenchmarkSample:
        return decode(self.records[i])


def benchmark_messages(
    sample: BenchmarkSample, prompt: BenchmarkPrompt, target: str | None = None
) -> list[dict]:
    """The chat messages of one question: [system], user (images and text), [assistant]."""
    text = prompt.text(sample.question)
    n = len(sample.images)
    if text.count(IMAGE_PLACEHOLDER) != n:
        text = text.replace(IMAGE_PLACEHOLDER, "")
        tags = [f"Image-{k}: " if n > 1 else "" for k in range(1, n + 1)]
        text = "".join(f"{tag}{IMAGE_PLACEHOLDER}\n" for tag in tags) + text
    return chat_messages(text, list(sample.images), target, prompt.system)


def labels(samples: Sequence[BenchmarkSample]) -> dict[str, list]:
    """What scoring needs besides the responses (`BenchmarkAccuracy.batch_keys`)."""
    return {
        "ids": [s.id for s in samples],
        "answers": [s.answer for s in samples],
        "options": [list(s.options) for s in samples],
        "subtasks": [s.subtask for s in samples],
    }


@dataclass
class BenchmarkSFTCollator:
    """Samples -> right-padded inputs, labels on the answer only (eq. 1 with direct answers)."""

    builder: Any  # hcm.model.inputs.InputBuilder
    prompt: BenchmarkPrompt

    def __call__(self, samples: Sequence[BenchmarkSample]) -> dict:
        target = self.prompt.target
        conversations = [
            benchmark_messages(s, self.prompt, target=target.replace("{answer}", s.answer))
            for s in samples
        ]
        batch = self.builder.encode(
            conversations, add_generation_prompt=False, padding_side="right", with_labels=True
        )
        batch["ids"] = [s.id for s in samples]
        return batch


@dataclass
class BenchmarkPromptCollator:
    """Samples -> left-padded generation prompts plus the labels to score them."""

    builder: Any
    prompt: BenchmarkPrompt

    def __call__(self, samples: Sequence[BenchmarkSample]) -> dict:
        conversations = [benchmark_messages(s, self.prompt) for s in samples]
        inputs = self.builder.encode(
            conversations, add_generation_prompt=True, padding_side="left", with_labels=False
        )
        return {"inputs": inputs, **labels(samples)}
