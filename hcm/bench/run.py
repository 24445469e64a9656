"""run_bench(cfg): build the model, run each side's GRPO steps, summarise, write and print."""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig

from hcm.bench.flops import forward_flops, update_mfu
from hcm.bench.ours import run_ours
from hcm.bench.report import format_table
from hcm.bench.timing import summarize
from hcm.bench.trl_grpo import run_trl
from hcm.bench.workload import build_model_folder, conversations
from hcm.fingerprints import package_version
from hcm.model.loading import load_tokenizer, resolve_dtype

log = logging.getLogger(__name__)


# What a bench report names the versions of (environment()).
PACKAGES = ("torch", "transformers", "trl", "lightning", "flash-attn")


def environment(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """The device and each package's version (None: not installed)."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, **{p: package_version(p) for p in packages}}


def peak_flops(table: dict[str, float], device: str) -> float | None:
    """Dense bf16 peak FLOP/s of the first `table` key found in the device name (TFLOP/s)."""
    for key, tflops in table.items():
        if key.lower() in device.lower():
            return float(tflops) * 1e12
    return None


def fine_tuning(cfg: DictConfig) -> dict[str, str]:
    """What each side trains: ours all weights, or LoRA adapters with `lora=default`
    (conf/lora/); TRL's side is always full fine-tuning."""
    lora = cfg.module.get("lora")
    ours = f"LoRA (rank {lora.rank}, alpha {lora.alpha})" if lora else "full"
    return {"ours": ours, "trl": "full"}


def runner(side: str):
    if side == "ours":
        return run_ours
    if side == "trl":
        return run_trl
    raise ValueError(f"unknown bench side {side!r}; expected ours or trl")


def run_bench(cfg: DictConfig) -> dict[str, Any]:
    arch = cfg.architectures[cfg.arch]
    work = cfg.workload
    for side in cfg.sides:  # fail on a typo before minutes of building
        runner(side)
    path = build_model_folder(
        cfg.model_dir, arch.sizes, arch.vocab_size, cfg.seed, resolve_dtype(cfg.model.dtype)
    )
    config = AutoConfig.from_pretrained(path)
    prompts = conversations(
        load_tokenizer(path),
        cfg.prompt.user.replace("<image>", ""),
        work.prompts,
        work.images_per_prompt,
        arch.sizes.image_size,
        work.text_tokens,
        cfg.seed,
    )
    env = environment()
    peak = peak_flops(dict(cfg.peak_tflops), env["device"])
    results: dict[str, Any] = {
        "arch": cfg.arch,
        "workload": {
            **OmegaConf.to_container(work, resolve=True),
            "group_size": cfg.module.group_size,
            "completion_tokens": cfg.module.sampling.max_new_tokens,
        },
        "warmup": cfg.warmup,
        "repeats": cfg.repeats,
        "environment": env,
        "peak_tflops": peak / 1e12 if peak else None,
        "fine_tuning": fine_tuning(cfg),
        "sides": {},
    }
    for side in cfg.sides:
        log.info("bench: %s, %d + %d steps", side, cfg.warmup, cfg.repeats)
        # what an earlier side left allocated would inflate this side's peaks: recorded
        before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        clock = runner(side)(cfg, str(path), prompts, cfg.warmup + cfg.repeats)
        summary = summarize(clock.steps, cfg.warmup)
        summary["allocated_before_bytes"] = before
        summary["parameters"] = clock.parameters  # the policy's, total and trained
        counts = summary["counts"]
        flops = forward_flops(
            config,
            n_sequences=int(counts["sequences"]),
            seq_len=int(counts["prompt_tokens"] + counts["completion_width"]),
            tiles_per_sequence=work.images_per_prompt,
            logit_positions=int(counts["completion_width"]),
        )
        summary["update_flops"] = flops.update
        summary["update_mfu"] = update_mfu(flops, summary["time"].get("update", 0.0), peak)
        results["sides"][side] = summary
        del clock
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    results["table"] = format_table(results)
    out = Path(cfg.output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(results["table"])
    log.info("bench results: %s", out)
    return results
