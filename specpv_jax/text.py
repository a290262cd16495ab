"""Text in, token ids out (and back), through the model's own tokenizer."""

from __future__ import annotations

from typing import Any


def encode_prompt(tokenizer: Any, text: str, chat: bool = True) -> list[int]:
    """Token ids for `text`, wrapped in the tokenizer's chat template when it has one and `chat` is set."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer files; pass token ids instead of text")
    if chat and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)
