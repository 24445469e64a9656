"""Our side of the benchmark: `GRPOModule.training_step` under a Lightning Trainer, timed by phase.

The module is built from the composed `module` config (conf/module/grpo.yaml and the bench's
overrides; `lora=default` trains LoRA adapters, conf/lora/), trains on the same fixed batch
every step, and its own methods are wrapped:
    rollout        GRPOModule.generate and .reward (generation, decoding, rewards)
    reference      GRPOModule._logprobs with the reference model (LoRA: the adapters off)
    old_logprobs   GRPOModule._logprobs with the policy without grad (mu > 1 only)
    update         GRPOModule._logprobs with grad, and manual_backward
    optimizer      torch.optim.Optimizer.step
    step           the rest of training_step (advantages, gradient clipping, logging)
"""

from __future__ import annotations

from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from transformers import AutoConfig

from hcm.bench.timing import PhaseClock, logprob_phase
from hcm.bench.workload import chat
from hcm.model import lora
from hcm.model.inputs import InputBuilder
from hcm.model.loading import load_image_processor, load_tokenizer
from hcm.runtime import resolve_precision


class FixedBatches(L.LightningDataModule):
    """The same prompt batch `n` times, with what GRPOModule asks of its datamodule."""

    composition = "all"  # no hard-case mining
    hard_indices = None

    def __init__(self, batch: dict, n: int):
        super().__init__()
        self.batch, self.n = batch, n

    def batches_per_epoch(self, epochs: int) -> list[int]:
        return [self.n] * epochs

    def train_dataloader(self) -> DataLoader:
        return DataLoader([self.batch] * self.n, batch_size=None)


class ClockCallback(L.Callback):
    """Times each training step and wraps the module's phases once training starts."""

    def __init__(self, clock: PhaseClock):
        self.clock = clock
        self.handles: list = []

    def on_train_start(self, trainer, module) -> None:
        clock = self.clock

        def count(rollout) -> None:
            prompt_len = rollout.input_ids.shape[1] - rollout.completion_mask.shape[1]
            clock.count(
                sequences=rollout.size,
                prompt_tokens=prompt_len,
                completion_tokens=float(rollout.completion_mask.sum()),
                completion_width=rollout.completion_mask.shape[1],
            )

        module.generate = clock.wrap(module.generate, "rollout", on_result=count)
        module.reward = clock.wrap(module.reward, "rollout")

        def is_reference(model) -> bool:  # a second model, or under LoRA the adapters off
            if model is module.ref_model:
                return True
            return module.lora_cfg is not None and lora.adapters_disabled(model)

        module._logprobs = clock.wrap(module._logprobs, logprob_phase(is_reference))
        clock.count_parameters(module.model)
        module.manual_backward = clock.wrap(module.manual_backward, "update")
        self.handles = clock.optimizer_hooks()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.clock.begin_step()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.clock.end_step()

    def on_train_end(self, trainer, module) -> None:
        for handle in self.handles:
            handle.remove()


def make_batch(cfg: DictConfig, model_path: str, prompts: list[dict]) -> dict:
    """The prompts as a PromptCollator batch (left-padded inputs, answers)."""
    builder = InputBuilder(
        load_tokenizer(model_path),
        load_image_processor(model_path),
        max_patches=cfg.model.max_patches,
        image_seq_length=AutoConfig.from_pretrained(model_path).image_seq_length,
    )
    inputs = builder.encode(
        [chat(p) for p in prompts], add_generation_prompt=True, padding_side="left"
    )
    return {
        "inputs": inputs,
        "ids": [str(i) for i in range(len(prompts))],
        "answers": [p["answer"] for p in prompts],
        "dimensions": [[] for _ in prompts],
    }


def run_ours(cfg: DictConfig, model_path: str, prompts: list[dict], steps: int) -> PhaseClock:
    """`steps` GRPO steps of our module on the prompts; returns the clock of its phases."""
    # resolved apart from hydra's own node (the module's budgets interpolate the top-level key)
    keys = ["model", "module", "trainer", "paths", "max_completion_length"]
    cfg = OmegaConf.create(OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True))
    cfg.model.name_or_path, cfg.model.tiny = model_path, None
    cfg.module.model = cfg.model
    resolve_precision(cfg)
    module = instantiate(cfg.module, _convert_="all")
    clock = PhaseClock()
    trainer_kwargs: dict[str, Any] = {
        "max_epochs": 1,
        "max_steps": steps,
        "limit_train_batches": steps,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": [ClockCallback(clock)],
        "default_root_dir": cfg.paths.output_dir,
    }
    trainer = instantiate(cfg.trainer, **trainer_kwargs)
    trainer.fit(module, datamodule=FixedBatches(make_batch(cfg, model_path, prompts), steps))
    del trainer, module
    return clock
