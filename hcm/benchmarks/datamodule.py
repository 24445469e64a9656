"""The LightningDataModule of a public benchmark: the screening one's machinery, other questions.

It subclasses `ScreeningDataModule` for what does not depend on the data (the hard-case sampler
and its checkpointed state, the loaders, the GRPO epoch lengths), so SFT, GRPO, hard-case mining
and evaluation run unchanged; it replaces where the questions come from and how they are asked
and scored. Section 5.4's protocol: RealWorldQA and MuirBench keep their `test` split as the
source and split it 1:1 (seeded, stratified by subtask) into `train` and `test`; BLINK's test
answers are hidden, so its `val` split is the source, split the same way. `train_split` or
`eval_split` (or `val_split`) = `all` takes the whole source split (train and evaluate on it).

The split is written to `split_dir/<benchmark>-<split>.json` (the ids, the seed and the source
files' names and sizes): its hash stands for the data in `stage.json` and the mining cache.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hcm.benchmarks.accuracy import BenchmarkAccuracy
from hcm.benchmarks.data import (
    BenchmarkDataset,
    BenchmarkPrompt,
    BenchmarkPromptCollator,
    BenchmarkSample,
    BenchmarkSFTCollator,
    benchmark_messages,
    decode,
    labels,
)
from hcm.benchmarks.readers import READERS, BenchmarkRecord
from hcm.benchmarks.sources import fingerprint
from hcm.benchmarks.split import stratified_split
from hcm.data.datamodule import ScreeningDataModule
from hcm.files import atomic_write_text

log = logging.getLogger(__name__)

SPLITS = ("train", "test", "all")


class BenchmarkDataModule(ScreeningDataModule):
    def __init__(
        self,
        benchmark: str,
        root: str,
        mode: str,
        model: dict,
        prompt: dict,
        prompts: dict,
        split_dir: str,
        source_split: str = "test",
        train_fraction: float = 0.5,
        split_seed: int = 0,
        subtasks: Sequence[str] | None = None,
        max_patches: int | None = None,
        sft_sources: Sequence[str] = ("direct",),
        **loading: Any,
    ):
        """The benchmark's own keys of conf/data/<benchmark>.yaml; `loading` holds the rest
        (splits, batch sizes, workers, the HCM schedule, seed), ScreeningDataModule's."""
        if benchmark not in READERS:
            raise ValueError(f"data.benchmark must be one of {sorted(READERS)}, got {benchmark!r}")
        if list(sft_sources) != ["direct"]:
            raise ValueError(
                f"data.sft_sources={list(sft_sources)}: the public benchmarks have direct answers "
                "only (no captions or CoT); use [direct]"
            )
        if max_patches is not None:  # multi-image questions: fewer tiles per image
            model = {**dict(model), "max_patches": max_patches}
        # The screening prompt config (prompt=direct|cot) picks which of `prompts` is used.
        super().__init__(
            root=root, mode=mode, model=model, prompt=prompt, sft_sources=sft_sources, **loading
        )
        for key in ("train_split", "val_split", "eval_split"):
            if (split := getattr(self, key)) not in SPLITS:
                raise ValueError(f"data.{key} must be one of {SPLITS}, got {split!r}")
        name = dict(prompt)["name"]
        if name not in prompts:
            raise ValueError(f"data.prompts has no entry for prompt {name!r}: {sorted(prompts)}")
        spec = dict(prompts[name])
        spec["remove"] = tuple(spec.get("remove") or ())
        self.prompt = BenchmarkPrompt(name=name, **spec)
        self.benchmark, self.source_split = benchmark, source_split
        self.train_fraction, self.split_seed = train_fraction, split_seed
        self.subtasks = list(subtasks) if subtasks is not None else None
        self.split_dir = Path(split_dir)
        self._source: list[BenchmarkRecord] | None = None

    # -- data on disk ------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Nothing to generate: the benchmark must be on disk (read here to fail early)."""
        self.source()

    def source(self) -> list[BenchmarkRecord]:
        """Every question of the source split, read once."""
        if self._source is None:
            kwargs = {"split": self.source_split}
            if self.subtasks is not None:
                kwargs["subtasks"] = self.subtasks
            records = READERS[self.benchmark](self.root, **kwargs)
            seen: set[str] = set()
            for r in records:
                if r.id in seen:
                    raise ValueError(f"{self.benchmark} under {self.root}: duplicate id {r.id!r}")
                seen.add(r.id)
            self._source = records
            log.info("%s: %d questions in %s", self.benchmark, len(records), self.root)
        return self._source

    def split_ids(self) -> dict[str, list[str]]:
        records = self.source()
        ids = [r.id for r in records]
        split = stratified_split(
            ids, [r.subtask for r in records], self.train_fraction, self.split_seed
        )
        return {**split, "all": ids}

    def manifest(self, split: str) -> Path:
        """The split's id file (written on first use): what stage.json and mining hash."""
        path = self.split_dir / f"{self.benchmark}-{split}.json"
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        content = {
            "benchmark": self.benchmark,
            "source_split": self.source_split,
            "train_fraction": self.train_fraction,
            "split_seed": self.split_seed,
            "split": split,
            "source_files": fingerprint(self.root),
            "ids": self.split_ids()[split],
        }
        text = json.dumps(content, indent=1) + "\n"
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)
        return path

    def load(self, split: str) -> list[BenchmarkRecord]:
        if split not in self.records:
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
            wanted = set(self.split_ids()[split])
            self.records[split] = [r for r in self.source() if r.id in wanted]
            self.manifest(split)
        return self.records[split]

    # -- model-side processing -----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        builder = self._builder()
        self.sft_collate = BenchmarkSFTCollator(builder, self.prompt)
        self.prompt_collate = BenchmarkPromptCollator(builder, self.prompt)
        if self.mode == "sft" and stage in (None, "fit"):
            self.sft_dataset = BenchmarkDataset(self.load(self.train_split))
        if self.mode == "grpo" and stage in (None, "fit"):
            self.train_dataset = BenchmarkDataset(self.load(self.train_split))
        self.set_held_out(stage, BenchmarkDataset)

    def make_metric(self) -> BenchmarkAccuracy:
        """Accuracy (Tables 8-10), per subtask too: what validation and test log."""
        return BenchmarkAccuracy(subtasks=[r.subtask for r in self.source()])

    # -- API evaluation (hcm.api_eval): the questions without a tokenizer -------------------------
    def eval_samples(self) -> list[BenchmarkSample]:
        return [decode(r) for r in self.load(self.eval_split)[: self.limit_eval]]

    def messages(self, sample: BenchmarkSample) -> list[dict]:
        return benchmark_messages(sample, self.prompt)

    def labels(self, samples: Sequence[BenchmarkSample]) -> dict[str, Any]:
        return labels(samples)
