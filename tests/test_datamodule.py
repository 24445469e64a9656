"""The DataModule: SFT sources (Table 5), GRPO prompts in hard-case order, streaming, state."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

from hcm.data.datasets import StreamDataset


@pytest.fixture
def datamodule(compose_cfg):
    def make(*overrides):
        cfg = compose_cfg("train", ["experiment=tiny_sft", *overrides])
        dm = instantiate(cfg.data, _convert_="all")
        dm.prepare_data()
        return dm

    return make


def test_sft_sources_pick_splits_and_targets(datamodule):
    dm = datamodule("data.sft_sources=[caption,weak_cot,answer_cot,direct]")
    dm.setup("fit")
    items = dm.sft_dataset.items
    sources = ("caption", "weak_cot", "answer_cot", "direct")
    by_source = {s: [r for r, src in items if src == s] for s in sources}
    assert len(by_source["caption"]) == len(by_source["weak_cot"]) == 24  # pseudo_label split
    assert len(by_source["answer_cot"]) == len(by_source["direct"]) == 24  # train split
    assert all(r.id.startswith("pseudo_label-") for r in by_source["caption"])
    direct = next(dm.sft_dataset[i] for i, (_, s) in enumerate(items) if s == "direct")
    assert direct.target == direct.sample.answer
    items3 = [dm.sft_dataset[i] for i in range(3)]
    batch = dm.sft_collate(items3)
    labels = batch["labels"]
    assert labels.shape == batch["input_ids"].shape
    tokenizer = dm.sft_collate.builder.tokenizer
    for row, item in zip(labels, items3, strict=True):
        # eq. 1: only the assistant reply and its closing <|im_end|> carry loss
        assert tokenizer.decode(row[row != -100]) == item.target + "<|im_end|>"
    assert torch.equal(batch["input_ids"][labels != -100], labels[labels != -100])


def test_grpo_prompts_follow_the_hard_case_schedule(datamodule):
    dm = datamodule("module=grpo", "data.switch_epoch=1", "data.composition=all_plus_hard")
    dm.setup("fit")
    assert dm.hard_indices is None
    assert dm.batches_per_epoch(2) == [12, 12]  # before mining: all-data epochs
    dm.set_hard_cases([5, 2, 7])
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0, current_epoch=1)
    loader = dm.train_dataloader()
    order = list(loader.sampler)
    assert len(order) == 24 + 3 and sorted(order).count(2) == 2
    batch = next(iter(loader))
    # prompts are left-padded for generation: the last position is always a real token
    assert (batch["inputs"]["attention_mask"][:, -1] == 1).all()
    assert batch["answers"] == [dm.train_dataset.records[i].answer for i in order[:2]]
    assert dm.batches_per_epoch(2) == [12, 14]  # ceil(24/2) then ceil(27/2)
    assert dm._sampler() is loader.sampler  # the step count reads the loader's own sampler
    state = dm.state_dict()
    fresh = datamodule("module=grpo", "data.switch_epoch=1", "data.composition=all_plus_hard")
    fresh.load_state_dict(state)
    assert fresh.hard_indices == [2, 5, 7]


def test_streaming_draws_fresh_samples_each_epoch(datamodule):
    dm = datamodule("data.streaming=true", "data.samples_per_epoch=4")
    dm.setup("fit")
    ids = []
    for epoch in (0, 1):
        dm.trainer = SimpleNamespace(
            world_size=1, global_rank=0, current_epoch=epoch, reload_dataloaders_every_n_epochs=1
        )
        loader = dm.train_dataloader()
        assert isinstance(loader.dataset, StreamDataset) and len(loader.dataset) == 4
        ids.append([i for b in loader for i in b["ids"]])
    assert len(ids[0]) == 4 and not set(ids[0]) & set(ids[1])
    dm.trainer.reload_dataloaders_every_n_epochs = 0
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=1"):
        dm.train_dataloader()


def test_missing_manifest_says_what_to_put_where(compose_cfg, tmp_path):
    cfg = compose_cfg("train", ["experiment=tiny_sft", "data=screening", f"data.root={tmp_path}"])
    dm = instantiate(cfg.data, _convert_="all")
    with pytest.raises(FileNotFoundError, match="one JSONL manifest per split"):
        dm.setup("fit")


@pytest.mark.parametrize(("n", "world"), [(5, 2), (6, 2), (7, 3), (2, 4)])
def test_eval_sampler_shards_every_sample_once_and_pads_last(n, world):
    from hcm.data.sampler import EvalSampler

    shards = [EvalSampler(list(range(n)), rank, world) for rank in range(world)]
    assert len({len(list(s)) for s in shards}) == 1  # the same number of batches on every rank
    unique = [list(s)[: s.unique] for s in shards]
    assert sorted(i for u in unique for i in u) == list(range(n))  # each sample exactly once
    assert all(u == list(range(rank, n, world)) for rank, u in enumerate(unique))


def test_validation_reads_val_split_and_the_eval_stage_eval_split(datamodule):
    dm = datamodule("data.synthetic.sizes.val=6", "data.val_split=val", "data.limit_eval=4")
    dm.setup("fit")  # training: validation on `val`, the test split never read
    assert sorted(dm.records) == ["train", "val"]
    assert [r.id for r in dm.val_dataloader().dataset.records] == [f"val-{i:06d}" for i in range(4)]
    dm.setup("test")  # an eval stage (evaluate.py: trainer.test) scores `eval_split`
    assert [r.id for r in dm.test_dataloader().dataset.records] == [
        f"test-{i:06d}" for i in range(4)
    ]
    assert dm.val_dataloader().dataset is not dm.test_dataloader().dataset
    default = datamodule()  # val_split defaults to eval_split: validation on test, as before
    default.setup("validate")
    assert default.val_split == "test" and default.val_dataset.records[0].id == "test-000000"
    empty = datamodule("data.val_split=val")  # synthetic_tiny has no val samples
    with pytest.raises(ValueError, match=r"data\.val_split='val' has no samples"):
        empty.setup("fit")
