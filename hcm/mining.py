"""Hard-case mining (section 4.2): the initial policy answers every training sample.

Wrong answers are hard cases, right ones easy. The paper does not say which rule makes an answer
right; `correct` chooses: "metric" (the default) is section 5.1's, so "A" for "AC" is right (easy),
"exact" needs the whole acceptable set, so "A" for "AC" is hard. (The public benchmarks have one
answer per question, where both rules agree.) Answers are judged by the datamodule's metric, the
one that scores evaluation (`is_right`). Greedy by default (the paper); with `k` > 1 samples per
case (at `temperature`, full softmax) and a pass-rate threshold, a case is easy when at least
`pass_threshold` of its answers are right. A cut CoT has no answer: a hard case.

`mine` is the whole rule as a function of an `answer(batch)` callable (the policy, or a stub in
tests), the batches of training cases and the rule: no Lightning. Its owner is the datamodule
(`ScreeningDataModule.mine_hard_cases`), which shards the cases across ranks, caches the result
(`HardCaseSet`, keyed by `model_fingerprint` and `cache_params`), checkpoints it and hands it to
the sampler.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hcm import fingerprints

log = logging.getLogger(__name__)

CORRECTNESS = ("metric", "exact")  # which answers mining calls right (module docstring)
# The files of a model folder that decide its answers (the chat template enters by its text)
WEIGHT_SUFFIXES = (".json", ".safetensors", ".bin")


def classify(
    correct: Mapping[str, Sequence[bool]], pass_threshold: float = 1.0
) -> tuple[list[str], list[str]]:
    """Split sample ids into (hard_ids, easy_ids), each sorted.

    `correct[id]` holds the correctness of k answers to that sample (k=1 for greedy decoding).
    A sample is easy when its pass rate, the fraction of its answers that are right, is at least
    `pass_threshold` in (0, 1], and hard otherwise. At k=1 every such threshold gives the paper's
    rule: wrong = hard, right = easy. The default 1.0 makes a sample hard as soon as one of its
    k answers is wrong.

    >>> classify({"s1": [True], "s2": [False], "s3": [True, False]})
    (['s2', 's3'], ['s1'])
    """
    if isinstance(pass_threshold, bool) or not isinstance(pass_threshold, int | float):
        raise ValueError(f"pass_threshold must be a number in (0, 1], got {pass_threshold!r}")
    if not 0 < pass_threshold <= 1:
        raise ValueError(f"pass_threshold must be in (0, 1], got {pass_threshold!r}")
    hard, easy = [], []
    for sample_id, answers in correct.items():
        if not isinstance(sample_id, str) or not sample_id:
            raise ValueError(f"sample ids must be non-empty strings, got {sample_id!r}")
        answers = list(answers)
        if not answers:
            raise ValueError(f"sample {sample_id!r} has no answers to classify")
        if not all(isinstance(a, bool | np.bool_) for a in answers):
            raise ValueError(f"sample {sample_id!r}: correctness must be bools, got {answers!r}")
        pass_rate = sum(bool(a) for a in answers) / len(answers)
        (easy if pass_rate >= pass_threshold else hard).append(sample_id)
    return sorted(hard), sorted(easy)


@dataclass(frozen=True)
class Mining:
    """The rule: `module.mining` of conf/module/grpo.yaml (defaults and meanings there; checked
    at start-up by hcm/config.py)."""

    cache_path: str | None
    k: int  # answers per case; 1 = greedy
    pass_threshold: float  # with k > 1: easy when at least this fraction is right
    temperature: float  # with k > 1: sampling temperature (full softmax)
    correct: str  # "metric" or "exact" (module docstring)
    batch_size: int | None  # cases per answer() call; None: data.eval_batch_size
    hash_cache: str | None = None  # where the weights' sha256 are cached (model_fingerprint)

    def sampling(self) -> dict[str, Any]:
        """How `answer` must decode: greedily, or k samples per case at `temperature`."""
        if self.k == 1:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "group_size": self.k}


@dataclass
class Mined:
    """Mining's result: the hard and easy ids, and per case (N, k) which answers were right and
    which were cut by the budget; `verdicts`: the metric's verdict on each first answer."""

    hard_ids: list[str]
    easy_ids: list[str]
    right: torch.Tensor  # (N, k)
    truncated: torch.Tensor  # (N, k)
    verdicts: list[dict]


def model_fingerprint(path: str | Path, cache: Path | None = None) -> str:
    """Identify a model folder by the sha256 of its config and weight files (a hub id by its
    name and cached revision). The hashes are cached in `cache` by size and mtime
    (`hcm.fingerprints.sha256_file`), so a model is read in full once, not at every stage."""
    files = [f for f in fingerprints.model_files(str(path)) if f.suffix in WEIGHT_SUFFIXES]
    if files:
        blob = {f.name: fingerprints.sha256_file(f, cache) for f in files}
    else:  # a hub id
        blob = {fingerprints.HUB + str(path): fingerprints.hub_revision(str(path))}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


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


def cache_params(
    rule: Mining,
    max_new_tokens: int,
    prompt: Any,
    image_layout: str,
    max_patches: int | None,
    *,
    chat_template: str | None,
    precision: str,
    seed: int,
    lora: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything besides the model and the manifest that decides the hard set: the cache key.

    The prompt enters by its text, not its name, and with the chat template that wraps it, the
    image layout and tiling, since they change what the model sees; the precision mining
    decodes in (bf16 autocast changes greedy answers); the temperature and the seed only when
    sampling (k > 1); the LoRA settings only when the policy has adapters (a full fine-tuning
    stage keeps its key). Inside a stage's hashed folder the config covers most of these, but
    `module.mining.cache_path` may name a file that jobs of other configs share.
    """
    prompt_text = json.dumps([prompt.system, prompt.user])
    sampled = rule.k > 1
    params = {
        "k": rule.k,
        "pass_threshold": rule.pass_threshold,
        "greedy": not sampled,
        "temperature": rule.temperature if sampled else None,
        "seed": seed if sampled else None,
        "max_new_tokens": max_new_tokens,
        "correct": rule.correct,
        "prompt": prompt.name,
        "prompt_sha256": hashlib.sha256(prompt_text.encode()).hexdigest(),
        "chat_template_sha256": hashlib.sha256((chat_template or "").encode()).hexdigest(),
        "image_layout": image_layout,
        "max_patches": max_patches,
        "precision": precision,
    }
    if lora:
        params["lora"] = dict(lora)
    return params


def mine(
    answer: Callable[[dict], Any],
    batches: Iterable[dict],
    ids: Sequence[str],
    metric: Any,
    rule: Mining,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Mined:
    """The hard cases among `ids` (the training split, in order), answered batch by batch.

    `answer(batch)` returns the k answers of each case of a PromptCollator batch, case-major
    ([c0a0 .. c0a{k-1}, c1a0, ...]), as `.texts` and `.truncated` (a Generation). `batches` may
    cover only some cases (this rank's shard): `reduce` sums the (2, N, k) verdicts across
    ranks, each case answered on exactly one. A batch's `scored` (default: all) counts its
    first rows that are this rank's cases; the rest pad the shard and are answered, not judged.
    `metric.judge` rules on each answer.
    """
    k, position = rule.k, {case: n for n, case in enumerate(ids)}
    right = torch.zeros(len(ids), k)  # (N, k)
    truncated = torch.zeros(len(ids), k)  # (N, k)
    verdicts: list[dict] = []
    for batch in batches:
        out = answer(batch)
        if len(out.texts) != len(batch["ids"]) * k:
            raise RuntimeError(f"{len(out.texts)} answers for {len(batch['ids'])} cases x k={k}")
        n = batch.get("scored", len(batch["ids"]))
        rows = [position[case] for case in batch["ids"][:n]]
        texts = out.texts[: n * k]  # (n*k,) case-major
        truncated[rows] = out.truncated[: n * k].float().cpu().view(n, k)
        labels = [batch[key][:n] for key in metric.batch_keys]
        for s in range(k):  # answer s of every case in the batch
            judged = metric.judge(texts[s::k], *labels)
            for j, i in enumerate(rows):
                right[i, s] = float(is_right(judged[j], rule.correct))
            if s == 0:
                verdicts += [{"id": ids[i], **judged[j]} for j, i in enumerate(rows)]
    if reduce is not None:
        right, truncated = reduce(torch.stack([right, truncated]))
    correct = {ids[i]: [bool(c) for c in right[i].tolist()] for i in range(len(ids))}
    hard_ids, easy_ids = classify(correct, rule.pass_threshold)
    return Mined(hard_ids, easy_ids, right, truncated, verdicts)


def log_truncated(trainer: Any, fraction: float) -> None:
    """The fraction of mining's answers cut by the budget: to the log and the run's loggers."""
    log.info("mining: %.1f%% of the answers ran into max_new_tokens", 100 * fraction)
    if trainer.is_global_zero:
        for lg in trainer.loggers:
            lg.log_metrics({"mining/completion_length/truncated_frac": fraction}, step=0)
