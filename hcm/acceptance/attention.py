"""One model's completion log-probs under two attention implementations, on a batch whose rows
are padded on both sides as a GRPO rollout's are (a left-padded prompt, a right-padded
completion): flash-attn's unpadding must give what sdpa's mask gives, up to bf16 noise.

The weights are held in fp32 and run under autocast, as a training stage holds its policy
(`trainer.precision=bf16-mixed`); the completion is random tokens (the model need not be able to
write it: both implementations score the same sequence).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from hcm.bench.workload import prompt_text, random_images
from hcm.logprobs import completion_logprobs
from hcm.model.inputs import InputBuilder
from hcm.model.loading import load_image_processor, load_model, load_tokenizer

TEXT = "Which of the candidates keep the product of the original image unchanged? "
PROMPT_TOKENS = (48, 12)  # one long, one short prompt: the short one is left-padded
COMPLETION = 24  # tokens; the second row's last half is padding


def padded_batch(model_dir: str | Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two prompts of one image each and different lengths, left-padded, followed by random
    completion tokens, right-padded in the second row."""
    tokenizer = load_tokenizer(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    builder = InputBuilder(
        tokenizer,
        load_image_processor(model_dir),
        max_patches=1,
        image_seq_length=config.image_seq_length,
    )
    images = random_images(len(PROMPT_TOKENS), config.vision_config.image_size[0], seed)
    chats = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": image},
                    {"type": "text", "text": prompt_text(tokenizer, TEXT, n)},
                ],
            }
        ]
        for image, n in zip(images, PROMPT_TOKENS, strict=True)
    ]
    prompts = builder.encode(chats, add_generation_prompt=True, padding_side="left")
    rows = len(chats)
    generator = torch.Generator().manual_seed(seed)
    completion = torch.randint(0, len(tokenizer), (rows, COMPLETION), generator=generator)
    completion_mask = torch.ones(rows, COMPLETION, dtype=prompts["attention_mask"].dtype)
    completion_mask[1, COMPLETION // 2 :] = 0
    completion[completion_mask == 0] = tokenizer.pad_token_id
    return {
        "input_ids": torch.cat([prompts["input_ids"], completion], 1),  # (2, P+L)
        "attention_mask": torch.cat([prompts["attention_mask"], completion_mask], 1),  # (2, P+L)
        "pixel_values": prompts["pixel_values"],  # (tiles, 3, H, W)
        "completion_mask": completion_mask,  # (2, L)
    }


def attention_parity(
    model_dir: str | Path,
    implementations: tuple[str, str],
    device: str,
    autocast: torch.dtype | None,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-row mean and overall max |log-prob difference| between the two implementations on
    `padded_batch`, and the implementation each model reports it loaded with."""
    batch = {k: v.to(device) for k, v in padded_batch(model_dir, seed).items()}
    logprobs, loaded = {}, {}
    for name in implementations:
        model = load_model(model_dir, dtype="fp32", attn_implementation=name).to(device).eval()
        loaded[name] = model.config._attn_implementation
        with (
            torch.no_grad(),
            torch.autocast(device.split(":")[0], dtype=autocast, enabled=autocast is not None),
        ):
            logprobs[name] = completion_logprobs(model, **batch).float().cpu()  # (2, L)
        del model
    mask = batch["completion_mask"].cpu().float()  # (2, L)
    first, second = implementations
    diff = (logprobs[first] - logprobs[second]).abs() * mask  # (2, L)
    row_mean = diff.sum(1) / mask.sum(1)  # (2,)
    return {
        "row_mean_abs": [float(x) for x in row_mean],
        "max_abs": float(diff.max()),
        "loaded": loaded,
    }
