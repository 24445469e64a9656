"""Stage 2: GRPO (eqs. 2-5) with the DPA reward (eq. 7), and hard-case mining (HCM-GRPO).

One training step, as in the paper:
    rollout    = G completions per prompt from the current policy (top_k, top_p, temperature)
    rewards    = weighted reward functions (format + accuracy for GRPO, format + dpa for DPA-GRPO)
    advantages = group_advantages(rewards, G)                                  (eq. 2)
    loss       = policy_loss(logprobs, old, ref, advantages)                   (eqs. 3-5)
repeated `num_iterations` (mu) times over the same rollout, each pass one optimizer step whose
gradient accumulates over mini-batches of completions (weighted to equal the full-batch one).

Batch layout: a dataloader batch holds B prompts; the rollout holds their B*G completions,
prompt-major, as every (B*G, ...) tensor here:

    rows   [p0c0, p0c1, ..., p0c{G-1}, p1c0, ..., p{B-1}c{G-1}]
    tiles  pixel_values holds each row's image tiles in row order (prompt p's tiles G times)

The ratio and the KL are taken over the model's full softmax at the sampling temperature, not
the top-k/top-p-truncated distribution the completions were drawn from (as TRL does): the
truncated distribution assigns probability 0 to tokens outside the top-k, so a ratio over it is
undefined wherever the policy moves mass across the cut-off.

Departures from the paper, each a config knob: `old_logprobs` are the rollout policy's, and with
mu = 1 they equal the current ones detached (ratio 1, as TRL), saving a forward pass; groups with
zero reward variance can be redrawn (DAPO's dynamic sampling), off by default; completions cut by
the completion budget can be left out of the loss (TRL's mask_truncated_completions), off by
default (they keep their reward, 0 without an answer, and their advantage). The LR schedule
steps once per rollout (per dataloader batch), whatever mu; `global_step` counts optimizer
steps, mu per rollout.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from hcm.faults import fault_point
from hcm.grpo import (
    AGGREGATIONS,
    group_advantages,
    policy_loss,
    truncation_mask,
    zero_variance_groups,
)
from hcm.logprobs import completion_logprobs
from hcm.modules.base import ScreeningModule, scheduled_steps
from hcm.rewards import score

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """G completions for each of B prompts, laid out [p0c0 .. p0c{G-1}, p1c0, ...]."""

    input_ids: torch.Tensor  # (B*G, P+L) prompt (left-padded) + completion (right-padded)
    attention_mask: torch.Tensor  # (B*G, P+L)
    completion_mask: torch.Tensor  # (B*G, L)
    truncated: torch.Tensor  # (B*G,) bool: cut by max_new_tokens (no eos, no </answer>)
    loss_mask: torch.Tensor  # (B*G, L) completion_mask, less truncated rows when masked
    pixel_values: torch.Tensor  # (tiles of all rows, 3, H, W), each prompt's tiles G times
    tiles: list[int]  # (B*G,) tiles per row, to slice pixel_values by row
    texts: list[str]  # (B*G,)
    answers: list[str]  # (B*G,) each prompt's label G times
    rewards: torch.Tensor  # (B*G,) weighted sum of the reward functions
    per_reward: dict[str, torch.Tensor]  # name -> (B*G,) unweighted
    advantages: torch.Tensor  # (B*G,)
    zero_variance_sampled: float  # fraction of groups with equal rewards before any redraw
    old_logprobs: torch.Tensor | None = None  # (B*G, L), None when mu == 1
    ref_logprobs: torch.Tensor | None = None  # (B*G, L), None when beta == 0

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def pixels_of(self, rows: list[int]) -> torch.Tensor:
        """The tiles of rows `rows` (pixel_values is flattened in row order)."""
        per_row = self.pixel_values.split(self.tiles)
        return torch.cat([per_row[r] for r in rows])


def pad_right(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    """Stack (n_i, L_i) tensors into (sum n_i, max L_i), padding on the right."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat(
        [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors]
    )


def minibatches(n: int, size: int | None) -> list[list[int]]:
    """Consecutive row ranges of at most `size` rows (all n rows at once when size is None)."""
    size = size or n
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def loss_share(mask: torch.Tensor, n_rows: int, n_tokens: int, agg: str) -> float:
    """Weight of a mini-batch's loss so that the weighted sum over mini-batches is the full loss.

    `policy_loss` averages within the mini-batch: over its rows ("sequence_mean") or over its
    real tokens ("token_mean"). The full batch averages over all n_rows rows / n_tokens tokens,
    so each mini-batch weighs by its share of those. A Python float: exact in any dtype.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    if agg == "token_mean":
        return int(mask.sum()) / max(n_tokens, 1)
    return mask.shape[0] / n_rows


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
        kl_clamp: float | None = None,
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
        mask_truncated_completions: bool = False,
        mining: dict | None = None,
        log_completions_every_n_steps: int = 50,
        log_completions_prompts: int = 2,
        fast: dict | None = None,
        stop_at_switch: bool = False,
    ):
        super().__init__(model, freeze, optimizer, scheduler, eval_generation)
        if loss_agg not in AGGREGATIONS:
            raise ValueError(f"module.loss_agg must be one of {AGGREGATIONS}, got {loss_agg!r}")
        self.automatic_optimization = False  # mu updates and mini-batches per rollout
        self.G, self.beta, self.kl_clamp = group_size, beta, kl_clamp
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
        self.mask_truncated_completions = mask_truncated_completions
        self.mining = dict(mining or {})
        # Speed-ups that keep the plain path's numbers (tests/test_fast_paths.py); off by default.
        self.fast = {
            "share_images": False,
            "cache": "dynamic",
            "max_cache_len": None,
            "compile": False,
            **(fast or {}),
        }
        self.log_completions_every_n_steps = log_completions_every_n_steps
        self.log_completions_prompts = log_completions_prompts
        self.stop_at_switch = stop_at_switch
        self.ref_model: Any = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        if self.beta > 0:  # the frozen reference: the initial checkpoint (eq. 4), in model.dtype
            self.ref_model = self.load_policy(self._reference_dtype()).eval().requires_grad_(False)

    def _reference_dtype(self) -> str | None:
        """model.dtype, except under FSDP: there the reference is a submodule of the module FSDP
        wraps, and the root unit flattens the policy's and the reference's leftover weights
        (embeddings, norms, lm_head) into one tensor, which must have one dtype: the policy's."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        return "fp32" if type(strategy).__name__ == "FSDPStrategy" else None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # The reference is the initial checkpoint, reloaded by configure_model: don't store it.
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("ref_model.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        # Put back the reference configure_model just loaded, so that loading stays strict and a
        # missing policy weight is still an error.
        if self.ref_model is not None:
            state = checkpoint["state_dict"]
            for key, value in self.ref_model.state_dict().items():
                state.setdefault(f"ref_model.{key}", value)

    def total_steps(self) -> int:
        """Rollouts of the whole fit (the schedule steps once per rollout). Epochs after
        switch_epoch are longer (all_plus_hard), which Lightning's estimate misses."""
        trainer, dm = self.trainer, self.trainer.datamodule
        if trainer.max_epochs in (None, -1):  # iteration-based: max_steps alone decides
            return -(-trainer.max_steps // self.num_iterations)
        epochs = trainer.max_epochs
        if not dm.hard_indices_known and dm.composition != "all":
            # Before mining (the scheduler's first call): all-data epochs; exact from step 1.
            per_epoch = [-(-len(dm.train_dataset) // dm.batch_size)] * epochs
        else:
            per_epoch = [dm.train_batches(e + 1) - dm.train_batches(e) for e in range(epochs)]
        return scheduled_steps(
            per_epoch, trainer.limit_train_batches, trainer.max_steps, self.num_iterations
        )

    # -- hard-case mining ------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        dm = self.trainer.datamodule
        # A shared first stage (stop_at_switch) mines for the stages that continue from its
        # checkpoint: they restore the hard set with it, mined by the initial policy.
        needed = dm.composition != "all" or self.stop_at_switch
        if not needed or dm.hard_indices_known:
            return
        from hcm.mining import mine_hard_cases

        # Mining may sample (k > 1); training draws the same RNG stream whether it mined or found
        # the cache, so the five arms of Table 7 sample alike and a rerun repeats the first run.
        # Under trainer.precision's autocast, as validation: the fp32 policy decodes in bf16.
        forked = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        with forked, self.trainer.precision_plugin.forward_context():
            hard = mine_hard_cases(self, dm, **self.mining)
        dm.set_hard_cases(hard)

    def on_train_epoch_end(self) -> None:
        # Table 7's shared first stage ends at the switch; its last.ckpt (written at this epoch's
        # end, before this hook) is where each composition arm continues.
        if self.stop_at_switch and self.current_epoch + 1 >= self.trainer.datamodule.switch_epoch:
            self.trainer.should_stop = True

    # -- the GRPO step ---------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        t0 = time.perf_counter()
        rollout = self.rollout(batch)  # G completions per prompt, rewards, advantages (eq. 2)
        t_rollout = time.perf_counter() - t0
        fault_point("grpo_step")
        opt = self.optimizers()
        lr = opt.param_groups[0]["lr"]  # the LR of this step's updates
        rollout_step = self.global_step // self.num_iterations
        for _ in range(self.num_iterations):  # mu optimizer steps on the same completions
            stats = self.accumulate_gradients(rollout)  # the loss of eqs. 3-5
            opt.step()  # clips first (on_before_optimizer_step)
            opt.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        t_update = time.perf_counter() - t0 - t_rollout
        self._log_step(rollout, stats, lr, t_rollout, t_update)  # stats of the last pass
        every = self.log_completions_every_n_steps
        if every and rollout_step % every == 0:
            self._log_completions(rollout)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Here rather than before opt.step(): after hcm.nonfinite's guard has seen the raw norm.
        if self.max_grad_norm:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm"
            )

    @torch.no_grad()
    def rollout(self, batch: dict) -> Rollout:
        """Sample, score and prepare the completions of one batch of prompts (no gradient)."""
        from hcm.model.inputs import repeat_batch

        inputs, G = batch["inputs"], self.G  # on self.device: Lightning moved the batch
        answers = [a for a in batch["answers"] for _ in range(G)]  # (B*G,)
        ids, mask, texts, truncated = self._sample(inputs)  # (B*G, L), (B*G, L), (B*G,), (B*G,)
        rewards, per_reward = score(texts, answers, self.reward_weights)  # (B*G,) on the CPU
        zero_variance_sampled = zero_variance_groups(rewards, G).float().mean().item()
        for _ in range(self.resample_zero_variance):
            flat = zero_variance_groups(rewards, G).nonzero().squeeze(1).tolist()  # prompts
            if not flat:
                break
            ids, mask = self._redraw(
                inputs, flat, ids, mask, texts, truncated, answers, rewards, per_reward
            )
        prompts = repeat_batch(inputs, G, *self._image_spec())  # each prompt G times
        rollout = Rollout(
            input_ids=torch.cat([prompts["input_ids"], ids], 1),  # (B*G, P+L)
            attention_mask=torch.cat([prompts["attention_mask"], mask], 1),  # (B*G, P+L)
            completion_mask=mask,
            truncated=truncated,
            loss_mask=truncation_mask(mask, truncated) if self.mask_truncated_completions else mask,
            pixel_values=prompts["pixel_values"],
            tiles=self._tiles(prompts["input_ids"]),
            texts=texts,
            answers=answers,
            rewards=rewards.to(self.device),
            per_reward={k: v.to(self.device) for k, v in per_reward.items()},
            advantages=group_advantages(rewards, G, scale=self.advantage_scale).to(self.device),
            zero_variance_sampled=zero_variance_sampled,
        )
        chunks = minibatches(rollout.size, self.mini_batch_size)
        if self.num_iterations > 1:  # mu > 1: the ratio is against the rollout policy
            rollout.old_logprobs = torch.cat(
                [self._logprobs(self.model, rollout, r) for r in chunks]
            )
        if self.ref_model is not None:
            rollout.ref_logprobs = torch.cat(
                [self._logprobs(self.ref_model, rollout, r) for r in chunks]
            )
        return rollout

    def accumulate_gradients(self, rollout: Rollout) -> dict[str, float]:
        """Backward of the full-batch loss, a mini-batch at a time; its value and statistics.

        Each mini-batch's loss is weighted by its share of the full batch (`loss_share`), so the
        accumulated gradient is the full batch's whatever `mini_batch_size`.
        """
        n_tokens = int(rollout.loss_mask.sum())
        totals: dict[str, torch.Tensor] = {}
        chunks = minibatches(rollout.size, self.mini_batch_size)
        for i, rows in enumerate(chunks):
            with contextlib.nullcontext() if i == len(chunks) - 1 else self._no_grad_sync():
                stats = self._backward(rollout, rows, n_tokens)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
        return {k: float(v) for k, v in totals.items()}

    def _no_grad_sync(self):
        """DDP: the mini-batches before the last accumulate locally, and the last backward
        all-reduces the sum (one all-reduce per optimizer step, not one per mini-batch)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if hasattr(strategy, "block_backward_sync"):  # DDP; a no-op under FSDP
            return strategy.block_backward_sync()
        return contextlib.nullcontext()

    def _backward(self, rollout: Rollout, rows: list[int], n_tokens: int) -> dict:
        """Backward of one mini-batch's weighted loss; its weighted statistics (tensors)."""
        mask = rollout.loss_mask[rows]  # (n, L)
        logprobs = self._logprobs(self.model, rollout, rows)  # (n, L), with grad
        old = logprobs.detach() if rollout.old_logprobs is None else rollout.old_logprobs[rows]
        ref = None if rollout.ref_logprobs is None else rollout.ref_logprobs[rows]
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
            kl_clamp=self.kl_clamp,
        )
        share = loss_share(mask, rollout.size, n_tokens, self.loss_agg)
        self.manual_backward(loss * share)
        # The stats are masked means over tokens: weigh them by token share.
        token_share = int(mask.sum()) / max(n_tokens, 1)
        weighted = {"loss": loss.detach() * share}
        weighted |= {k: v.detach() * token_share for k, v in stats.items()}
        return weighted

    def _sample(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
        """G completions per prompt (generate masks InternVL's image and chat tokens)."""
        from hcm.model.generation import generate

        s = self.sampling
        gen = generate(
            self.model,
            inputs,
            self.tokenizer,
            max_new_tokens=s["max_new_tokens"],
            do_sample=True,
            temperature=s["temperature"],
            top_k=s["top_k"],
            top_p=s["top_p"],
            num_return_sequences=self.G,
            cache=self.fast["cache"],
            max_cache_len=self.fast["max_cache_len"],
            compile=self.fast["compile"],
            share_images=self.fast["share_images"],
        )
        return gen.completion_ids, gen.completion_mask, list(gen.texts), gen.truncated

    def _redraw(
        self,
        inputs: dict,
        prompts: list[int],
        ids: torch.Tensor,
        mask: torch.Tensor,
        texts: list[str],
        truncated: torch.Tensor,
        answers: list[str],
        rewards: torch.Tensor,
        per_reward: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DAPO's dynamic sampling: draw the groups of `prompts` again, in place.

        Replaces their rows in `texts`, `truncated`, `rewards` and `per_reward`; returns the new
        ids and mask
        (widened when a redrawn completion is longer than every earlier one).
        """
        G, n = self.G, ids.shape[0]
        new_ids, new_mask, new_texts, new_truncated = self._sample(
            self._select_prompts(inputs, prompts)
        )
        rows = [p * G + g for p in prompts for g in range(G)]  # their rows in the rollout
        new_rewards, new_parts = score(new_texts, [answers[r] for r in rows], self.reward_weights)
        both_ids = pad_right([ids, new_ids], self.tokenizer.pad_token_id)  # (n + len(rows), L')
        both_mask = pad_right([mask, new_mask], 0)
        ids, mask = both_ids[:n].clone(), both_mask[:n].clone()  # (n, L')
        ids[rows], mask[rows] = both_ids[n:], both_mask[n:]
        for j, r in enumerate(rows):
            texts[r] = new_texts[j]
        truncated[rows] = new_truncated
        rewards[rows] = new_rewards
        for name in per_reward:
            per_reward[name][rows] = new_parts[name]
        return ids, mask

    def _logprobs(self, model, rollout: Rollout, rows: list[int]) -> torch.Tensor:
        kwargs = {
            "temperature": self.sampling["temperature"],
            "chunk_size": self.logprob_chunk_size,
        }
        ids, attn = rollout.input_ids[rows], rollout.attention_mask[rows]
        mask = rollout.completion_mask[rows]
        if self.fast["share_images"]:  # rows are prompt-major, G per prompt: encode images once
            from hcm.model.vision_cache import rows_by_prompt, shared_image_logprobs

            firsts, prompt_index = rows_by_prompt(rows, self.G)
            pixels = rollout.pixels_of(firsts).to(model.dtype)  # each distinct prompt's tiles once
            tiles = [rollout.tiles[r] for r in firsts]
            return shared_image_logprobs(
                model, ids, attn, pixels, tiles, prompt_index, mask, **kwargs
            )
        pixels = rollout.pixels_of(rows).to(model.dtype)
        return completion_logprobs(model, ids, attn, pixels, mask, **kwargs)  # (len(rows), L)

    def _image_spec(self) -> tuple[int, int]:
        cfg = self.model.config
        return cfg.image_token_id, cfg.image_seq_length

    def _tiles(self, input_ids: torch.Tensor) -> list[int]:
        from hcm.model.inputs import tiles_per_row

        return tiles_per_row(input_ids, *self._image_spec())

    def _select_prompts(self, inputs: dict, prompts: list[int]) -> dict:
        """The sub-batch of the given prompts, with their image tiles."""
        per_prompt = inputs["pixel_values"].split(self._tiles(inputs["input_ids"]))
        return {
            "input_ids": inputs["input_ids"][prompts],
            "attention_mask": inputs["attention_mask"][prompts],
            "pixel_values": torch.cat([per_prompt[p] for p in prompts]),
        }

    # -- logging ----------------------------------------------------------------------------------
    def _log_step(
        self,
        rollout: Rollout,
        stats: dict[str, float],
        lr: float,
        t_rollout: float,
        t_update: float,
    ) -> None:
        lengths = rollout.completion_mask.sum(1).float()  # (B*G,)
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
            "train/completion_length/truncated_frac": rollout.truncated.float().mean(),
            "train/lr": lr,
            "train/time/rollout": t_rollout,
            "train/time/update": t_update,
        }
        if self.resample_zero_variance:
            values["train/zero_variance_groups_sampled"] = rollout.zero_variance_sampled
        for name, r in rollout.per_reward.items():
            values[f"train/reward/{name}"] = r.mean()
            values[f"train/reward/{name}_std"] = r.std()
        for k in ("kl", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean"):
            if k in stats:
                values[f"train/{k}"] = stats[k]
        self.log_dict({k: float(v) for k, v in values.items()}, batch_size=rollout.size)
        self.log(
            "train/reward", float(rollout.rewards.mean()), prog_bar=True, batch_size=rollout.size
        )

    def _log_completions(self, rollout: Rollout) -> None:
        """A W&B table of the first prompts' G completions with their rewards."""
        n = min(rollout.size, self.log_completions_prompts * self.G)
        names = list(rollout.per_reward)
        columns = ["step", "prompt", "answer", "completion", "reward", *names]
        data = [
            [
                self.global_step,
                r // self.G,
                rollout.answers[r],
                rollout.texts[r],
                float(rollout.rewards[r]),
                *(float(rollout.per_reward[k][r]) for k in names),
            ]
            for r in range(n)
        ]
        for lg in self.loggers:
            if hasattr(lg, "log_table"):
                lg.log_table(key="train/completions", columns=columns, data=data)
