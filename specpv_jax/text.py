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


class TextStream:
    """A `generate(stream=...)` callback that prints row 0's tokens as text as they arrive.

    Decodes everything received so far and prints the new suffix, holding back a
    trailing incomplete UTF-8 character until its other bytes arrive; `flush()`
    prints what is held back once generation ends.
    """

    def __init__(self, tokenizer: Any, file=None):
        self.tokenizer, self.file = tokenizer, file
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, rows) -> None:
        self.ids.extend(int(i) for i in rows[0])
        self._print(decode(self.tokenizer, self.ids).rstrip("\ufffd"))

    def flush(self) -> None:
        """Prints the rest, an incomplete last character included (as U+FFFD)."""
        self._print(decode(self.tokenizer, self.ids))

    def _print(self, text: str) -> None:
        import sys

        print(text[self.printed:], end="", flush=True, file=self.file or sys.stdout)
        self.printed = max(self.printed, len(text))
