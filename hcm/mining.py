"""Hard-case mining (section 4.2): the initial policy answers every training sample.

Wrong answers are hard cases, right ones easy. The paper does not say which rule makes an answer
right; `correct` chooses: "metric" (the default) is section 5.1's, so "A" for "AC" is right (easy),
"exact" needs the whole acceptable set, so "A" for "AC" is hard. (The public benchmarks have one
answer per question, where both rules agree.) Answers are judged by the datamodule's metric, the
one that scores evaluation (`is_right`). Greedy by default
(the paper); with `k` > 1 samples per case (at `temperature`, full softmax) and a pass-rate
threshold, a case is easy when at least `pass_threshold` of its answers are right. Answers get
the module's evaluation budget (`max_completion_length`); the fraction cut by it is logged as
`mining/completion_length/truncated_frac` (a cut CoT has no answer: a hard case). Answers come
from the module's `answer`, i.e. `hcm.model.generation.generate`, which never emits image
tokens. Each rank answers its shard of the training set; the verdicts are summed across ranks,
rank 0 writes the cache, and every rank returns the same hard set.

The cache (`HardCaseSet`) records the model it came from (a fingerprint of its files), the
manifest's hash and the mining parameters, and is reused only when all three match. Mining runs
before the first GRPO step: on resume the policy has moved, so the cache written the first time
is what keeps the hard set the initial policy's.

Beside the cache, `hard_cases/predictions.jsonl` (hcm.predictions) holds each case's first
answer, its verdict, pass rate and whether it is hard, and `hard_cases/gallery.html` shows them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hcm.data.hard_cases import HardCaseSet, classify
from hcm.data.manifest import manifest_hash
from hcm.predictions import gather_rows, publish

log = logging.getLogger(__name__)

CORRECTNESS = ("metric", "exact")  # which answers mining calls right (module docstring)


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


def is_right(verdict: dict[str, Any], correct: str) -> bool:
    """Whether mining calls an answer right, from the metric's verdict on it (`judge`).

    "metric": the section-5.1 verdict; "exact": also the whole acceptable set (DPA 1). A public
    benchmark's verdict has no DPA: one answer per question, where both rules agree.

    >>> part = {"correct": True, "dpa": 0.5}  # "A" for "AC"
    >>> is_right(part, "metric"), is_right(part, "exact"), is_right({"correct": True}, "exact")
    (True, False, True)
    """
    if correct == "exact" and "dpa" in verdict:
        return bool(verdict["correct"]) and verdict["dpa"] == 1.0
    return bool(verdict["correct"])


def mining_params(
    module: Any,
    datamodule: Any,
    k: int,
    pass_threshold: float,
    temperature: float,
    correct: str,
) -> dict[str, Any]:
    """Everything besides the model and the manifest that decides the hard set: the cache key.

    The prompt enters by its text, not its name, and with the image layout and tiling, since
    they change what the model sees; the temperature only when sampling (k > 1).
    """
    prompt = datamodule.prompt
    prompt_text = json.dumps([prompt.system, prompt.user])
    return {
        "k": k,
        "pass_threshold": pass_threshold,
        "greedy": k == 1,
        "temperature": temperature if k > 1 else None,
        "max_new_tokens": module.eval_generation["max_new_tokens"],
        "correct": correct,
        "prompt": prompt.name,
        "prompt_sha256": hashlib.sha256(prompt_text.encode()).hexdigest(),
        "image_layout": datamodule.image_layout,
        "max_patches": datamodule.model_cfg.get("max_patches"),
    }


def mine_hard_cases(
    module: Any,
    datamodule: Any,
    cache_path: str | None = None,
    k: int = 1,
    pass_threshold: float = 1.0,
    temperature: float = 1.0,
    correct: str = "metric",
    batch_size: int | None = None,
) -> list[int]:
    """Hard-case indices into the train split, from the cache when it matches, else mined.

    `module` is the GRPO LightningModule attached to its Trainer (its `answer` generates, its
    `model_path` is the initial policy); `datamodule` is set up for fitting.
    """
    if k < 1:
        raise ValueError(f"mining.k must be >= 1, got {k}")
    if correct not in CORRECTNESS:
        raise ValueError(f"mining.correct must be one of {CORRECTNESS}, got {correct!r}")
    trainer = module.trainer
    records = datamodule.load(datamodule.train_split)
    ids = [r.id for r in records]
    model_path = str(module.model_path)
    fingerprint = model_fingerprint(model_path)
    manifest_sha = manifest_hash(datamodule.manifest(datamodule.train_split))
    params = mining_params(module, datamodule, k, pass_threshold, temperature, correct)
    cache = Path(cache_path) if cache_path else Path(trainer.default_root_dir) / "hard_cases.json"
    if cache.is_file():
        cached = HardCaseSet.load(cache)
        stale = cached.mismatches(model_path, fingerprint, manifest_sha, params)
        if not stale:
            log.info(
                "hard cases from cache %s: %d hard / %d", cache, len(cached.hard_ids), len(ids)
            )
            return cached.indices(ids)
        log.info("mining cache %s is stale (%s); mining again", cache, "; ".join(stale))

    gen_kwargs: dict[str, Any] = {"max_new_tokens": params["max_new_tokens"], "do_sample": k > 1}
    if k > 1:
        gen_kwargs.update(temperature=temperature, num_return_sequences=k)
    right, truncated, verdicts = answer_shard(
        module,
        datamodule,
        records,
        k,
        gen_kwargs,
        batch_size or datamodule.eval_batch_size,
        correct,
    )
    if trainer.world_size > 1:  # each row was answered on exactly one rank: the sum is its verdict
        both = torch.stack([right, truncated]).to(module.device)  # (2, N, k)
        right, truncated = trainer.strategy.reduce(both, reduce_op="sum").cpu()
    verdicts = gather_rows(verdicts, trainer.world_size)
    log_truncated(trainer, float(truncated.mean()))
    hard_ids, easy_ids = classify(
        {ids[i]: [bool(c) for c in right[i].tolist()] for i in range(len(ids))}, pass_threshold
    )
    found = HardCaseSet(hard_ids, easy_ids, model_path, fingerprint, manifest_sha, params)
    if trainer.is_global_zero:
        found.save(cache)
        # what the initial policy answered, case by case: predictions.jsonl and its gallery
        by_id, hard = {v["id"]: v for v in verdicts}, set(hard_ids)
        rows = [
            {**by_id[rid], "pass_rate": float(right[i].mean()), "hard": rid in hard}
            for i, rid in enumerate(ids)
        ]
        folder = cache.parent / cache.stem  # hard_cases.json -> hard_cases/predictions.jsonl
        publish(folder, rows, records, datamodule.root, trainer.loggers, "mining/predictions")
    trainer.strategy.barrier("hard-case cache")
    log.info("mined %d hard cases of %d (cache %s)", len(hard_ids), len(ids), cache)
    return found.indices(ids)


def log_truncated(trainer: Any, fraction: float) -> None:
    """The fraction of mining's answers cut by the budget: to the log and the run's loggers."""
    log.info("mining: %.1f%% of the answers ran into max_new_tokens", 100 * fraction)
    if trainer.is_global_zero:
        for lg in trainer.loggers:
            lg.log_metrics({"mining/completion_length/truncated_frac": fraction}, step=0)


def answer_shard(
    module: Any,
    datamodule: Any,
    records: list,
    k: int,
    gen_kwargs: dict[str, Any],
    batch_size: int,
    correct: str,
) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """(len(records), k) twice: 1.0 where answer s of case i is right (under the rule `correct`,
    see `is_right`), and 1.0 where it was cut by max_new_tokens, rows of other ranks 0; and the
    verdict of each of this rank's cases on its first answer (a row of predictions.jsonl).

    Rank r answers cases r, r + world, ...; a progress bar on rank 0. Answers are judged by the
    datamodule's metric (section 5.1's for screening, a public benchmark's single answer).
    """
    trainer = module.trainer
    rank, world = trainer.global_rank, trainer.world_size
    shard = list(range(rank, len(records), world))
    right = torch.zeros(len(records), k)  # (N, k)
    truncated = torch.zeros(len(records), k)  # (N, k)
    metric = datamodule.make_metric()
    verdicts: list[dict] = []
    was_training = module.model.training
    module.model.eval()
    bar = tqdm(range(0, len(shard), batch_size), desc="mining hard cases", disable=rank != 0)
    for start in bar:
        rows = shard[start : start + batch_size]
        batch = datamodule.prompt_collate([datamodule.train_dataset[i] for i in rows])
        batch["inputs"] = {key: v.to(module.device) for key, v in batch["inputs"].items()}
        with torch.no_grad():
            out = module.answer(batch, **gen_kwargs)  # [c0a0 .. c0a{k-1}, c1a0, ...]
        texts = out.texts
        if len(texts) != len(rows) * k:
            raise RuntimeError(f"{len(texts)} answers for {len(rows)} cases x k={k}")
        truncated[rows] = out.truncated.float().cpu().view(len(rows), k)
        labels = [batch[key] for key in metric.batch_keys]
        for s in range(k):  # answer s of every case in the batch
            judged = metric.judge(texts[s::k], *labels)
            for j, i in enumerate(rows):
                right[i, s] = float(is_right(judged[j], correct))
            if s == 0:
                verdicts += [{"id": records[i].id, **judged[j]} for j, i in enumerate(rows)]
    module.model.train(was_training)
    return right, truncated, verdicts
