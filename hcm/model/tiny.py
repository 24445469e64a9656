"""A tiny InternVL3 built locally: what the tests and the CPU demo run instead of the real weights.

Same architecture and the same files on disk as `OpenGVLab/InternVL3-1B-hf` (an InternViT vision
tower, pixel shuffle, the MLP projector, a Qwen2 language model with an untied `lm_head`), with
tiny sizes and random weights, so that the project loads it through exactly the hub code path.

The tokenizer is a byte-level BPE trained at build time on a fixed built-in corpus (no download):
every string round-trips through it, whatever the model generates. It carries InternVL3's special
tokens (chat markers, image markers) as added special tokens, like the real Qwen2.5 tokenizer.
`<think>`, `</think>`, `<answer>`, `</answer>` are ordinary text there, as in the real tokenizer,
so decoding with `skip_special_tokens=True` keeps them for the reward parser; the corpus makes the
BPE learn them as whole tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

log = logging.getLogger(__name__)

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
START_IMAGE_TOKEN = "<img>"
END_IMAGE_TOKEN = "</img>"
CONTEXT_IMAGE_TOKEN = "<IMG_CONTEXT>"
VIDEO_TOKEN = "<video>"
# Order as in the real vocabulary: chat markers first, image markers after (ids 151643.. there).
SPECIAL_TOKENS = (
    PAD_TOKEN,
    IM_START,
    IM_END,
    START_IMAGE_TOKEN,
    END_IMAGE_TOKEN,
    CONTEXT_IMAGE_TOKEN,
    VIDEO_TOKEN,
)

# Behaves as the InternVL3-hf template: no default system prompt, an image item renders as
# "<IMG_CONTEXT>\n" (the processor expands it), a video item as "<video>\n".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<IMG_CONTEXT>\n' }}"
    "{%- elif item['type'] == 'video' -%}{{ '<video>\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# The merges' training text: the task's vocabulary (Appendix-B prompts, CoT answers, defect words).
# Changing it changes the tokenizer, hence TINY_FORMAT below.
_CORPUS = """\
You are an expert in product operations review and possess significant artistic talent, \
excelling at creating product images.
# Task
I have created four product images for a product, labeled A, B, C, and D. I need your help to \
select the one that meets the requirements.
# Requirements
1. The image must not contain any items other than those in the original product image. Any \
changes to the product (including appearance, shape, quantity, etc.) will render the image \
unacceptable, regardless of how visually appealing it may be. This is the most fundamental \
requirement.
2. Lighting, composition, and other elements should adhere to physical laws, avoiding issues such \
as incorrect shadows, floating products, or other unreasonable phenomena.
# Output Format
1. Only one answer can be provided. If none of the images meet the requirements, you should \
output 'N'. If multiple images meet the requirements, choose the one that best aligns with \
aesthetic standards.
2. Provide only the final numbered answer, following this format: A, B, C, D, or N.
2. Provide your thought process by sequentially observing each image to check for any product \
changes and evaluate the lighting and layout. Ultimately, select the most appropriate image.
3. Analyze each image (A, B, C, D) from multiple dimensions to determine its reasonableness, then \
provide the answer you believe is the most suitable.
# Input
Original image:
Generated images:
# Output
Describe the original product image and each of the four generated images A, B, C and D.
<think>I observed <A> the product is unchanged, <B> the shadow is missing, <C> the product is \
floating, <D> an extra object appears, so I ultimately chose A.</think><answer>A</answer>
<think>I observed <A> the colour changed, <B> the shape is deformed, <C> the label is wrong, \
<D> the quantity changed, so I ultimately chose N.</think><answer>N</answer>
<think>I observed <A> the shadow points toward the light, <B> the placement is reasonable, \
<C> the layout is natural, <D> the extension is unreasonable, so I ultimately chose B.</think>\
<answer>B</answer>
<think>I observed <A> good, <B> good, <C> the lighting is correct, <D> the product is intact, \
so I ultimately chose C.</think><answer>C</answer><think></think><answer>D</answer>
A B C D N AB AC AD BC BD CD ABC ABD ACD BCD ABCD
appearance deformation, physical shadow, placement layout, extension rationality, colour, color, \
shape, label, mark, quantity, count, missing, extra object, floating, wall, floor, sun, light, \
cast shadow, background, white, red, green, blue, yellow, black, circle, square, triangle, star, \
acceptable, unacceptable, correct, incorrect, yes, no, none, the, a, an, and, or, is, are, with.
0 1 2 3 4 5 6 7 8 9 10 100
user\nassistant\nsystem\nuser\nassistant\nsystem\n
"""


# Not sizes: every InternVL3 checkpoint's pixel shuffle merges 2x2 patches into one image token,
# and the longest context is only a config entry under RoPE (the real ones say 32768; 4096 is
# more than any sequence of this project).
DOWNSAMPLE_RATIO = 0.5
MAX_POSITION_EMBEDDINGS = 4096


@dataclass(frozen=True)
class TinySizes:
    """The tiny model's dimensions; defaults give 4 image tokens per 56 px tile."""

    vision_hidden_size: int = 32
    vision_num_hidden_layers: int = 2
    vision_num_attention_heads: int = 2
    vision_intermediate_size: int = 64
    image_size: int = 56
    patch_size: int = 14
    text_hidden_size: int = 64
    text_num_hidden_layers: int = 2
    text_num_attention_heads: int = 4
    text_num_key_value_heads: int = 2
    text_intermediate_size: int = 128

    def part(self, prefix: str) -> dict[str, int]:
        """The fields named `<prefix><key>`, as {key: value}: one sub-config's arguments."""
        return {
            f.name[len(prefix) :]: getattr(self, f.name)
            for f in fields(self)
            if f.name.startswith(prefix)
        }

    @property
    def image_seq_length(self) -> int:
        """Tokens per tile: (image_size / patch_size)^2 patches, pixel-shuffled by the ratio."""
        patches = (self.image_size // self.patch_size) ** 2
        return int(patches * DOWNSAMPLE_RATIO**2)


# Bump when what is saved changes; with the tokenizer's hash in the marker, a cached tiny model
# built by another version of this file is then refused instead of silently reused. 2: the
# marker no longer lists max_position_embeddings and downsample_ratio (constants since).
TINY_FORMAT = 2
MARKER = "hcm_tiny.json"
_INIT_LOCK = threading.Lock()


def build_tiny_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE with InternVL3's special tokens and chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    # The image markers are named tokens (InternVLProcessor reads them by name) and, with the
    # chat markers, extra special tokens: `skip_special_tokens` drops them, as in the real one.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_specific_special_tokens={
            "start_image_token": START_IMAGE_TOKEN,
            "end_image_token": END_IMAGE_TOKEN,
            "context_image_token": CONTEXT_IMAGE_TOKEN,
            "video_token": VIDEO_TOKEN,
        },
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(
    tokenizer: PreTrainedTokenizerFast | None = None, sizes: TinySizes | None = None
) -> InternVLConfig:
    """InternVL3's architecture at tiny sizes, with the real checkpoints' non-default settings."""
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    sizes = sizes if sizes is not None else TinySizes()
    vision = InternVLVisionConfig(
        **sizes.part("vision_"),
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        attention_bias=True,  # the real InternViT has qkv biases; the class default is False
        use_qk_norm=False,
        layer_scale_init_value=0.1,
        layer_norm_eps=1e-6,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        **sizes.part("text_"),
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=sizes.image_seq_length,
        downsample_ratio=DOWNSAMPLE_RATIO,
        tie_word_embeddings=False,  # untied like the real checkpoints; the class default ties them
    )


def tiny_image_processor(image_size: int = 56, max_patches: int = 12) -> GotOcr2ImageProcessorPil:
    """The GotOcr2 processor of the real checkpoints (ImageNet mean/std, bicubic) at tile size."""
    return GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        max_patches=max_patches,
    )


def build_tiny_model(
    sizes: TinySizes | None = None, seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None
) -> InternVLForConditionalGeneration:
    """A randomly initialised tiny InternVL3, the same for the same sizes and seed."""
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    config = tiny_config(tokenizer, sizes)
    # The global RNG seeds the init: hold it alone (builder threads), then restore the caller's.
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model.eval()


def ensure_tiny_model(
    path: str | os.PathLike, seed: int = 0, max_patches: int = 12, **sizes
) -> Path:
    """Build and save the tiny model at `path` unless a finished one is there; returns `path`.

    `sizes` are `TinySizes` fields. The model, tokenizer and image processor are written to a
    temporary folder beside `path` and renamed into place, so a reader sees no half-written model
    and concurrent builders (test workers, DDP ranks) cannot corrupt it: the first rename wins and
    the others discard theirs. A folder built with other sizes, seed or format is refused.
    """
    path = Path(path)
    tiny_sizes = TinySizes(**sizes)
    tokenizer = build_tiny_tokenizer()
    vocab = tokenizer.backend_tokenizer.to_str().encode()
    spec = {"format": TINY_FORMAT, "tokenizer_sha256": hashlib.sha256(vocab).hexdigest()}
    spec |= {"seed": seed, "max_patches": max_patches, **asdict(tiny_sizes)}
    if _finished(path, spec):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        model = build_tiny_model(tiny_sizes, seed, tokenizer)
        # Under DDP transformers saves only on rank 0 unless told this process is the writer:
        # every builder writes its own private folder, so each one is.
        model.save_pretrained(tmp, is_main_process=True)
        tokenizer.save_pretrained(tmp)
        image_processor = tiny_image_processor(tiny_sizes.image_size, max_patches)
        image_processor.save_pretrained(tmp)
        if not (tmp / "config.json").is_file() or not list(tmp.glob("*.safetensors")):
            raise RuntimeError(f"saving the tiny model into {tmp} wrote no config or weights")
        (tmp / MARKER).write_text(json.dumps(spec, indent=2) + "\n")  # last: marks it finished
        try:
            os.rename(tmp, path)
            log.info("built tiny InternVL3 at %s", path)
        except OSError:
            if not path.is_dir():  # not a lost race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _finished(path, spec):
        raise RuntimeError(f"tiny model at {path} did not appear after building it")
    return path


def _finished(path: Path, spec: dict) -> bool:
    """Whether `path` holds a finished tiny model of this spec; raises if it holds another."""
    marker = path / MARKER
    if not marker.is_file():
        if path.exists() and any(path.iterdir()):
            raise FileExistsError(
                f"{path} exists but holds no finished tiny model ({MARKER} missing): "
                "delete it or point the model's name_or_path elsewhere"
            )
        return False
    found = json.loads(marker.read_text())
    if found != spec:
        raise FileExistsError(
            f"tiny model at {path} was built with {found}, but {spec} was asked for: "
            "delete the folder or use another path"
        )
    return True
