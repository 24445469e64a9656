"""What every stage shares: loading InternVL3, freezing, the optimizer, and scoring by generation.

Validation and test generate an answer for each test prompt (greedy by default) and feed the
section-5.1 `ScreeningScore`, logged as `val/score/<key>` / `test/score/<key>`, beside the
fraction of answers cut by the completion budget (`val/completion_length/truncated_frac`).
Under DDP each rank scores its shard of the split and every sample counts once.

With `lora` (the `lora` config group, `module.lora`) the components `freeze` leaves trainable
train through LoRA adapters (`hcm.model.lora`) instead of their own weights: the base stays frozen
in `model.dtype`, checkpoints hold only the adapters of the policy (the base is the initial
model, reloaded), and the stage exports the adapters merged into the base.

Under DDP each rank samples from its own torch stream (`rank_seed`). Every checkpoint also holds
each rank's RNG states (Lightning saves none), put back just before the first training batch
after a resume, so a resumed run samples what an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric

from hcm.checkpoints import capture_rng, rank_seed, restore_rng
from hcm.faults import fault_point
from hcm.model import generation, loading, lora  # as modules: a test may swap their functions
from hcm.predictions import gather_rows
from hcm.screening_score import ScreeningScore

log = logging.getLogger(__name__)


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total` steps."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def scheduled_steps(
    batches_per_epoch: list[int],
    limit: int | float,
    max_steps: int = -1,
    steps_per_batch: int = 1,
    ran: int = 0,
) -> int:
    """Batches a fit trains on: `ran` already run in earlier epochs (counted as they ran), then
    each of `batches_per_epoch` cut by Lightning's `limit_train_batches` (an int: at most that
    many; a float: that fraction), the whole capped by `max_steps` optimizer steps
    (`steps_per_batch` of them per batch; -1 or None: no cap).

    >>> scheduled_steps([12, 18], limit=4), scheduled_steps([12, 18], 0.5, max_steps=14)
    (8, 14)
    >>> scheduled_steps([18], limit=4, ran=12)
    16
    """
    cut = (lambda n: min(n, limit)) if isinstance(limit, int) else (lambda n: int(n * limit))
    total = ran + sum(cut(n) for n in batches_per_epoch)
    if max_steps is not None and max_steps >= 0:
        total = min(total, -(-max_steps // steps_per_batch))
    return total


def logged_metrics(trainer: L.Trainer) -> dict[str, float]:
    """The scalar metrics the trainer holds: what a stage reports (stage.json's `metrics`)."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


class ScreeningModule(L.LightningModule):
    def __init__(
        self,
        *,
        model: dict,
        eval_generation: dict,
        freeze: dict | None = None,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        lora: dict | None = None,
    ):
        """Keys of conf/module/*.yaml, where their defaults live. Evaluation builds the module
        with the model and generation settings only: no freezing, no optimizer. `lora`: the
        `lora` config group (conf/lora/), absent (None) unless chosen: full fine-tuning."""
        super().__init__()
        self.save_hyperparameters()
        self.model_cfg = dict(model)
        self.freeze_cfg = dict(freeze or {})
        self.optimizer_cfg = dict(optimizer or {})
        self.scheduler_cfg = dict(scheduler or {})
        self.lora_cfg = dict(lora) if lora else None
        self.eval_generation = dict(eval_generation)
        self.val_score, self.test_score = ScreeningScore(), ScreeningScore()
        self.val_truncated, self.test_truncated = MeanMetric(), MeanMetric()
        self.model: Any = None
        self.tokenizer: Any = None
        self._resumed_rng: dict | None = None  # a checkpoint's RNG state, until training resumes
        self.restored_metrics: dict[str, float] = {}  # what the checkpoint's run had logged

    # -- model ---------------------------------------------------------------------------
    @property
    def model_path(self) -> str:
        """The folder or hub id to load (the tiny model is built there on first use)."""
        cfg = self.model_cfg
        return loading.resolve_name_or_path(cfg["name_or_path"], cfg.get("tiny"))

    def load_policy(self, dtype: str | None = None) -> Any:
        """The model at `model_path`, its weights in `dtype` (None: `model.dtype`)."""
        cfg = self.model_cfg
        return loading.load_model(
            self.model_path,
            dtype=dtype or cfg.get("dtype", "auto"),
            attn_implementation=cfg.get("attn_implementation", "auto"),
            gradient_checkpointing=cfg.get("gradient_checkpointing", False),
            trust_remote_code=cfg.get("trust_remote_code", False),
            pad_vocab_to_multiple_of=cfg.get("pad_vocab_to_multiple_of", 1),
        )

    def configure_model(self) -> None:
        if self.model is not None:
            return
        # A training stage holds the policy in fp32 whatever model.dtype says: AdamW's update
        # of a bf16 weight rounds away below 2^-9 of it (lr 1e-6 moves ~2% of the weights that
        # fp32 moves). bf16 autocast (trainer.precision) still computes in bf16. Evaluation
        # (no freeze config) keeps model.dtype; so does LoRA's frozen base (its adapters: fp32).
        training = bool(self.freeze_cfg)
        dtype = self.frozen_dtype() if self.lora_cfg else "fp32" if training else None
        self.model = self.load_policy(dtype).train()
        self.tokenizer = loading.load_tokenizer(
            self.model_path, trust_remote_code=self.model_cfg.get("trust_remote_code", False)
        )
        if self.lora_cfg:
            lora.add_adapters(self.model, self.freeze_cfg, **self.adapter_args)
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            log.info("LoRA: %d trainable adapter parameters", trainable)
        elif self.freeze_cfg:  # training stages; evaluation leaves the weights as loaded
            counts = loading.freeze(self.model, **self.freeze_cfg)
            log.info("trainable parameters: %d / %d", counts["trainable"], counts["total"])

    @property
    def adapter_args(self) -> dict | None:
        """`module.lora` less what only the export reads: the settings that shape the adapters
        (None: full fine-tuning)."""
        if not self.lora_cfg:
            return None
        return {k: v for k, v in self.lora_cfg.items() if k != "save_adapter"}

    def frozen_dtype(self) -> str | None:
        """The storage of weights that never train (GRPO's reference, LoRA's base): model.dtype,
        except under FSDP. There a unit flattens all its weights into one tensor of one dtype:
        the reference (a submodule of the module FSDP wraps) shares the root unit with the
        policy's leftover weights (embeddings, norms, lm_head), and a LoRA base layer shares its
        decoder layer's unit with its fp32 adapters."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        return "fp32" if type(strategy).__name__ == "FSDPStrategy" else None

    def exported_model(self, output_dir: Path) -> Any:
        """The model a stage exports as `model/`: the policy; under LoRA its adapters merged into
        the base (in place: the stage is over), written alone to `<output_dir>/adapter` first
        when `lora.save_adapter` asks (`hcm.model.lora.save_adapter`)."""
        if not self.lora_cfg:
            return self.model
        if self.lora_cfg["save_adapter"]:
            lora.save_adapter(self.model, Path(output_dir) / "adapter")
        return lora.merge_adapters(self.model)

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        cfg = self.optimizer_cfg
        opt = torch.optim.AdamW(
            params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=tuple(cfg["betas"])
        )
        ratio, min_ratio = self.scheduler_cfg["warmup_ratio"], self.scheduler_cfg["min_lr_ratio"]

        def multiplier(step: int) -> float:
            total = max(1, self.total_steps())
            return warmup_cosine(step, total, int(ratio * total), min_ratio)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, multiplier)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def total_steps(self) -> int:
        """Optimizer steps of the whole fit, for the LR schedule (Lightning's estimate counts
        limit_train_batches, max_steps, gradient accumulation and devices)."""
        return int(self.trainer.estimated_stepping_batches)

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Each rank's RNG: ranks sample different completions (every rank takes part here).
        state = capture_rng()
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and torch.distributed.is_initialized():
            states: list = [None] * world
            torch.distributed.all_gather_object(states, state)
            checkpoint["rng_states"] = states
        else:
            checkpoint["rng_states"] = [state]
        # What has been logged (the last validation, the last step's loss): a stage resumed from
        # its final checkpoint trains nothing, and reports these as the uninterrupted run did.
        checkpoint["metrics"] = logged_metrics(self.trainer)
        if self.lora_cfg:  # the base is the initial model, reloaded by configure_model
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("model.") and not lora.is_adapter_key(k)]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.restored_metrics = checkpoint.get("metrics", {})
        if self.lora_cfg:  # the base configure_model loaded; loading stays strict for adapters
            state = checkpoint["state_dict"]
            for key, value in self.model.state_dict().items():
                if not lora.is_adapter_key(key):
                    state.setdefault(f"model.{key}", value)
        states = checkpoint.get("rng_states")
        if not states:
            log.warning("the checkpoint holds no RNG state: sampling will not repeat the first run")
            return
        rank = self.trainer.global_rank if self._trainer is not None else 0
        if len(states) != (self.trainer.world_size if self._trainer is not None else 1):
            log.warning("the checkpoint holds the RNG states of %d ranks", len(states))
        self._resumed_rng = states[rank % len(states)]

    def on_fit_start(self) -> None:
        # With one seed on every rank, each rank would draw the same noise for its own prompts'
        # completions (correlated samples across the global batch). A resume puts back each
        # rank's saved stream instead (on_train_batch_start).
        if self.trainer.world_size > 1:
            torch.manual_seed(rank_seed(torch.initial_seed(), self.trainer.global_rank))

    def on_train_start(self) -> None:
        # A checkpoint restores the optimizer's LR as its run last set it, from that run's total
        # steps. A stage that continues another's checkpoint (a pipeline's continue_from) with
        # other epochs has another total: set this step's LR from its own schedule, or its first
        # step would take the LR the stage it continues computed. (Lightning restores the
        # checkpoint after configure_optimizers and before this hook.)
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler  # configure_optimizers': a LambdaLR
            step, multipliers = sched.last_epoch, sched.lr_lambdas
            lrs = [base * f(step) for base, f in zip(sched.base_lrs, multipliers, strict=True)]
            for group, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            sched._last_lr = lrs  # what get_last_lr() reports (torch keeps it here)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Here, not when the checkpoint loads: whatever Lightning draws while it resumes (setting
        # up loaders, validating) must not shift the stream the training steps draw from.
        if self._resumed_rng is not None:
            restore_rng(self._resumed_rng)
            self._resumed_rng = None

    # -- scoring by generation ---------------------------------------------------------------
    def answer(self, batch: dict, **overrides) -> Any:
        """Generate one response per prompt of a PromptCollator batch: a Generation (texts and
        which ran into max_new_tokens)."""
        fault_point("answer")
        kwargs = {**self.eval_generation, **overrides}
        return generation.generate(self.model, batch["inputs"], self.tokenizer, **kwargs)

    def setup(self, stage: str) -> None:
        # The datamodule chooses the metric: the public benchmarks score accuracy, not 5.1's.
        # (A datamodule without one, like the benchmark's fixed batches, keeps ScreeningScore.)
        make = getattr(getattr(self.trainer, "datamodule", None), "make_metric", None)
        if make is not None:
            self.val_score, self.test_score = make(), make()

    def _score_step(self, batch: dict, batch_idx: int, metric: Any, truncated: MeanMetric) -> list:
        """Score this batch's answers; returns the (completion, labels...) rows it scored."""
        out = self.answer(batch)
        keep = self._unrepeated(batch_idx, len(out.texts))
        labels = [batch[k][:keep] for k in metric.batch_keys]
        metric.update(out.texts[:keep], *labels)
        truncated.update(out.truncated[:keep].float())
        return [out.texts[:keep], *labels]

    def _unrepeated(self, batch_idx: int, n: int) -> int:
        """How many of this evaluation batch's n rows to score: all but the repeats that pad a
        rank's shard (hcm.data.sampler.EvalSampler), so each sample counts once."""
        loaders = self.trainer.val_dataloaders if self.trainer.validating else None
        loader = loaders if loaders is not None else self.trainer.test_dataloaders
        scored = getattr(getattr(loader, "sampler", None), "scored", None)
        if scored is None:  # a loader of another kind: every row is its own sample
            return n
        return scored(batch_idx, loader.batch_size, n)

    def _log_score(self, metric: Any, truncated: MeanMetric, prefix: str) -> dict[str, float]:
        values = {f"{prefix}/score/{k}": v for k, v in metric.compute().items()}
        # answers cut by max_completion_length: no </answer>, scored wrong
        values[f"{prefix}/completion_length/truncated_frac"] = truncated.compute()
        self.log_dict(values, sync_dist=False)  # the metrics already reduced across ranks
        metric.reset()
        truncated.reset()
        return {k: float(v) for k, v in values.items()}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._score_step(batch, batch_idx, self.val_score, self.val_truncated)

    def on_validation_epoch_end(self) -> None:
        self._log_score(self.val_score, self.val_truncated, "val")

    def on_test_epoch_start(self) -> None:
        self.test_predictions: list[dict] = []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        completions, *labels = self._score_step(
            batch, batch_idx, self.test_score, self.test_truncated
        )
        # each response's verdict, judged as the score counts it: the rows of predictions.jsonl
        verdicts = self.test_score.judge(completions, *labels)
        ids = batch["ids"][: len(completions)]
        self.test_predictions += [{"id": i, **v} for i, v in zip(ids, verdicts, strict=True)]

    def on_test_epoch_end(self) -> None:
        self.test_results = self._log_score(self.test_score, self.test_truncated, "test")
        self.test_predictions = gather_rows(self.test_predictions, self.trainer.world_size)
