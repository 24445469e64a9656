"""HF chat messages from a prompt text whose `<image>` placeholders take images in order.

The model layer's message format; how a screening sample becomes such a text and images (the
candidates gridded or separate) is `hcm.data.messages`.
"""

from __future__ import annotations

from hcm.prompts import split_on_images


def chat_messages(
    text: str, images: list, target: str | None = None, system: str | None = None
) -> list[dict]:
    """HF chat messages from a text whose `<image>` placeholders take `images` in order:
    [system], user (text and images interleaved), [assistant target].

    The chat template writes a newline after each image, which stands for the separator (a
    newline or a space) that opens the text after it, so that separator is dropped here.
    """
    parts = split_on_images(text)
    if parts.count(None) != len(images):
        raise ValueError(
            f"prompt has {parts.count(None)} image placeholders for {len(images)} images"
        )
    content: list[dict] = []
    queue = iter(images)
    for part in parts:
        if part is None:
            content.append({"type": "image", "image": next(queue)})
            continue
        if content and content[-1]["type"] == "image" and part[0] in " \n":
            part = part[1:]
        if part:
            content.append({"type": "text", "text": part})
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": content})
    if target is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": target}]})
    return messages
