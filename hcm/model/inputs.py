"""InternVL3 model inputs from chat messages, built from the tokenizer and the image processor.

Equal token for token and pixel for pixel to `InternVLProcessor.apply_chat_template(...,
tokenize=True, return_dict=True)` (see tests/test_inputs.py), which transformers 5.23 cannot
build without torchvision (its video processor needs it). Each image becomes dynamic tiles (the
image processor's `crop_to_patches`, up to `max_patches` plus a thumbnail) and its placeholder
`<img>` + `<IMG_CONTEXT>` × image_seq_length × tiles + `</img>`.

Labels (SFT, paper eq. 1) keep the assistant replies and their closing `<|im_end|>` (the model must
learn to stop); prompt, image and padding tokens are -100.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

IGNORE_INDEX = -100
Message = Mapping[str, Any]
Conversation = Sequence[Message]


class InputBuilder:
    """Turns a batch of conversations into `input_ids`, `attention_mask`, `pixel_values`, `labels`.

    A conversation is a list of HF-style messages:
    `{"role": "user", "content": [{"type": "image", "image": PIL.Image}, {"type": "text",
    "text": "..."}]}`, `{"role": "assistant", "content": [{"type": "text", "text": "..."}]}`.
    """

    def __init__(
        self,
        tokenizer,
        image_processor,
        max_patches: int = 6,
        image_seq_length: int = 256,
        min_patches: int = 1,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_patches = max_patches
        self.min_patches = min_patches
        self.image_seq_length = image_seq_length
        self.image_token = tokenizer.context_image_token
        self.start_image_token = tokenizer.start_image_token
        self.end_image_token = tokenizer.end_image_token
        self.image_token_id = tokenizer.context_image_token_id

    def render(self, conversation: Conversation, add_generation_prompt: bool) -> str:
        """The chat-template text, one `<IMG_CONTEXT>` per image (not yet expanded)."""
        return self.tokenizer.apply_chat_template(
            list(conversation), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def assistant_spans(self, conversation: Conversation) -> list[tuple[int, int]]:
        """Character spans, in the rendered text, of each assistant reply and its end marker.

        A reply starts where the prompt rendered with the generation prompt ends, and ends where
        the conversation rendered up to it ends, minus the template's trailing newline after
        `<|im_end|>` (a newline the model never has to produce: generation stops at eos).
        """
        spans = []
        full = self.render(conversation, add_generation_prompt=False)
        for i, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            start = len(self.render(conversation[:i], add_generation_prompt=True))
            upto = self.render(conversation[: i + 1], add_generation_prompt=False)
            if not full.startswith(upto):
                raise ValueError("the chat template does not render conversations prefix-stably")
            eos = self.tokenizer.eos_token
            end = upto.rindex(eos) + len(eos)
            spans.append((start, end))
        return spans

    def encode(
        self,
        conversations: Sequence[Conversation],
        *,
        add_generation_prompt: bool = False,
        padding_side: str = "right",
        with_labels: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Tokenize, tile and pad a batch (right padding to train, left padding to generate).

        Returns input_ids and attention_mask (B, T), pixel_values (total_tiles, 3, H, W) in
        placeholder order (absent when there is no image), labels (B, T) if `with_labels`.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        images = [_as_image(item) for conv in conversations for item in _image_items(conv)]
        tiles: list[int] = []
        pixel_values = None
        if images:
            processed = self.image_processor(
                images,
                crop_to_patches=True,
                min_patches=self.min_patches,
                max_patches=self.max_patches,
                return_tensors="pt",
            )
            pixel_values = processed["pixel_values"]  # (total_tiles, 3, H, W)
            tiles = [int(n) for n in processed["num_patches"]]

        rows: list[tuple[list[int], list[int]]] = []
        first_image = 0
        for conv in conversations:
            text = self.render(conv, add_generation_prompt)
            n_images = len(_image_items(conv))
            if text.count(self.image_token) != n_images:
                raise ValueError(
                    f"{text.count(self.image_token)} {self.image_token} in the rendered text but "
                    f"{n_images} images: image tokens may not appear in message text"
                )
            spans = self.assistant_spans(conv) if with_labels else []
            text, spans = self._expand(text, tiles[first_image : first_image + n_images], spans)
            first_image += n_images
            rows.append(self._tokenize(text, spans))
        return self._pad(rows, padding_side, with_labels, pixel_values)

    def _expand(
        self, text: str, tiles: Sequence[int], spans: list[tuple[int, int]]
    ) -> tuple[str, list[tuple[int, int]]]:
        """Expand each image token to its tiles' placeholder; shift the spans to match."""
        pieces = text.split(self.image_token)
        out, starts, growth = [pieces[0]], [], [0]  # growth[k]: chars added by the first k images
        pos = len(pieces[0])
        for n_tiles, piece in zip(tiles, pieces[1:], strict=True):
            placeholder = (
                self.start_image_token
                + self.image_token * (self.image_seq_length * n_tiles)
                + self.end_image_token
            )
            starts.append(pos)
            pos += len(self.image_token) + len(piece)
            growth.append(growth[-1] + len(placeholder) - len(self.image_token))
            out += [placeholder, piece]

        def shift(char: int) -> int:
            return char + growth[bisect.bisect_right(starts, char - 1)]

        return "".join(out), [(shift(a), shift(b)) for a, b in spans]

    def _tokenize(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        enc = self.tokenizer(text, return_offsets_mapping=bool(spans))
        ids = list(enc["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        for a, b in spans:
            for i, (start, end) in enumerate(enc["offset_mapping"]):
                if start < b and end > a:
                    labels[i] = ids[i]
        return ids, labels

    def _pad(
        self,
        rows: list[tuple[list[int], list[int]]],
        padding_side: str,
        with_labels: bool,
        pixel_values: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        T = max(len(ids) for ids, _ in rows)
        B = len(rows)
        input_ids = torch.full((B, T), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for b, (ids, lab) in enumerate(rows):
            cols = slice(T - len(ids), T) if padding_side == "left" else slice(0, len(ids))
            input_ids[b, cols] = torch.tensor(ids)
            attention_mask[b, cols] = 1
            labels[b, cols] = torch.tensor(lab)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}  # (B, T) each
        if pixel_values is not None:
            batch["pixel_values"] = pixel_values
        if with_labels:
            batch["labels"] = labels
        return batch


def tiles_per_row(input_ids: torch.Tensor, image_token_id: int, image_seq_length: int) -> list[int]:
    """Image tiles of each row, read off its `<IMG_CONTEXT>` count: pixel_values is flattened
    over the batch, and this is how its tiles split by row."""
    return ((input_ids == image_token_id).sum(dim=1) // image_seq_length).tolist()  # (B,)


def repeat_batch(
    batch: Mapping[str, torch.Tensor], group_size: int, image_token_id: int, image_seq_length: int
) -> dict[str, torch.Tensor]:
    """Each sample `group_size` (G) times in a row ([p0]*G + [p1]*G ...), its image tiles with it:
    what `generate(group_size=G)` samples from. A row's tile count is its number of `<IMG_CONTEXT>`
    tokens / image_seq_length.
    """
    out = {
        k: v.repeat_interleave(group_size, dim=0) for k, v in batch.items() if k != "pixel_values"
    }
    if "pixel_values" in batch:
        tiles = tiles_per_row(batch["input_ids"], image_token_id, image_seq_length)
        per_row = torch.split(batch["pixel_values"], tiles)
        out["pixel_values"] = torch.cat([t for t in per_row for _ in range(group_size)])
    return out


def _image_items(conversation: Conversation) -> list[Mapping[str, Any]]:
    return [
        item
        for message in conversation
        if not isinstance(message["content"], str)
        for item in message["content"]
        if item["type"] == "image"
    ]


def _as_image(item: Mapping[str, Any]) -> Image.Image:
    image = item.get("image", item.get("path"))
    if isinstance(image, (str, Path)):
        with Image.open(image) as f:
            return f.convert("RGB")
    if not isinstance(image, Image.Image):
        raise TypeError(f"an image item needs 'image' (a PIL image or a path), got {item!r}")
    return image
