"""Stage 2: GRPO (eqs. 2-5) with the DPA reward (eq. 7), and hard-case mining (HCM-GRPO).

One training step, as in the paper:
    rollout    = G completions per prompt from the current policy (top_k, top_p, temperature)
    rewards    = weighted reward functions (format + accuracy for GRPO, format + dpa for DPA-GRPO)
    advantages = group_advantages(rewards, G)                                  (eq. 2)
    loss       = policy_loss(logprobs, old, ref, advantages)                   (eqs. 3-5)
repeated `num_iterations` (mu) times over the same rollout, each pass in mini-batches of
completions whose gradients accumulate into one optimizer step.

The ratio and the KL are taken over the model's full softmax at the sampling temperature, not
the top-k/top-p-truncated distribution the completions were drawn from (as TRL does): the
truncated distribution assigns probability 0 to tokens outside the top-k, so a ratio over it is
undefined wherever the policy moves mass across the cut-off.

Departures from the paper, each a config knob: `old_logprobs` are the rollout policy's, and with
mu = 1 they equal the current ones detached (ratio 1, as TRL), saving a forward pass; groups with
zero reward variance can be resampled (DAPO's dynamic sampling), off by default.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from hcm.grpo import group_advantages, policy_loss, zero_variance_groups
from hcm.logprobs import completion_logprobs
from hcm.modules.base import ScreeningModule
from hcm.rewards import score

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """G completions for each of B prompts, laid out [p0c0 .. p0c{G-1}, p1c0, ...]."""

    input_ids: torch.Tensor  # (B*G, P+L) prompt (left-padded) + completion (right-padded)
    attention_mask: torch.Tensor  # (B*G, P+L)
    completion_mask: torch.Tensor  # (B*G, L)
    pixel_values: torch.Tensor  # (tiles*G, 3, H, W), each prompt's tiles repeated G times
    tiles: list[int]  # (B*G,) tiles per sequence, to slice pixel_values by sequence
    texts: list[str]
    answers: list[str]
    rewards: torch.Tensor  # (B*G,)
    per_reward: dict[str, torch.Tensor]
    advantages: torch.Tensor  # (B*G,)
    old_logprobs: torch.Tensor | None = None  # (B*G, L), None when mu == 1
    ref_logprobs: torch.Tensor | None = None  # (B*G, L), None when beta == 0

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def pixels_of(self, rows: list[int]) -> torch.Tensor:
        """The tiles of sequences `rows` (pixel_values is flattened in sequence order)."""
        per_seq = self.pixel_values.split(self.tiles)
        return torch.cat([per_seq[r] for r in rows])


def pad_right(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    """Stack (n_i, L_i) tensors into (sum n_i, max L_i), padding on the right."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat(
        [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors]
    )


class GRPOModule(ScreeningModule):
    def __init__(
        self,
        model: dict,
        freeze: dict | None = None,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        eval_generation: dict | None = None,
        group_size: int = 4,
        beta: float = 0.04,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        num_iterations: int = 1,
        loss_level: str = "token",
        loss_agg: str = "sequence_mean",
        advantage_scale: str = "group",
        rewards: dict | None = None,
        sampling: dict | None = None,
        mini_batch_size: int | None = None,
        logprob_chunk_size: int = 1024,
        max_grad_norm: float | None = 1.0,
        resample_zero_variance: int = 0,
        mining: dict | None = None,
        log_completions_every_n_steps: int = 50,
    ):
        super().__init__(model, freeze, optimizer, scheduler, eval_generation)
        self.automatic_optimization = False  # mu updates and mini-batches per rollout
        self.G, self.beta = group_size, beta
        self.clip_eps, self.clip_eps_high = clip_eps, clip_eps_high
        self.num_iterations = num_iterations
        self.loss_level, self.loss_agg, self.advantage_scale = loss_level, loss_agg, advantage_scale
        self.reward_weights = dict(rewards or {"format": 1.0, "dpa": 1.0})
        self.sampling = {
            "temperature": 1.0,
            "top_k": 3,
            "top_p": 0.8,
            "max_new_tokens": 256,
            **(sampling or {}),
        }
        self.mini_batch_size = mini_batch_size
        self.logprob_chunk_size, self.max_grad_norm = logprob_chunk_size, max_grad_norm
        self.resample_zero_variance = resample_zero_variance
        self.mining = dict(mining or {})
        self.log_completions_every_n_steps = log_completions_every_n_steps
        self.ref_model: Any = None
        self.strict_loading = False  # checkpoints leave out the frozen reference model

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        if self.beta > 0:  # the frozen reference: the initial checkpoint (eq. 4)
            self.ref_model = self.load_policy().eval().requires_grad_(False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The reference is the initial checkpoint, reloaded on resume: don't store it twice.
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("ref_model.")]:
            del state[key]

    def total_steps(self) -> int:
        # Epochs after switch_epoch are longer (all_plus_hard), which Lightning's estimate misses.
        dm = self.trainer.datamodule
        if not dm.hard_indices_known and dm.composition != "all":
            # Before mining (the scheduler's first call): all-data epochs; exact from step 1.
            return -(-len(dm.train_dataset) // dm.batch_size) * self.trainer.max_epochs
        return dm.train_batches(self.trainer.max_epochs)

    # -- hard-case mining ------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if dm.composition == "all" or dm.hard_indices_known:
            return
        from hcm.mining import mine_hard_cases

        hard = mine_hard_cases(self, dm, **self.mining)
        dm.set_hard_cases(hard)

    # -- the GRPO step ---------------------------------------------------------------------------
    def _logprobs(self, model, rollout: Rollout, rows: list[int]) -> torch.Tensor:
        return completion_logprobs(
            model,
            rollout.input_ids[rows],
            rollout.attention_mask[rows],
            rollout.pixels_of(rows).to(model.dtype),
            rollout.completion_mask[rows],
            temperature=self.sampling["temperature"],
            chunk_size=self.logprob_chunk_size,
        )

    def _minibatches(self, n: int) -> list[list[int]]:
        size = self.mini_batch_size or n
        return [list(range(i, min(i + size, n))) for i in range(0, n, size)]

    def _sample(self, inputs: dict) -> Any:
        from hcm.model.generation import generate

        s = self.sampling
        return generate(
            self.model,
            inputs,
            self.tokenizer,
            max_new_tokens=s["max_new_tokens"],
            do_sample=True,
            temperature=s["temperature"],
            top_k=s["top_k"],
            top_p=s["top_p"],
            num_return_sequences=self.G,
        )

    @torch.no_grad()
    def rollout(self, batch: dict) -> Rollout:
        from hcm.model.inputs import repeat_batch

        inputs, G, pad = batch["inputs"], self.G, self.tokenizer.pad_token_id
        answers = [a for a in batch["answers"] for _ in range(G)]
        gen = self._sample(inputs)
        ids, mask, texts = gen.completion_ids, gen.completion_mask, list(gen.texts)
        rewards, per_reward = score(texts, answers, self.reward_weights)
        for _ in range(self.resample_zero_variance):
            # DAPO's dynamic sampling: redraw the groups whose rewards are all equal (no signal).
            flat = zero_variance_groups(rewards, G).nonzero().squeeze(1).tolist()  # prompt indices
            if not flat:
                break
            redo = self._sample(self._select_prompts(inputs, flat))
            rows = [p * G + g for p in flat for g in range(G)]
            redo_rewards, redo_parts = score(
                redo.texts, [answers[r] for r in rows], self.reward_weights
            )
            ids = pad_right([ids, redo.completion_ids], pad)  # widen to the longer of the two
            mask = pad_right([mask, redo.completion_mask], 0)
            n = len(texts)
            ids[rows], mask[rows] = ids[n:], mask[n:]
            ids, mask = ids[:n], mask[:n]
            for j, r in enumerate(rows):
                texts[r] = redo.texts[j]
            rewards[rows] = redo_rewards
            for name in per_reward:
                per_reward[name][rows] = redo_parts[name]
        prompts = repeat_batch(inputs, G, *self._image_spec())  # each prompt G times
        rollout = Rollout(
            input_ids=torch.cat([prompts["input_ids"], ids], 1),  # (B*G, P+L)
            attention_mask=torch.cat(
                [prompts["attention_mask"], mask.to(prompts["attention_mask"])], 1
            ),
            completion_mask=mask,
            pixel_values=prompts["pixel_values"],
            tiles=self._tiles(prompts["input_ids"]),
            texts=texts,
            answers=answers,
            rewards=rewards.to(self.device),
            per_reward=per_reward,
            advantages=group_advantages(rewards, G, scale=self.advantage_scale).to(self.device),
        )
        all_rows = self._minibatches(rollout.size)
        if self.num_iterations > 1:  # mu > 1: the ratio is against the rollout policy
            rollout.old_logprobs = torch.cat(
                [self._logprobs(self.model, rollout, r) for r in all_rows]
            )
        if self.ref_model is not None:
            rollout.ref_logprobs = torch.cat(
                [self._logprobs(self.ref_model, rollout, r) for r in all_rows]
            )
        return rollout

    def _image_spec(self) -> tuple[int, int]:
        cfg = self.model.config
        return cfg.image_token_id, cfg.image_seq_length

    def _tiles(self, input_ids: torch.Tensor) -> list[int]:
        token_id, seq_len = self._image_spec()
        return ((input_ids == token_id).sum(1) // seq_len).tolist()

    def _select_prompts(self, inputs: dict, prompts: list[int]) -> dict:
        """The sub-batch of the given prompts, with their image tiles."""
        per_prompt = inputs["pixel_values"].split(self._tiles(inputs["input_ids"]))
        return {
            "input_ids": inputs["input_ids"][prompts],
            "attention_mask": inputs["attention_mask"][prompts],
            "pixel_values": torch.cat([per_prompt[p] for p in prompts]),
        }

    def training_step(self, batch: dict, batch_idx: int) -> None:
        t0 = time.perf_counter()
        rollout = self.rollout(batch)
        t_rollout = time.perf_counter() - t0
        opt = self.optimizers()
        sched = self.lr_schedulers()
        n_tokens = rollout.completion_mask.sum()
        for _ in range(self.num_iterations):
            stats_sum: dict[str, float] = {}
            for rows in self._minibatches(rollout.size):
                logprobs = self._logprobs(self.model, rollout, rows)
                mask = rollout.completion_mask[rows]
                old = (
                    rollout.old_logprobs[rows]
                    if rollout.old_logprobs is not None
                    else logprobs.detach()
                )
                ref = rollout.ref_logprobs[rows] if rollout.ref_logprobs is not None else None
                loss, stats = policy_loss(
                    logprobs,
                    old,
                    ref,
                    rollout.advantages[rows],
                    mask,
                    clip_eps=self.clip_eps,
                    clip_eps_high=self.clip_eps_high,
                    beta=self.beta,
                    level=self.loss_level,
                    agg=self.loss_agg,
                )
                # Weight each mini-batch by its share of what the full-batch loss averages over.
                share = (
                    (mask.sum() / n_tokens.clamp(min=1))
                    if self.loss_agg == "token_mean"
                    else torch.tensor(len(rows) / rollout.size)
                )
                self.manual_backward(loss * share)
                for k, v in {"loss": loss, **stats}.items():
                    stats_sum[k] = stats_sum.get(k, 0.0) + float(v) * float(share)
            if self.max_grad_norm:
                self.clip_gradients(
                    opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm"
                )
            opt.step()
            opt.zero_grad(set_to_none=True)
        sched.step()
        self._log_step(rollout, stats_sum, t_rollout, time.perf_counter() - t0 - t_rollout)

    # -- logging ----------------------------------------------------------------------------------
    def _log_step(
        self, rollout: Rollout, stats: dict[str, float], t_rollout: float, t_update: float
    ) -> None:
        lengths = rollout.completion_mask.sum(1).float()
        max_new = self.sampling["max_new_tokens"]
        values = {
            "train/loss": stats["loss"],
            "train/reward/total": rollout.rewards.mean(),
            "train/reward/total_std": rollout.rewards.std(),
            "train/advantage_std": rollout.advantages.std(),
            "train/zero_variance_groups": zero_variance_groups(rollout.rewards, self.G)
            .float()
            .mean(),
            "train/completion_length/mean": lengths.mean(),
            "train/completion_length/max": lengths.max(),
            "train/completion_length/clipped_frac": (lengths >= max_new).float().mean(),
            "train/lr": self.lr_schedulers().get_last_lr()[0],
            "train/time/rollout": t_rollout,
            "train/time/update": t_update,
        }
        for name, r in rollout.per_reward.items():
            values[f"train/reward/{name}"] = r.mean()
            values[f"train/reward/{name}_std"] = r.std()
        for k in ("kl", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean"):
            if k in stats:
                values[f"train/{k}"] = stats[k]
        self.log_dict(
            {k: float(v) for k, v in values.items()}, prog_bar=False, batch_size=rollout.size
        )
        self.log(
            "train/reward", float(rollout.rewards.mean()), prog_bar=True, batch_size=rollout.size
        )
        if (
            self.log_completions_every_n_steps
            and self.global_step % self.log_completions_every_n_steps == 0
        ):
            self._log_completions(rollout)

    def _log_completions(self, rollout: Rollout, n: int = 8) -> None:
        rewards = rollout.rewards.tolist()
        rows = [list(r) for r in zip(rollout.texts, rollout.answers, rewards, strict=True)][:n]
        for lg in self.loggers:
            if hasattr(lg, "log_table"):
                lg.log_table(
                    key="train/completions", columns=["completion", "answer", "reward"], data=rows
                )
