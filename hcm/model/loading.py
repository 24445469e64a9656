"""Load InternVL3 (hub id or local folder), its tokenizer and image processor; freeze components.

The real checkpoints (`OpenGVLab/InternVL3-1B-hf`, `-2B-hf`) and the tiny test model
(`hcm.model.tiny.ensure_tiny_model`) go through the same `from_pretrained` calls.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from transformers import AutoTokenizer, InternVLForConditionalGeneration

# From its module: transformers < 5.23 replaces the top-level name with a stub that demands
# torchvision, although the PIL backend needs none.
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from hcm.model.tiny import ensure_tiny_model
from hcm.model.vocab_padding import pad_lm_head

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(FileNotFoundError):
    """A model that is neither a local folder nor loadable from the hub (or its local cache)."""


def resolve_name_or_path(
    name_or_path: str | os.PathLike, tiny: Mapping[str, Any] | None = None
) -> str:
    """The name or folder to load: builds the tiny model there first when `tiny` sizes are given.

    `tiny` holds `hcm.model.tiny.ensure_tiny_model` arguments (seed, max_patches, sizes), as in
    `conf/model/tiny.yaml`; `None` (the real models) returns `name_or_path` unchanged.
    """
    if tiny is None:
        return str(name_or_path)

    return str(ensure_tiny_model(name_or_path, **dict(tiny)))


def resolve_dtype(dtype: str | torch.dtype = "auto") -> torch.dtype:
    """The torch dtype: auto = bf16 on CUDA, fp32 on CPU; else bf16, fp16, fp32 or a dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_attn_implementation(attn_implementation: str = "auto") -> str:
    """auto = flash_attention_2 when flash_attn imports and CUDA is there, else sdpa."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, "
            f"got {attn_implementation!r}"
        )
    if attn_implementation != "auto":
        return attn_implementation
    has_flash = importlib.util.find_spec("flash_attn") is not None
    return "flash_attention_2" if has_flash and torch.cuda.is_available() else "sdpa"


def _check_source(name_or_path: str) -> None:
    """Fail early, with what to do, on a path that is missing and cannot be a hub id."""
    if Path(name_or_path).expanduser().exists():
        return
    if not _HUB_ID.match(name_or_path):
        raise ModelNotFoundError(
            f"model {name_or_path!r} is not a local folder and not a hub id ('owner/name'): "
            "set model.name_or_path to a folder holding config.json and the weights, or to a "
            "hub id such as OpenGVLab/InternVL3-1B-hf"
        )


def _offline_hint(name_or_path: str, error: Exception) -> ModelNotFoundError:
    offline = huggingface_hub.is_offline_mode()
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    why = "HF_HUB_OFFLINE is set and it is not cached" if offline else "it could not be fetched"
    return ModelNotFoundError(
        f"cannot load {name_or_path!r}: {why} ({type(error).__name__}: {error}). Either download "
        f"it on a connected machine (`hf download {name_or_path}`) and copy the hub cache to "
        f"{cache}, or save it to a folder (`snapshot_download(..., local_dir=DIR)`) and set "
        "model.name_or_path=DIR"
    )


def _from_pretrained(loader, name_or_path: str, **kwargs):
    name_or_path = str(name_or_path)
    _check_source(name_or_path)
    try:
        return loader(name_or_path, **kwargs)
    except OSError as e:  # transformers raises OSError for missing repos, files and no network
        if Path(name_or_path).expanduser().exists():
            raise
        raise _offline_hint(name_or_path, e) from e


def load_model(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str = "auto",
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    pad_vocab_to_multiple_of: int = 1,
) -> InternVLForConditionalGeneration:
    """`InternVLForConditionalGeneration.from_pretrained` with the project's defaults.

    `pad_vocab_to_multiple_of` > 1 runs the `lm_head` GEMM on a vocabulary padded to that
    multiple (`hcm.model.vocab_padding`): same outputs, faster tensor-core shapes.
    """
    torch_dtype = resolve_dtype(dtype)
    attn = resolve_attn_implementation(attn_implementation)
    model = _from_pretrained(
        InternVLForConditionalGeneration.from_pretrained,
        name_or_path,
        dtype=torch_dtype,
        attn_implementation=attn,
        trust_remote_code=trust_remote_code,
    )
    if gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (a frozen vision tower) and with DDP.
        # transformers 5.23 renamed it activation checkpointing; older 5.x has only the old name.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if pad_vocab_to_multiple_of > 1:
        pad_lm_head(model, pad_vocab_to_multiple_of)
    log.info("loaded %s (%s, %s attention)", name_or_path, torch_dtype, attn)
    return model


def load_tokenizer(name_or_path: str | os.PathLike, trust_remote_code: bool = False):
    """The model's tokenizer (InternVL3's carries the image-token names the inputs need)."""
    tokenizer = _from_pretrained(
        AutoTokenizer.from_pretrained, name_or_path, trust_remote_code=trust_remote_code
    )
    missing = [
        name
        for name in ("context_image_token", "start_image_token", "end_image_token")
        if getattr(tokenizer, name, None) is None
    ]
    if missing:
        raise ValueError(f"tokenizer of {name_or_path!r} lacks InternVL's {missing}")
    return tokenizer


def load_image_processor(
    name_or_path: str | os.PathLike, trust_remote_code: bool = False, backend: str | None = None
):
    """The GotOcr2 image processor: `backend` "torchvision" or "pil"; None = torchvision when it
    imports, else PIL (their bicubic resizes differ slightly: pixels are not bit-equal)."""
    if backend is None and importlib.util.find_spec("torchvision") is None:
        backend = "pil"
    return _from_pretrained(
        AutoImageProcessor.from_pretrained,
        name_or_path,
        trust_remote_code=trust_remote_code,
        backend=backend,
    )


def freeze(
    model: InternVLForConditionalGeneration,
    vision_tower: bool,
    projector: bool,
    language_model: bool,
) -> dict[str, int]:
    """Set requires_grad per component (True = frozen); returns trainable and total counts.

    The `lm_head` belongs to the language model. Parameters of no listed component (none in
    InternVL3) keep their flag.
    """
    components = {
        "vision_tower": (vision_tower, [model.model.vision_tower]),
        "projector": (projector, [model.model.multi_modal_projector]),
        "language_model": (language_model, [model.model.language_model, model.lm_head]),
    }
    for frozen, modules in components.values():
        for module in modules:
            module.requires_grad_(not frozen)
    params = list(model.parameters())
    counts = {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
    }
    log.info(
        "frozen: %s; trainable %d of %d parameters",
        [name for name, (frozen, _) in components.items() if frozen] or "none",
        counts["trainable"],
        counts["total"],
    )
    return counts
