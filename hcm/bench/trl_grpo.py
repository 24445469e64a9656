"""TRL's side of the benchmark: `trl.GRPOTrainer` set to the paper's step, timed by phase.

Paper settings (TRL's defaults differ): beta 0.04, loss_type "grpo", top_k 3, top_p 0.8,
temperature 1, G completions per prompt, all B*G completions in one per-device batch, HF
`generate` (no vLLM), the same reward weights, learning rate, clipping and gradient
checkpointing as our module's config. Its phases, by wrapped method:
    rollout       GRPOTrainer._generate_and_score_completions
    reference     _get_per_token_logps_and_entropies with the reference model
    old_logprobs  the same with the policy without grad
    update        the same with grad (compute_loss), and accelerator.backward
    optimizer     torch.optim.Optimizer.step
    step          the rest, from on_step_begin to on_step_end

InternVLProcessor cannot be built without torchvision in transformers 5.23 (its video
processor needs it); `ImageProcessor` is InternVL's processor without the video part.
"""

from __future__ import annotations

import re
import tempfile
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import AutoConfig, InternVLProcessor, TrainerCallback
from transformers.processing_utils import ProcessorMixin

from hcm.bench.timing import PhaseClock, logprob_phase
from hcm.bench.workload import chat
from hcm.model.loading import load_image_processor, load_model, load_tokenizer, resolve_dtype
from hcm.rewards import score


class ImageProcessor(InternVLProcessor):
    """InternVLProcessor for images and text only (no video processor, so no torchvision)."""

    def __init__(
        self, image_processor=None, tokenizer=None, image_seq_length=256, chat_template=None, **kw
    ):
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kw)
        self.image_seq_length = image_seq_length
        self.start_image_token = tokenizer.start_image_token
        self.end_image_token = tokenizer.end_image_token
        self.start_image_token_id = tokenizer.start_image_token_id
        self.end_image_token_id = tokenizer.end_image_token_id
        self.image_token = tokenizer.context_image_token
        self.video_token = tokenizer.video_token
        self.image_token_id = tokenizer.context_image_token_id
        self.multimodal_pattern = re.compile(
            f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
        )


class _StepClock(TrainerCallback):
    def __init__(self, clock: PhaseClock):
        self.clock = clock

    def on_step_begin(self, args, state, control, **kwargs):
        self.clock.begin_step()

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.end_step()


def paper_reward(weights: dict[str, float]):
    """Our reward (hcm.rewards.score) as a TRL reward function of the `answer` column."""

    def reward(prompts, completions, answer, **kwargs) -> list[float]:
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        total, _ = score(texts, answer, weights)
        return total.tolist()

    reward.__name__ = "paper_reward"
    return reward


def instrument(trainer, clock: PhaseClock) -> list:
    """Wrap the trainer's phases; returns the optimizer hook handles to remove after."""

    def count(batch: dict) -> None:
        clock.count(
            sequences=batch["completion_ids"].shape[0],
            prompt_tokens=batch["prompt_ids"].shape[1],
            completion_tokens=float(batch["completion_mask"].sum()),
            completion_width=batch["completion_ids"].shape[1],
        )

    trainer._generate_and_score_completions = clock.wrap(
        trainer._generate_and_score_completions, "rollout", on_result=count
    )

    def is_reference(model) -> bool:
        return model is trainer.ref_model

    trainer._get_per_token_logps_and_entropies = clock.wrap(
        trainer._get_per_token_logps_and_entropies, logprob_phase(is_reference)
    )
    trainer.accelerator.backward = clock.wrap(trainer.accelerator.backward, "update")
    trainer.add_callback(_StepClock(clock))
    return clock.optimizer_hooks()


def trl_args(cfg: DictConfig, steps: int) -> dict[str, Any]:
    """GRPOConfig arguments: the paper's step as our module's config sets it."""
    m, mod, work = cfg.model, cfg.module, cfg.workload
    dtype = resolve_dtype(m.dtype)
    cuda = torch.cuda.is_available()
    s = mod.sampling
    return {
        "output_dir": tempfile.mkdtemp(prefix="hcm-bench-trl-"),
        "per_device_train_batch_size": work.prompts * mod.group_size,
        "num_generations": mod.group_size,
        "gradient_accumulation_steps": 1,
        "max_completion_length": s.max_new_tokens,
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "beta": mod.beta,
        "loss_type": "grpo",
        "epsilon": mod.clip_eps,
        "num_iterations": mod.num_iterations,
        "scale_rewards": mod.advantage_scale,
        "learning_rate": mod.optimizer.lr,
        "lr_scheduler_type": "constant",
        "max_grad_norm": mod.max_grad_norm or 0.0,
        "max_steps": steps,
        "gradient_checkpointing": bool(m.gradient_checkpointing),
        "bf16": dtype == torch.bfloat16,
        "use_cpu": not cuda,
        "seed": cfg.seed,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 10**6,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "log_completions": False,
    }


def run_trl(cfg: DictConfig, model_path: str, prompts: list[dict], steps: int) -> PhaseClock:
    """`steps` TRL GRPO steps on the prompts; returns the clock of its phases."""
    # optional: trl (and its datasets) come with the `bench` extra, only this side needs them
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    m = cfg.model
    tokenizer = load_tokenizer(model_path)
    processor = ImageProcessor(
        image_processor=load_image_processor(model_path),
        tokenizer=tokenizer,
        image_seq_length=AutoConfig.from_pretrained(model_path).image_seq_length,
        chat_template=tokenizer.chat_template,
    )
    dataset = Dataset.from_list(
        [
            {"prompt": chat(p, with_images=False), "images": p["images"], "answer": p["answer"]}
            for p in prompts
        ]
    )
    args = trl_args(cfg, steps)
    model = load_model(model_path, dtype=m.dtype, attn_implementation=m.attn_implementation)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=paper_reward(dict(cfg.module.rewards)),
        args=GRPOConfig(**args),
        train_dataset=dataset,
        processing_class=processor,
    )
    clock = PhaseClock()
    clock.count_parameters(trainer.model)
    handles = instrument(trainer, clock)
    try:
        trainer.train()
    finally:
        for handle in handles:
            handle.remove()
    del trainer, model
    return clock
