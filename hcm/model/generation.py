"""Sampling completions from InternVL3: banned tokens, stop strings, masks of what was generated.

An untrained (or tiny random) model emits image-placeholder tokens when sampling freely, and the
next forward then fails transformers' check that image tokens match image features. So every
special token that cannot belong to an answer is masked at sampling time (`suppress_tokens`, which
transformers applies before temperature/top-k/top-p: the sampling distribution is the one
renormalised over the allowed tokens), except the eos `<|im_end|>`.

The G completions of a prompt are drawn from G copies of it made here (`repeat_batch`), not by
`generate(num_return_sequences=G)`: transformers 5.17 repeats InternVL's `pixel_values` per tile
instead of per sample, giving the copies of a multi-tile prompt other images (5.23 is right).

Only our arguments (and transformers' global defaults) configure sampling: the checkpoint's
`generation_config.json` is ignored.

A completion ends at eos (kept: the model learns to stop) or at the end of the first stop string
(`</answer>`); the tokens after it are padding with completion_mask 0. The stop-string criterion
is built once per tokenizer and reused: transformers 5.23 rebuilds it on every call (its cache key
follows the tokenizer vocabulary's hash order, which changes between calls), seconds of CPU
with InternVL3's 151,674 tokens.

Fast paths, each off by default and each leaving the sampling distribution as it is:
`cache="static"` preallocates the KV cache (sized `max_cache_len` or more, so that later calls
reuse the shapes), which lets `compile=True` compile the decode step (CUDA graphs on a GPU; a
one-time compile, reused while the shapes hold); `share_images=True` encodes each prompt's
images once for its G copies and prefills from embeddings (`hcm.model.vision_cache`).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteriaList, StopStringCriteria
from transformers.generation.configuration_utils import CompileConfig

from hcm.model.inputs import repeat_batch, tiles_per_row
from hcm.model.vision_cache import embeds_with_shared_images, image_features

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values")
CACHES = ("dynamic", "static")
_STOP_CRITERIA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class Generation:
    """Completions, row order [p0c0 .. p0c(G-1), p1c0 ...] (G = group_size)."""

    completion_ids: torch.Tensor  # (N, L) long, right-padded with the pad id
    completion_mask: torch.Tensor  # (N, L) long, 1 on generated tokens up to and with eos/stop
    texts: list[str]  # decoded without special tokens, up to the cut
    truncated: torch.Tensor  # (N,) bool: cut by max_new_tokens (neither eos nor a stop string)
    prompt_ids: torch.Tensor  # (N, P) the prompt each row continues (each prompt G times)
    prompt_mask: torch.Tensor  # (N, P) its attention mask (0 on left padding)

    @property
    def prompt_length(self) -> int:
        """The padded prompt length P the completions follow."""
        return self.prompt_ids.shape[1]


def banned_token_ids(tokenizer) -> list[int]:
    """Special tokens that cannot be part of an answer: image markers, chat markers, padding.

    Every special token of the tokenizer plus InternVL's image tokens, minus the eos.
    """
    ids = set(tokenizer.all_special_ids)
    for name in ("context_image_token", "start_image_token", "end_image_token", "video_token"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            ids.add(tokenizer.convert_tokens_to_ids(token))
    ids.discard(tokenizer.eos_token_id)
    ids.discard(None)
    return sorted(ids)


def truncate_completions(
    completion_ids: torch.Tensor,
    tokenizer,
    stop_strings: Sequence[str] = ("</answer>",),
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Cut each row after its eos or after the token that completes a stop string.

    Returns (ids with pad after the cut, mask, texts). Pure post-processing of `generate`'s
    output, which pads finished rows but may let a stop string end inside a token.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = completion_ids.clone()  # (N, L)
    mask = torch.zeros_like(ids)
    texts = []
    for row in range(ids.shape[0]):
        tokens = ids[row].tolist()
        length = tokens.index(eos) + 1 if eos in tokens else len(tokens)
        if pad != eos and pad in tokens[:length]:  # pad is banned: only filler after a stop
            length = tokens.index(pad)
        length = _stop_length(tokens[:length], tokenizer, stop_strings)
        mask[row, :length] = 1
        ids[row, length:] = pad
        texts.append(tokenizer.decode(tokens[:length], skip_special_tokens=True))
    return ids, mask, texts


def _stop_length(tokens: list[int], tokenizer, stop_strings: Sequence[str]) -> int:
    """Fewest leading tokens whose text holds a stop string (all of them when none does)."""

    def stopped(n: int) -> bool:
        text = tokenizer.decode(tokens[:n], skip_special_tokens=True)
        return any(s in text for s in stop_strings)

    if not stop_strings or not stopped(len(tokens)):
        return len(tokens)
    lo, hi = 1, len(tokens)  # a prefix's text only grows: binary search the first stopped prefix
    while lo < hi:
        mid = (lo + hi) // 2
        if stopped(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def stop_criteria(tokenizer, stop_strings: Sequence[str]) -> StoppingCriteriaList:
    """transformers' stop-string criterion for `tokenizer`, built once per (tokenizer, strings)."""
    if not stop_strings:
        return StoppingCriteriaList()
    built = _STOP_CRITERIA.setdefault(tokenizer, {})
    key = tuple(stop_strings)
    if key not in built:
        built[key] = StopStringCriteria(tokenizer, list(key))
    return StoppingCriteriaList([built[key]])


def fast_path_options(
    cache: str = "dynamic", max_cache_len: int | None = None, compile: bool = False
) -> dict:
    """GenerationConfig fields of the static-cache / compiled-decode fast path."""
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    if compile and cache != "static":
        raise ValueError("compile=True needs cache='static' (a dynamic cache changes shape)")
    if cache == "dynamic":
        return {"disable_compile": True}
    options: dict = {"cache_implementation": "static", "disable_compile": not compile}
    if max_cache_len is not None:
        options["max_cache_len"] = max_cache_len
    if compile:
        # transformers compiles the decode step on accelerators only unless told otherwise
        compile_config = CompileConfig()
        compile_config._compile_all_devices = True
        options["compile_config"] = compile_config
    return options


@torch.no_grad()
def generate(
    model,
    batch: Mapping[str, torch.Tensor],
    tokenizer,
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    group_size: int = 1,
    stop_strings: Sequence[str] = ("</answer>",),
    cache: str = "dynamic",
    max_cache_len: int | None = None,
    compile: bool = False,
    share_images: bool = False,
) -> Generation:
    """`model.generate` on a left-padded batch, with banned tokens masked and stop strings cut.

    Runs the model in eval mode (its mode is restored after): in train mode with gradient
    checkpointing, transformers' decoder layers drop the KV cache. Pass the unwrapped model
    (not DDP's wrapper), its inputs on its device. `cache`, `max_cache_len`, `compile` and
    `share_images` select the fast paths of the module docstring. `group_size` (G): completions
    per prompt, each prompt's G rows in a row.
    """
    sampling = (
        {"temperature": temperature, "top_k": top_k or 0, "top_p": 1.0 if top_p is None else top_p}
        if do_sample
        else {}
    )
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        suppress_tokens=banned_token_ids(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **fast_path_options(cache, max_cache_len, compile),
        **sampling,
    )
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    if (inputs["attention_mask"][:, -1] == 0).any():
        raise ValueError("generate needs a left-padded batch (encode(..., padding_side='left'))")
    was_training = model.training
    model.eval()
    # transformers fills the fields `config` leaves unset from model.generation_config, i.e. the
    # checkpoint's generation_config.json (a hub file's repetition_penalty or min_p would change
    # rollouts, not the log-probs): a blank one leaves only ours and transformers' defaults.
    checkpoints, model.generation_config = model.generation_config, GenerationConfig()
    try:
        if share_images and "pixel_values" in inputs:
            inputs = _shared_image_inputs(model, inputs, group_size)
        elif group_size > 1:
            cfg = model.config
            inputs = repeat_batch(inputs, group_size, cfg.image_token_id, cfg.image_seq_length)
        sequences = model.generate(
            **inputs,
            generation_config=config,
            stopping_criteria=stop_criteria(tokenizer, stop_strings),
        )  # (N, P + L)
    finally:
        model.train(was_training)
        model.generation_config = checkpoints
    prompt_length = inputs["input_ids"].shape[1]
    ids, mask, texts = truncate_completions(sequences[:, prompt_length:], tokenizer, stop_strings)
    truncated = ran_out(ids, mask, texts, tokenizer.eos_token_id, max_new_tokens, stop_strings)
    prompts = inputs["input_ids"], inputs["attention_mask"]  # (N, P) as sampled from
    return Generation(ids, mask, texts, truncated, *prompts)


def ran_out(
    ids: torch.Tensor,
    mask: torch.Tensor,
    texts: Sequence[str],
    eos: int,
    max_new_tokens: int,
    stop_strings: Sequence[str],
) -> torch.Tensor:
    """(N,) True where a completion was cut by max_new_tokens: it holds that many tokens and
    neither ends with eos nor holds a stop string (one that ends exactly there ended it)."""
    lengths = mask.sum(1)  # (N,)
    last = ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)  # (N,)
    stopped = [any(s in t for s in stop_strings) for t in texts]
    stopped = torch.tensor(stopped, dtype=torch.bool, device=ids.device)  # (N,)
    return (lengths >= max_new_tokens) & (last != eos) & ~stopped


def _shared_image_inputs(model, inputs: dict, group_size: int) -> dict:
    """The prompts `group_size` times each, as embeddings holding each prompt's images encoded once.

    `generate` prefills from `inputs_embeds` and keeps `input_ids` to return the prompt with the
    completion, as with `pixel_values`.
    """
    cfg = model.config
    tiles = tiles_per_row(inputs["input_ids"], cfg.image_token_id, cfg.image_seq_length)
    features = image_features(model, inputs["pixel_values"].to(model.dtype))  # (tiles, T_img, D)
    input_ids = inputs["input_ids"].repeat_interleave(group_size, dim=0)  # (B*G, P)
    prompt_index = torch.arange(len(tiles), device=input_ids.device).repeat_interleave(group_size)
    return {
        "input_ids": input_ids,
        "attention_mask": inputs["attention_mask"].repeat_interleave(group_size, dim=0),
        "inputs_embeds": embeds_with_shared_images(
            model, input_ids, features, tiles, prompt_index
        ),  # (B*G, P, D)
    }
