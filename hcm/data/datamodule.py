"""The LightningDataModule: splits on disk (or the synthetic stream) to model-ready batches.

`mode` follows the stage: "sft" yields SFT items (sources of Table 5), "grpo" yields generation
prompts with their answers, ordered by the hard-case sampler (all data for `switch_epoch`
epochs, then the configured composition, Table 7), `oversample` x `batch_size` of them per step
(`train_batch_size`: more than batch_size only when module.difficulty_band keeps batch_size of
those drawn; conf/module/grpo.yaml sets it from the band). Validation yields prompts of
`val_split`, test (an eval stage) those of `eval_split`, both scored with the section-5.1 metric;
`limit_eval` keeps the first N of whichever of the two a stage scores. A training stage never reads
`eval_split` unless `val_split` names it (the default: `${data.eval_split}`).

Resuming mid-epoch: both training orders depend only on (seed, epoch), never on the global RNG,
and every checkpoint stores where this epoch's order had got to (`state_dict`), so a resumed run
skips the samples it already trained on and sees the rest in the same order. Lightning saves no
position for a plain DataLoader. (Streaming draws restart the interrupted epoch's stream.)

The hard set (HCM-GRPO) is this module's: `mine_hard_cases` mines it once (hcm/mining.py) with
the policy the GRPO module lends, or reads the cache, keeps it in every checkpoint (a stage that
resumes, or continues from another's checkpoint, never mines again) and hands it to the one
training sampler, which also counts the steps of the LR schedule (`batches_per_epoch`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig

from hcm.data import synthetic
from hcm.data.datasets import (
    SFT_SOURCES,
    PromptCollator,
    SampleDataset,
    SFTCollator,
    SFTDataset,
    StreamDataset,
    labels,
    prompt_messages,
)
from hcm.data.hard_cases import HardCaseSet
from hcm.data.manifest import load_manifest, manifest_hash
from hcm.data.records import ScreeningRecord, ScreeningSample, load_sample
from hcm.data.sampler import EvalSampler, HardCaseSampler, ResumableSampler
from hcm.mining import Mining, cache_params, log_truncated, mine, model_fingerprint
from hcm.model import loading
from hcm.model.inputs import InputBuilder
from hcm.predictions import gather_rows, publish
from hcm.prompts import Prompt
from hcm.screening_score import ScreeningScore

log = logging.getLogger(__name__)


class ScreeningDataModule(L.LightningDataModule):
    def __init__(
        self,
        root: str,
        mode: str,
        model: dict,
        prompt: dict,
        image_layout: str = "grid",
        sft_sources: Sequence[str] = ("answer_cot",),
        train_split: str = "train",
        eval_split: str = "test",
        val_split: str = "test",
        batch_size: int = 8,
        oversample: int = 1,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        limit_eval: int | None = None,
        skip_invalid: bool = False,
        check_images: bool = True,
        switch_epoch: int = 3,
        composition: str = "all",
        seed: int = 0,
        synthetic: dict | None = None,
        streaming: bool = False,
        samples_per_epoch: int = 1024,
    ):
        super().__init__()
        if mode not in ("sft", "grpo", "eval"):
            raise ValueError(f"data.mode must be sft, grpo or eval, got {mode!r}")
        unknown = sorted(set(sft_sources) - set(SFT_SOURCES))
        if unknown:
            raise ValueError(
                f"data.sft_sources has unknown {unknown}; expected {sorted(SFT_SOURCES)}"
            )
        self.root = Path(root)
        self.mode, self.model_cfg = mode, dict(model)
        self.prompt = Prompt(**dict(prompt))
        self.image_layout, self.sft_sources = image_layout, list(sft_sources)
        self.train_split, self.eval_split, self.val_split = train_split, eval_split, val_split
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.oversample = oversample
        self.num_workers, self.limit_eval, self.skip_invalid = num_workers, limit_eval, skip_invalid
        self.check_images = check_images
        self.switch_epoch, self.composition, self.seed = switch_epoch, composition, seed
        self.synthetic = dict(synthetic) if synthetic else None
        if streaming and self.synthetic is None:
            raise ValueError(
                "data.streaming draws from the synthetic generator: use data=synthetic"
            )
        if streaming and composition != "all":
            raise ValueError(
                "data.streaming has no fixed training set to mine: use composition=all"
            )
        self.streaming, self.samples_per_epoch = streaming, samples_per_epoch
        self.hard_indices: list[int] | None = None  # set by mining, or restored from a checkpoint
        self._train_sampler: HardCaseSampler | None = None
        self.resume_position: dict[str, int] | None = None  # from a checkpoint, until used
        self.records: dict[str, list[ScreeningRecord]] = {}

    # -- data on disk ------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Generate the synthetic benchmark into `root` when it is configured and missing (a
        concurrent job generating it is waited for: `synthetic.write_dataset`)."""
        if self.synthetic is None:
            return
        sizes, cfg, seed = synthetic.dataset_args(self.synthetic)
        synthetic.write_dataset(
            self.root, sizes, cfg, seed, workers=self.synthetic.get("workers", 1)
        )

    def manifest(self, split: str) -> Path:
        path = self.root / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: data.root must hold one JSONL manifest per split "
                f"(see hcm/data/manifest.py), or use data=synthetic to generate one"
            )
        return path

    def load(self, split: str) -> list[ScreeningRecord]:
        if split not in self.records:
            records, report = load_manifest(
                self.manifest(split), skip_invalid=self.skip_invalid, check_images=self.check_images
            )
            for err in report.skipped:
                log.warning("skipped invalid record: %s", err)
            if report.skipped:
                log.warning("%s: skipped %d invalid record(s)", report.path, len(report.skipped))
            self.records[split] = records
        return self.records[split]

    def manifest_hashes(self) -> dict[str, str]:
        """sha256 of each manifest this stage reads: recorded with the stage's outputs."""
        return {split: manifest_hash(self.manifest(split)) for split in self.records}

    def read_manifests(self) -> list[Path]:
        """The manifest of every split this run has read (what a stage's identity hashes)."""
        return [self.manifest(split) for split in self.records]

    # -- model-side processing -----------------------------------------------------------------
    def _builder(self) -> Any:
        path = loading.resolve_name_or_path(
            self.model_cfg["name_or_path"], self.model_cfg.get("tiny")
        )
        trust = self.model_cfg.get("trust_remote_code", False)
        return InputBuilder(
            loading.load_tokenizer(path, trust_remote_code=trust),
            loading.load_image_processor(path, trust_remote_code=trust),
            max_patches=self.model_cfg.get("max_patches", 1),
            image_seq_length=AutoConfig.from_pretrained(
                path, trust_remote_code=trust
            ).image_seq_length,
        )

    def setup(self, stage: str | None = None) -> None:
        builder = self._builder()
        args = (builder, self.prompt, self.image_layout)
        self.sft_collate, self.prompt_collate = SFTCollator(*args), PromptCollator(*args)
        if self.mode == "sft" and stage in (None, "fit") and not self.streaming:
            # (a stream draws its SFT items itself: no split needs to be on disk)
            by_source = {s: self.load(SFT_SOURCES[s]) for s in self.sft_sources}
            self.sft_dataset = SFTDataset(by_source)
            if len(self.sft_dataset) == 0:
                raise ValueError(f"no SFT items for sources {self.sft_sources} under {self.root}")
        if self.mode == "grpo" and stage in (None, "fit"):
            self.train_dataset = SampleDataset(self.load(self.train_split))
        self.set_held_out(stage, SampleDataset)

    def set_held_out(self, stage: str | None, dataset: type) -> None:
        """The held-out sets a stage scores, the first `limit_eval` samples of each: validation
        (fit, validate) reads `val_split`, test (an eval stage) `eval_split`."""
        wanted = {
            "val_dataset": ("val_split", ("fit", "validate")),
            "eval_dataset": ("eval_split", ("test",)),
        }
        for name, (key, stages) in wanted.items():
            if stage is None or stage in stages:
                records = self.load(getattr(self, key))[: self.limit_eval]
                if not records:
                    raise ValueError(
                        f"data.{key}={getattr(self, key)!r} has no samples in {self.root}"
                    )
                setattr(self, name, dataset(records))

    def make_metric(self) -> ScreeningScore:
        """The section-5.1 score: what validation and test log."""
        return ScreeningScore()

    # -- API evaluation (hcm.api_eval): the questions without a tokenizer -------------------------
    def eval_samples(self) -> list[ScreeningSample]:
        return [load_sample(r) for r in self.load(self.eval_split)[: self.limit_eval]]

    def messages(self, sample: ScreeningSample) -> list[dict]:
        return prompt_messages(sample, self.prompt, self.image_layout)

    def labels(self, samples: Sequence[ScreeningSample]) -> dict[str, Any]:
        return labels(samples)

    # -- the hard set (section 4.2): mined once, checkpointed, given to the sampler ----------------
    def mine_hard_cases(
        self, answer, rule: Mining, policy: str, max_new_tokens: int, lora: dict | None = None
    ) -> None:
        """Set the hard set: from the cache `rule.cache_path` when it holds this policy's, this
        manifest's and this rule's, else mined (`hcm.mining.mine`) by `answer(batch)`, the
        initial policy (with `lora`'s adapters, if any) answering within `max_new_tokens`. Each
        rank answers its shard."""
        ids = [r.id for r in self.load(self.train_split)]
        hashes = Path(rule.hash_cache) if rule.hash_cache else None
        key = {
            "model": policy,
            "fingerprint": model_fingerprint(policy, hashes),
            "manifest_sha256": manifest_hash(self.manifest(self.train_split)),
            "params": cache_params(
                rule,
                max_new_tokens,
                self.prompt,
                self.image_layout,
                self.model_cfg.get("max_patches"),
                chat_template=self.prompt_collate.builder.tokenizer.chat_template,
                precision=str(self.trainer.precision),
                seed=self.seed,
                lora=lora,
            ),
        }
        default = Path(self.trainer.default_root_dir) / "hard_cases.json"
        cache = Path(rule.cache_path) if rule.cache_path else default
        found = HardCaseSet.load(cache) if cache.is_file() else None
        stale = found.mismatches(**key) if found is not None else []
        if found is not None and not stale:
            log.info("hard cases from cache %s: %d hard / %d", cache, len(found.hard_ids), len(ids))
        else:
            if stale:
                log.info("mining cache %s is stale (%s); mining again", cache, "; ".join(stale))
            found = self._mine(answer, rule, key, cache)
        self.set_hard_cases(found.indices(ids))

    def _mine(self, answer, rule: Mining, key: dict, cache: Path) -> HardCaseSet:
        trainer, records = self.trainer, self.load(self.train_split)
        rank, world, _ = self._place()
        # as evaluation shards: every rank answers as many batches (generation is collective
        # under FSDP), the last ones padded with other ranks' cases, answered but not scored
        plan = EvalSampler(self.train_dataset, rank, world).batches(
            rule.batch_size or self.eval_batch_size
        )
        batches = (
            {**self.prompt_collate([self.train_dataset[i] for i in rows]), "scored": scored}
            for rows, scored in plan
        )
        bar = tqdm(batches, total=len(plan), desc="mining hard cases", disable=rank != 0)

        def reduce(t: torch.Tensor) -> torch.Tensor:  # each case was answered on exactly one rank
            return trainer.strategy.reduce(
                t.to(trainer.strategy.root_device), reduce_op="sum"
            ).cpu()

        ids = [r.id for r in records]
        mined = mine(answer, bar, ids, self.make_metric(), rule, reduce if world > 1 else None)
        verdicts = gather_rows(mined.verdicts, world)
        log_truncated(trainer, float(mined.truncated.mean()))
        found = HardCaseSet(mined.hard_ids, mined.easy_ids, **key)
        if trainer.is_global_zero:
            found.save(cache)
            # what the initial policy answered, case by case: predictions.jsonl and its gallery
            by_id, hard = {v["id"]: v for v in verdicts}, set(mined.hard_ids)
            rows = [
                {**by_id[case], "pass_rate": float(mined.right[i].mean()), "hard": case in hard}
                for i, case in enumerate(ids)
            ]
            folder = cache.parent / cache.stem  # hard_cases.json -> hard_cases/predictions.jsonl
            publish(folder, rows, records, self.root, trainer.loggers, "mining/predictions")
        trainer.strategy.barrier("hard-case cache")
        log.info("mined %d hard cases of %d (cache %s)", len(mined.hard_ids), len(ids), cache)
        return found

    def set_hard_cases(self, indices: Sequence[int] | None) -> None:
        """Hard-case indices into the train split (None: not mined yet)."""
        self.hard_indices = None if indices is None else sorted(indices)
        self._train_sampler = None  # the schedule after the switch changes with the hard set

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the hard set the first run mined, and the position in the
        training order (this rank's samples of the current epoch already trained on)."""
        state: dict[str, Any] = {"hard_indices": self.hard_indices}
        trainer = self.trainer
        if getattr(trainer, "fit_loop", None) is not None and trainer.state.fn == "fit":
            batches = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            state["position"] = {
                "epoch": trainer.current_epoch,
                "consumed": batches * self.train_batch_size,
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_hard_cases(state.get("hard_indices"))
        self.resume_position = state.get("position")

    def _resume(self, sampler: HardCaseSampler | ResumableSampler) -> None:
        """Put a new training sampler at the checkpoint's position, once. Lightning then sets the
        epoch it runs: the same keeps the offset, the next one (a checkpoint taken at the end of
        an epoch) starts from its beginning."""
        if self.resume_position is None:
            return
        epoch, consumed = self.resume_position["epoch"], self.resume_position["consumed"]
        self.resume_position = None
        sampler.set_epoch(epoch)
        sampler.set_start(min(consumed, len(sampler)))
        log.info(
            "checkpoint taken %d samples into epoch %d (this rank's): resuming", consumed, epoch
        )

    def _place(self) -> tuple[int, int, int]:
        """(this rank, the world size, the current epoch): (0, 1, 0) outside a Trainer."""
        t = self.trainer
        return (t.global_rank, t.world_size, t.current_epoch) if t else (0, 1, 0)

    def _sampler(self) -> HardCaseSampler:
        """The GRPO training sampler, built once per hard set (and rank): every epoch's loader and
        the step count use it."""
        if self.hard_indices is None and self.composition != "all":
            raise RuntimeError(
                f"composition {self.composition!r} needs hard cases: mine them first"
            )
        rank, world, _ = self._place()
        built = self._train_sampler
        if built is None or (built.rank, built.num_replicas) != (rank, world):
            self._train_sampler = HardCaseSampler(
                len(self.train_dataset),
                self.hard_indices or [],
                switch_epoch=self.switch_epoch,
                composition=self.composition,
                seed=self.seed,
                num_replicas=world,
                rank=rank,
            )
        return self._train_sampler

    def batches_per_epoch(self, epochs: int) -> list[int]:
        """Training batches in each of `epochs` GRPO epochs (epoch lengths change at the switch).
        Before mining, all-data epochs: exact until the switch, and asked again after mining."""
        if self.hard_indices is None and self.composition != "all":
            return [-(-len(self.train_dataset) // self.train_batch_size)] * epochs
        sampler = self._sampler()
        return [-(-sampler.epoch_length(e) // self.train_batch_size) for e in range(epochs)]

    @property
    def train_batch_size(self) -> int:
        """Samples per training batch: `oversample` x batch_size (module.difficulty_band trains
        on up to batch_size of them), the one size every training loader and count uses."""
        return self.oversample * self.batch_size

    def _loader(self, dataset, batch_size, collate, sampler=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=False,
            # its own generator: making an iterator draws a seed, never from the global RNG,
            # whose state (GRPO's sampling) a checkpoint restores
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _stream(self):
        """Fresh synthetic samples every step; a new draw each epoch (docs/science.md)."""
        rank, world, epoch = self._place()
        _, cfg, seed = synthetic.dataset_args(self.synthetic)
        stream = synthetic.SyntheticStream(
            cfg,
            seed=seed + 1,  # never the fixed splits' samples
            samples_per_epoch=self.samples_per_epoch,
            rank=rank,
            world_size=world,
        )
        stream.set_epoch(epoch)
        per_rank = self.samples_per_epoch // world
        return StreamDataset(stream, per_rank, self.sft_sources if self.mode == "sft" else ())

    def train_dataloader(self) -> DataLoader:
        if self.streaming:
            if self.trainer and self.trainer.reload_dataloaders_every_n_epochs != 1:
                raise ValueError(
                    "data.streaming needs trainer.reload_dataloaders_every_n_epochs=1, "
                    "or every epoch would draw the same samples"
                )
            collate = self.sft_collate if self.mode == "sft" else self.prompt_collate
            return self._loader(self._stream(), self.train_batch_size, collate)
        rank, world, epoch = self._place()
        if self.mode == "sft":
            sampler = ResumableSampler(
                self.sft_dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed
            )
            sampler.set_epoch(epoch)
            self._resume(sampler)
            return self._loader(self.sft_dataset, self.train_batch_size, self.sft_collate, sampler)
        if self.mode != "grpo":
            raise RuntimeError(f"data.mode={self.mode!r} has no training data")
        sampler = self._sampler()
        sampler.set_epoch(epoch)
        self._resume(sampler)
        return self._loader(
            self.train_dataset, self.train_batch_size, self.prompt_collate, sampler=sampler
        )

    def _held_out_loader(self, dataset) -> DataLoader:
        rank, world, _ = self._place()
        sampler = EvalSampler(dataset, rank, world)
        return self._loader(dataset, self.eval_batch_size, self.prompt_collate, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._held_out_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        return self._held_out_loader(self.eval_dataset)
