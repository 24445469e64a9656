"""Stage 2: GRPO (eqs. 2-5) with the DPA reward (eq. 7), and hard-case mining (HCM-GRPO).

One training step, as in the paper (`training_step`, one line each):
    rollout    = G completions per prompt from the current policy (top_k, top_p, temperature)
    rewards    = weighted reward functions (format + accuracy for GRPO, format + dpa for DPA-GRPO)
    advantages = group_advantages(rewards, G)                                  (eq. 2)
    old, ref   = the log-probs the loss holds fixed: pi_old (mu > 1) and pi_ref (beta > 0)
    loss       = policy_loss(logprobs, old, ref, advantages)                   (eqs. 3-5)
repeated `num_iterations` (mu) times over the same rollout, each pass one optimizer step whose
gradient accumulates over mini-batches of completions (weighted to equal the full-batch one).
What a step logs is `hcm.modules.grpo_log`'s job; the rollout's layout is `hcm.rollout`'s.

The ratio and the KL are taken over the model's full softmax at the sampling temperature, not
the top-k/top-p-truncated distribution the completions were drawn from (as TRL does): the
truncated distribution assigns probability 0 to tokens outside the top-k, so a ratio over it is
undefined wherever the policy moves mass across the cut-off.

Departures from the paper, each a config knob: `old_logprobs` are the rollout policy's, and with
mu = 1 they equal the current ones detached (ratio 1, as TRL), saving a forward pass; groups with
zero reward variance can be redrawn (DAPO's dynamic sampling; under DDP/FSDP while any rank has
one), off by default; a step can draw `oversample` x B prompts and train on up to B of them whose
current pass rate lies in a band (`difficulty_band`, online difficulty selection), off by
default; completions cut by the completion budget can be left out of the loss
(TRL's mask_truncated_completions), off by default (they keep their reward, 0 without an
answer, and their advantage). The LR schedule steps once per rollout (per dataloader batch),
whatever mu; `global_step` counts optimizer steps, mu per rollout. Every step counts the
completions it sampled (`Rollout.generated`), so that arms can be compared at equal rollouts.

With LoRA (`module.lora`) pi_ref is the policy with its adapters off (`reference`), not a
second model: the same function as the paper's reference, the stage's initial model.

Hard-case mining is the datamodule's (`ScreeningDataModule.mine_hard_cases`): this module only
lends it the initial policy, before the first GRPO step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch

from hcm.faults import fault_point
from hcm.grpo_math import (
    band_selection,
    group_advantages,
    pass_rates,
    policy_loss,
    redraw_plan,
    zero_variance_groups,
)
from hcm.logprobs import completion_logprobs
from hcm.mining import Mining, is_right
from hcm.model import generation, lora
from hcm.model.inputs import tiles_per_row
from hcm.model.vision_cache import rows_by_prompt, shared_image_logprobs
from hcm.modules.base import ScreeningModule, scheduled_steps
from hcm.modules.grpo_log import GRPOStepLog
from hcm.rewards import score
from hcm.rollout import Rollout, loss_share, minibatches


class GRPOModule(ScreeningModule):
    """Every argument is a key of conf/module/grpo.yaml, where its default and meaning live."""

    def __init__(
        self,
        *,
        model: dict,
        freeze: dict,
        optimizer: dict,
        scheduler: dict,
        eval_generation: dict,
        group_size: int,
        beta: float,
        kl_clamp: float | None,
        clip_eps: float,
        clip_eps_high: float | None,
        num_iterations: int,
        loss_level: str,
        loss_agg: str,
        advantage_scale: str,
        rewards: dict,
        sampling: dict,
        mini_batch_size: int | None,
        logprob_chunk_size: int,
        max_grad_norm: float | None,
        resample_zero_variance: int,
        difficulty_band: dict | None,
        mask_truncated_completions: bool,
        mining: dict,
        log_completions_every_n_steps: int,
        log_completions_prompts: int,
        fast: dict,
        stop_at_switch: bool,
        lora: dict | None = None,
    ):
        super().__init__(
            model=model,
            eval_generation=eval_generation,
            freeze=freeze,
            optimizer=optimizer,
            scheduler=scheduler,
            lora=lora,
        )
        self.automatic_optimization = False  # mu updates and mini-batches per rollout
        self.G, self.beta, self.num_iterations = group_size, beta, num_iterations
        self.loss_agg, self.advantage_scale = loss_agg, advantage_scale
        # eqs. 3-5's settings, as `policy_loss` takes them
        self.loss_args = {"clip_eps": clip_eps, "clip_eps_high": clip_eps_high, "beta": beta}
        self.loss_args |= {"level": loss_level, "agg": loss_agg, "kl_clamp": kl_clamp}
        self.reward_weights, self.sampling = dict(rewards), dict(sampling)
        self.mini_batch_size = mini_batch_size
        self.logprob_chunk_size, self.max_grad_norm = logprob_chunk_size, max_grad_norm
        self.resample_zero_variance = resample_zero_variance
        self.difficulty_band = dict(difficulty_band) if difficulty_band else None
        self.mask_truncated_completions = mask_truncated_completions
        self.mining = dict(mining)
        self.step_log = GRPOStepLog(
            log_completions_every_n_steps,
            log_completions_prompts,
            log_resampled=resample_zero_variance > 0,
            log_band=difficulty_band is not None,
        )
        self.fast = dict(fast)  # speed-ups that keep the plain path's numbers; off by default
        self.stop_at_switch = stop_at_switch
        self.ref_model: Any = None
        self._rollouts_before_epoch: int | None = None  # total_steps; set when training starts

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        # The frozen reference: the initial checkpoint (eq. 4), in model.dtype. Under LoRA no
        # second model: the reference is the policy with its adapters off (`reference`).
        if self.beta > 0 and not self.lora_cfg:
            self.ref_model = self.load_policy(self.frozen_dtype()).eval().requires_grad_(False)

    def reference(self) -> contextlib.AbstractContextManager:
        """pi_ref (eq. 4) inside the block: the frozen initial model, or under LoRA the policy with
        its adapters off, the same function (the adapters start at zero, B = 0)."""
        if self.ref_model is not None:
            return contextlib.nullcontext(self.ref_model)
        return lora.adapters_off(self.model)

    def configure_callbacks(self) -> list:
        return [self.step_log]  # notes each step's start; training_step's last line logs it

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
        switch_epoch are longer (all_plus_hard), which Lightning's estimate misses. The epochs
        before the current one count as they ran: a stage continuing another's checkpoint may
        draw more prompts a step (data.oversample) than the epochs it continues did."""
        trainer = self.trainer
        if trainer.max_epochs in (None, -1):  # iteration-based: max_steps alone decides
            return -(-trainer.max_steps // self.num_iterations)
        per_epoch = trainer.datamodule.batches_per_epoch(trainer.max_epochs)
        ran, epoch = self._rollouts_before_epoch, trainer.current_epoch
        if ran is None:
            ran, epoch = 0, 0
        return scheduled_steps(
            per_epoch[epoch:],
            trainer.limit_train_batches,
            trainer.max_steps,
            self.num_iterations,
            ran=ran,
        )

    def _count_rollouts_before_epoch(self) -> None:
        """The rollouts of the epochs before the current one: the schedule's steps so far, less
        the batches this epoch has already run (a resume in its middle). Lightning resets its
        batch count only once the epoch runs; until then, after a finished epoch (its last
        batch drawn), the count is that epoch's."""
        progress = self.trainer.fit_loop.epoch_loop.batch_progress
        in_epoch = 0 if progress.is_last_batch else progress.current.ready
        self._rollouts_before_epoch = self.lr_schedulers().last_epoch - in_epoch

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._count_rollouts_before_epoch()

    # -- hard-case mining ------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        dm = self.trainer.datamodule
        # A shared first stage (stop_at_switch) mines for the stages that continue from its
        # checkpoint: they restore the hard set with it, mined by the initial policy.
        if dm.hard_indices is not None or (dm.composition == "all" and not self.stop_at_switch):
            return
        # Mining may sample (k > 1); training draws the same RNG stream whether it mined or found
        # the cache, so the five arms of Table 7 sample alike and a rerun repeats the first run.
        # Under trainer.precision's autocast, as validation: the fp32 policy decodes in bf16.
        rule = Mining(**self.mining)
        budget = self.eval_generation["max_new_tokens"]
        forked = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        with forked, self.trainer.precision_plugin.forward_context():
            answer = self.mining_answer(rule)
            dm.mine_hard_cases(answer, rule, str(self.model_path), budget, self.adapter_args)

    def mining_answer(self, rule: Mining) -> Callable[[dict], Any]:
        """`answer(batch)` for mining: this policy, decoding as the rule asks (greedy, or k
        samples), within the evaluation budget."""

        def answer(batch: dict) -> Any:
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            return self.answer(batch, **rule.sampling())

        return answer

    def on_train_start(self) -> None:
        self._count_rollouts_before_epoch()  # before the LR is set from this stage's schedule
        super().on_train_start()
        # A shared first stage that died after its switch-epoch checkpoint (while exporting, say)
        # resumes at the switch: its epochs are done, and it must not train one more.
        if self.stop_at_switch and self.current_epoch >= self.trainer.datamodule.switch_epoch:
            self.trainer.should_stop = True

    def on_train_epoch_end(self) -> None:
        # Table 7's shared first stage ends at the switch; its last.ckpt (written at this epoch's
        # end, before this hook) is where each composition arm continues.
        if self.stop_at_switch and self.current_epoch + 1 >= self.trainer.datamodule.switch_epoch:
            self.trainer.should_stop = True
            fault_point("switch")

    # -- the GRPO step ---------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        """One GRPO step on a batch of B prompts; the module docstring maps it to the paper."""
        rollout = self.generate(batch)  # G completions per prompt: (B*G, ...)
        self.reward(rollout)  # rollout.rewards (B*G,): eqs. 6-7
        rollout.advantages = group_advantages(rollout.rewards, self.G, self.advantage_scale)
        rollout.old_logprobs, rollout.ref_logprobs = self.fixed_logprobs(rollout)  # pi_old, pi_ref
        stats = self.update(rollout)  # eqs. 3-5: mu optimizer steps, then the LR schedule's
        self.step_log.log_step(self, rollout, stats)  # hcm.modules.grpo_log

    @torch.no_grad()
    def generate(self, batch: dict) -> Rollout:
        """G completions of each prompt of the batch, laid out as `hcm.rollout` draws."""
        inputs, G = batch["inputs"], self.G  # on self.device: Lightning moved the batch
        gen = self._sample(inputs)  # the one place each prompt is repeated G times
        cfg = self.model.config
        keys = [k for k in self.val_score.batch_keys if k in batch]  # what the metric judges by
        return Rollout(
            G=G,
            input_ids=torch.cat([gen.prompt_ids, gen.completion_ids], 1),  # (B*G, P+L)
            attention_mask=torch.cat([gen.prompt_mask, gen.completion_mask], 1),  # (B*G, P+L)
            completion_mask=gen.completion_mask,  # (B*G, L)
            truncated=gen.truncated,  # (B*G,)
            pixel_values=inputs["pixel_values"],  # each prompt's tiles once
            tiles=tiles_per_row(inputs["input_ids"], cfg.image_token_id, cfg.image_seq_length),
            texts=list(gen.texts),
            answers=[a for a in batch["answers"] for _ in range(G)],  # (B*G,)
            labels={k: [v for v in batch[k] for _ in range(G)] for k in keys},  # (B*G,) each
            mask_truncated=self.mask_truncated_completions,
            generated=len(gen.texts),
        )

    @torch.no_grad()
    def reward(self, rollout: Rollout) -> None:
        """Score the completions (eqs. 6-7; on the CPU). With `difficulty_band`, keep only the
        groups in the band (`keep_in_band`). With `resample_zero_variance`, DAPO's dynamic
        sampling first redraws, up to that many times, the groups whose G rewards are equal
        (they carry no signal), in place; under DDP/FSDP every rank draws as many times
        (`redraw_plan`)."""
        G = self.G
        rollout.rewards, rollout.per_reward = score(
            rollout.texts, rollout.answers, self.reward_weights
        )  # (B*G,)
        if self.difficulty_band is not None:
            self.keep_in_band(rollout)
        flat = zero_variance_groups(rollout.rewards, G)  # (B,)
        rollout.zero_variance_sampled = flat.float().mean().item()
        for _ in range(self.resample_zero_variance):
            plan = redraw_plan(flat, self._any_rank(bool(flat.any())))
            if plan is None:
                break
            prompts, keep = plan
            gen = self._sample(self._select_prompts(rollout, prompts))
            rollout.generated += len(gen.texts)
            if not keep:  # drawn only to keep this rank's generate calls in step
                continue
            rows = [p * G + g for p in prompts for g in range(G)]  # their rows in the rollout
            texts, pad = list(gen.texts), self.tokenizer.pad_token_id
            rewards, parts = score(texts, [rollout.answers[r] for r in rows], self.reward_weights)
            rollout.replace_rows(
                rows, gen.completion_ids, gen.completion_mask, texts, gen.truncated, pad
            )
            rollout.rewards[rows] = rewards
            for name in rollout.per_reward:
                rollout.per_reward[name][rows] = parts[name]
            flat = zero_variance_groups(rollout.rewards, G)  # (B,) after the redraw

    def keep_in_band(self, rollout: Rollout) -> None:
        """Online difficulty selection, in place: of the oversample x B prompts drawn, keep up
        to B whose pass rate lies in the band (`band_selection`). A completion is right as
        hard-case mining calls it (`is_right` of the datamodule's metric, `mining.correct`).

        A rank whose band keeps nothing keeps its first group with loss weight 0, so that it
        still joins the collective forward and backward; when no rank keeps any, the update
        skips its optimizer steps (`update`). Each rank selects on its own shard, with one
        `generate` call per step on every rank, as without the band."""
        band, G = self.difficulty_band, self.G
        verdicts = self.val_score.judge(rollout.texts, **rollout.labels)  # (B*G,)
        right = torch.tensor([is_right(v, self.mining["correct"]) for v in verdicts])
        drawn = rollout.size // G
        B = -(-drawn // band["oversample"])  # a short last batch keeps as many per draw
        kept = band_selection(pass_rates(right, G), band["low"], band["high"], B)
        rollout.band_kept = len(kept) / drawn
        if not kept:
            kept, rollout.loss_weight = [0], 0.0
        rollout.keep_prompts(kept)

    def _any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (an all-reduce under DDP/FSDP)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return flag
        return self.trainer.strategy.reduce_boolean_decision(flag, all=False)

    @torch.no_grad()
    def fixed_logprobs(self, rollout: Rollout) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(B*G, L) twice: pi_old's log-probs (mu > 1: the ratio is against the rollout policy;
        else None, the current ones detached) and pi_ref's (None when beta == 0)."""
        chunks = minibatches(rollout.size, self.mini_batch_size)

        def of(model) -> torch.Tensor:
            return torch.cat([self._logprobs(model, rollout, rows) for rows in chunks])

        old = of(self.model) if self.num_iterations > 1 else None
        if self.beta == 0:
            return old, None
        with self.reference() as reference:
            return old, of(reference)

    def update(self, rollout: Rollout) -> dict[str, float]:
        """mu optimizer steps on the rollout, then one step of the LR schedule; the loss
        statistics of the last pass and the update's duration ("time/update", seconds).

        When the difficulty band kept no group on any rank, the steps have no gradient: the
        optimizer leaves the weights and its moments (as NonFiniteGuard's skipped steps), the LR
        schedule and the step counter advance."""
        fault_point("grpo_step")  # tests/test_resume.py kills a run here
        start = time.perf_counter()
        opt = self.optimizers()
        trains = self.difficulty_band is None or self._any_rank(rollout.loss_weight > 0)
        stats = {"loss": 0.0}
        for _ in range(self.num_iterations):  # mu optimizer steps on the same completions
            if trains:
                stats = self.accumulate_gradients(rollout)  # the loss of eqs. 3-5
            opt.step()  # clips first (on_before_optimizer_step)
            opt.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        return {**stats, "time/update": time.perf_counter() - start}

    def on_before_optimizer_step(self, optimizer) -> None:
        # Here rather than before opt.step(): after hcm.nonfinite's guard has seen the raw norm.
        if self.max_grad_norm:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm"
            )

    def accumulate_gradients(self, rollout: Rollout) -> dict[str, float]:
        """Backward of the full-batch loss, a mini-batch at a time; its value and statistics.

        Each mini-batch's loss is weighted by its share of the full batch (`loss_share`), so the
        accumulated gradient is the full batch's whatever `mini_batch_size`.
        """
        loss_mask = rollout.loss_mask  # (B*G, L)
        n_tokens = int(loss_mask.sum())
        totals: dict[str, torch.Tensor] = {}
        chunks = minibatches(rollout.size, self.mini_batch_size)
        for i, rows in enumerate(chunks):
            with contextlib.nullcontext() if i == len(chunks) - 1 else self._no_grad_sync():
                stats = self._backward(rollout, rows, loss_mask[rows], n_tokens)
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

    def _backward(self, rollout: Rollout, rows: list[int], mask: torch.Tensor, n_tokens: int):
        """Backward of one mini-batch's weighted loss (mask: its (n, L) loss mask); its weighted
        statistics (tensors)."""
        logprobs = self._logprobs(self.model, rollout, rows)  # (n, L), with grad
        old = logprobs.detach() if rollout.old_logprobs is None else rollout.old_logprobs[rows]
        ref = None if rollout.ref_logprobs is None else rollout.ref_logprobs[rows]
        loss, stats = policy_loss(
            logprobs,
            old,
            ref,
            rollout.advantages[rows].to(self.device),  # (n,)
            mask,
            **self.loss_args,
        )
        share = loss_share(mask, rollout.size, n_tokens, self.loss_agg) * rollout.loss_weight
        self.manual_backward(loss * share)
        # The stats are masked means over tokens: weigh them by token share.
        token_share = int(mask.sum()) / max(n_tokens, 1)
        weighted = {"loss": loss.detach() * share}
        weighted |= {k: v.detach() * token_share for k, v in stats.items()}
        return weighted

    def _sample(self, inputs: dict) -> Any:
        """G completions per prompt, a Generation (generate masks InternVL's image and chat
        tokens)."""
        s = self.sampling
        return generation.generate(
            self.model,
            inputs,
            self.tokenizer,
            max_new_tokens=s["max_new_tokens"],
            do_sample=True,
            temperature=s["temperature"],
            top_k=s["top_k"],
            top_p=s["top_p"],
            group_size=self.G,
            cache=self.fast["cache"],
            max_cache_len=self.fast["max_cache_len"],
            compile=self.fast["compile"],
            share_images=self.fast["share_images"],
        )

    def _select_prompts(self, rollout: Rollout, prompts: list[int]) -> dict:
        """The prompts `prompts` of the rollout as a generation batch, with their image tiles."""
        first_rows = [p * self.G for p in prompts]
        P = rollout.input_ids.shape[1] - rollout.completion_mask.shape[1]
        return {
            "input_ids": rollout.input_ids[first_rows, :P],
            "attention_mask": rollout.attention_mask[first_rows, :P],
            "pixel_values": rollout.pixels_of(first_rows),
        }

    def _logprobs(self, model, rollout: Rollout, rows: list[int]) -> torch.Tensor:
        kwargs = {
            "temperature": self.sampling["temperature"],
            "chunk_size": self.logprob_chunk_size,
        }
        ids, attn = rollout.input_ids[rows], rollout.attention_mask[rows]
        mask = rollout.completion_mask[rows]
        if self.fast["share_images"]:  # rows are prompt-major, G per prompt: encode images once
            firsts, prompt_index = rows_by_prompt(rows, self.G)
            pixels = rollout.pixels_of(firsts).to(model.dtype)  # each distinct prompt's tiles once
            tiles = [rollout.tiles[r // self.G] for r in firsts]
            return shared_image_logprobs(
                model, ids, attn, pixels, tiles, prompt_index, mask, **kwargs
            )
        pixels = rollout.pixels_of(rows).to(model.dtype)
        return completion_logprobs(model, ids, attn, pixels, mask, **kwargs)  # (len(rows), L)
