"""The benchmark's model and inputs: InternVL3 at a given size with random weights, and the
paper's GRPO batch (prompts of images + text), the same for our module and for TRL.

The model is built from its config (no download) with `hcm.model.tiny`'s tokenizer, chat template
and image processor, and saved to a folder both trainers load from (TRL reloads its reference
model from that path). Real InternVL3 has a 151,674-token vocabulary and its `lm_head` GEMM
matters for speed, so the tokenizer is widened to `vocab_size` with plain byte-level tokens
that decode to text: every id a random model samples decodes, and stop strings work as usual.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, InternVLForConditionalGeneration

from hcm.model.tiny import TinySizes, build_tiny_tokenizer, tiny_config, tiny_image_processor

log = logging.getLogger(__name__)

MARKER = "hcm_bench_model.json"
BENCH_FORMAT = 1


def widen_tokenizer_file(path: Path, vocab_size: int) -> int:
    """Append plain tokens to the BPE vocabulary of `path`/tokenizer.json up to `vocab_size`.

    The new tokens are " w<hex>" in byte-level form (reachable by no merge, so encoding is
    unchanged); returns the number added.
    """
    file = path / "tokenizer.json"
    spec = json.loads(file.read_text())
    vocab: dict[str, int] = spec["model"]["vocab"]
    added = [t for t in spec.get("added_tokens", []) if t["content"] not in vocab]
    taken = len(vocab) + len(added)
    if vocab_size < taken:
        raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {taken} tokens")
    next_id, i = taken, 0
    while next_id < vocab_size:
        token = f"\u0120w{i:x}"  # "Ġ" is the byte-level form of a leading space
        i += 1
        if token not in vocab:
            vocab[token] = next_id
            next_id += 1
    file.write_text(json.dumps(spec, ensure_ascii=False))
    return vocab_size - taken


def build_model_folder(
    path: str | Path,
    sizes: Mapping[str, Any],
    vocab_size: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Build and save a random-weight InternVL3 with `sizes` (TinySizes fields) at `path`,
    unless a finished one of the same spec is there; returns `path`."""
    path = Path(path)
    spec = {
        "format": BENCH_FORMAT,
        "sizes": dict(sizes),
        "vocab_size": vocab_size,
        "seed": seed,
        "dtype": str(dtype),
    }
    marker = path / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return path
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        tiny_sizes = TinySizes(**sizes)
        tokenizer = build_tiny_tokenizer()
        tokenizer.save_pretrained(tmp)
        if vocab_size is not None:
            widen_tokenizer_file(tmp, vocab_size)

        tokenizer = AutoTokenizer.from_pretrained(tmp)
        config = tiny_config(tokenizer, tiny_sizes)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            model = InternVLForConditionalGeneration(config).to(dtype)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        del model
        tiny_image_processor(tiny_sizes.image_size).save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(spec, indent=2) + "\n")
        tmp.rename(path)
        log.info("built a random %s-size InternVL3 at %s", sizes, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def prompt_text(tokenizer, text: str, n_tokens: int) -> str:
    """`text` repeated and cut to about `n_tokens` tokens."""
    unit = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not unit:
        raise ValueError("the prompt text encodes to no token")
    ids = (unit * (n_tokens // len(unit) + 1))[:n_tokens]
    return tokenizer.decode(ids)


def random_images(n: int, size: int, seed: int) -> list[Image.Image]:
    """`n` square noise images of one tile each (a tile-sized square is never split)."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


def conversations(
    tokenizer,
    text: str,
    n_prompts: int,
    images_per_prompt: int,
    image_size: int,
    text_tokens: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The prompts: each its own images, then the same text; answers drawn from the options.

    Returns [{"images": [...], "text": str, "answer": str}], the layout both trainers are fed.
    """
    body = prompt_text(tokenizer, text, text_tokens)
    rng = np.random.default_rng(seed)
    answers = ["A", "B", "C", "D", "N", "AB", "BCD"]
    images = random_images(n_prompts * images_per_prompt, image_size, seed)
    return [
        {
            "images": images[p * images_per_prompt : (p + 1) * images_per_prompt],
            "text": body,
            "answer": answers[int(rng.integers(len(answers)))],
        }
        for p in range(n_prompts)
    ]


def chat(prompt: Mapping[str, Any], with_images: bool = True) -> list[dict[str, Any]]:
    """A prompt as one user message: its images, then its text (images as placeholders if not
    `with_images`, TRL's dataset layout)."""
    items = [
        {"type": "image", "image": image} if with_images else {"type": "image"}
        for image in prompt["images"]
    ]
    return [{"role": "user", "content": [*items, {"type": "text", "text": prompt["text"]}]}]
