"""Hard-case mining (section 4.2): the initial policy answers every training sample.

Wrong answers (section-5.1 metric) are hard cases, right ones easy. Greedy by default; with
`k` > 1 samples per case and a pass-rate threshold, a case is easy when at least
`pass_threshold` of its answers are right. Each rank answers its shard of the training set;
the verdicts are gathered, rank 0 writes the cache, and every rank reads the same hard set.

The cache (`HardCaseSet`) records the model it came from (a fingerprint of its files), the
manifest's hash and the mining parameters, and is reused only when all three match. Mining runs
before the first GRPO step: on resume the policy has moved, so the cache written the first time
is what keeps the hard set the initial policy's.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hcm.answers import extract_answer, is_acceptable
from hcm.data.hard_cases import HardCaseSet, classify
from hcm.data.records import manifest_hash

log = logging.getLogger(__name__)


def model_fingerprint(path: str | Path) -> str:
    """Identify a model folder by its config and the size and head of each weight file.

    Hashing multi-GB weights in full costs seconds per GB; a weight file that changed keeps its
    size and first MiB only by design, which training never does.
    """
    path = Path(path)
    h = hashlib.sha256()
    if not path.is_dir():  # a hub id: its name is its identity
        h.update(str(path).encode())
        return h.hexdigest()
    for f in sorted(path.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin"):
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
    return h.hexdigest()


def mine_hard_cases(
    module: Any,
    datamodule: Any,
    cache_path: str | None = None,
    k: int = 1,
    pass_threshold: float = 1.0,
    temperature: float = 1.0,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
) -> list[int]:
    """Hard-case indices into the train split, from the cache when it matches, else mined."""
    trainer = module.trainer
    records = datamodule.load(datamodule.train_split)
    ids = [r.id for r in records]
    model_path = module.model_path
    fingerprint = model_fingerprint(model_path)
    manifest_sha = manifest_hash(datamodule.manifest(datamodule.train_split))
    params = {
        "k": k,
        "pass_threshold": pass_threshold,
        "greedy": k == 1,
        "temperature": temperature,
        "prompt": datamodule.prompt.name,
        "max_new_tokens": max_new_tokens or module.eval_generation["max_new_tokens"],
    }
    cache = Path(cache_path) if cache_path else Path(trainer.default_root_dir) / "hard_cases.json"
    if cache.is_file():
        cached = HardCaseSet.load(cache)
        if cached.matches(str(model_path), fingerprint, manifest_sha, params):
            log.info(
                "hard cases from cache %s: %d hard / %d", cache, len(cached.hard_ids), len(ids)
            )
            return cached.indices(ids)
        log.info(
            "mining cache %s is stale (%s); mining again",
            cache,
            cached.mismatches(str(model_path), fingerprint, manifest_sha, params),
        )

    rank, world = trainer.global_rank, trainer.world_size
    shard = list(range(rank, len(records), world))
    correct = torch.zeros(len(records), k)  # rows of other ranks stay 0
    collate = datamodule.prompt_collate
    size = batch_size or datamodule.eval_batch_size
    gen_kwargs = {"max_new_tokens": params["max_new_tokens"], "do_sample": k > 1}
    if k > 1:
        gen_kwargs.update(temperature=temperature, num_return_sequences=k)
    was_training = module.model.training
    module.model.eval()
    bar = tqdm(range(0, len(shard), size), desc="mining hard cases", disable=rank != 0)
    for start in bar:
        rows = shard[start : start + size]
        batch = collate([datamodule.train_dataset[i] for i in rows])
        batch["inputs"] = {k_: v.to(module.device) for k_, v in batch["inputs"].items()}
        with torch.no_grad():
            texts = module.answer(batch, **gen_kwargs)
        for j, i in enumerate(rows):
            for s in range(k):
                verdict = is_acceptable(extract_answer(texts[j * k + s]), records[i].answer)
                correct[i, s] = float(verdict)
    module.model.train(was_training)
    if world > 1:  # each row was answered on exactly one rank, so the sum is that rank's verdict
        correct = trainer.strategy.reduce(correct.to(module.device), reduce_op="sum").cpu()
    hard_ids, easy_ids = classify(
        {ids[i]: [bool(c) for c in correct[i].tolist()] for i in range(len(ids))}, pass_threshold
    )
    found = HardCaseSet(hard_ids, easy_ids, str(model_path), fingerprint, manifest_sha, params)
    if trainer.is_global_zero:
        found.save(cache)
    trainer.strategy.barrier("hard-case cache")
    log.info("mined %d hard cases of %d (cache %s)", len(hard_ids), len(ids), cache)
    return found.indices(ids)
