"""Text in, token ids out (and back), through the model's own tokenizer."""

from __future__ import annotations

from typing import Any


TEMPLATE_CALL_ARGUMENTS = ("conversation", "tokenize", "add_generation_prompt")  # what encode_prompt passes


def encode_prompt(tokenizer: Any, text: str, chat: bool = True, template_options: dict | None = None) -> list[int]:
    """Token ids for `text`, wrapped in the tokenizer's chat template when it has one and `chat` is set.

    `template_options`: variables the template reads (Qwen3's `enable_thinking=False`). Without the template,
    text that starts with the BOS token (a prompt rendered elsewhere) gets no second one from a tokenizer that
    adds BOS itself."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer files; pass token ids instead of text")
    if chat and getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                     add_generation_prompt=True, **(template_options or {}))
        except TemplateError as e:
            raise ValueError(f"the chat template of the tokenizer in {tokenizer.name_or_path} failed: "
                             f"{type(e).__name__}: {e} (encode without it: chat=False, --no-chat)") from e
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    if chat and template_options:
        from specpv_jax.warning import warn

        warn(f"template options {', '.join(template_options)} have no effect: the tokenizer in "
             f"{tokenizer.name_or_path} has no chat template, so the text is encoded as it is")
    ids = list(tokenizer(text)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and ids[:2] == [bos, bos] and text.startswith(tokenizer.bos_token):
        del ids[0]
    return ids


def decode(tokenizer: Any, ids: list[int]) -> str:
    # No clean-up of spaces: it rewrites text already streamed (" ," -> ","), and code or byte-level text
    # is not English prose.
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class TextStream:
    """A `generate(stream=...)` callback that prints row 0's tokens as text as they arrive.

    Decodes a window of the latest tokens and prints its new suffix, holding back
    a trailing incomplete UTF-8 character until its other bytes arrive; `flush()`
    prints what is held back once generation ends. The window keeps `CONTEXT`
    tokens before the unprinted ones (a token's text can depend on those before
    it, e.g. a SentencePiece word's leading space), so each call decodes a few
    tokens, not all those so far. Printed text is not taken back: a run of byte
    tokens that is not valid UTF-8 (random ids) prints its start as it came, where
    a byte-fallback decoder (Llama-2's) turns the whole run into U+FFFD at the end.
    """

    CONTEXT = 8

    def __init__(self, tokenizer: Any, file=None):
        self.tokenizer, self.file = tokenizer, file
        self.ids: list[int] = []
        self.start = 0  # the window: ids[start:]
        self.printed = 0  # characters of the window's text already printed

    def __call__(self, rows) -> None:
        self.ids.extend(int(i) for i in rows[0])
        text = decode(self.tokenizer, self.ids[self.start:])
        self._print(text.rstrip("\ufffd"))
        if self.printed == len(text) and len(self.ids) - self.start >= 2 * self.CONTEXT:
            # All printed: slide the window, to a token that starts a character. Cut mid-character, a byte-fallback
            # decoder (SentencePiece's) turns the whole run of byte tokens after the cut into U+FFFD.
            for start in range(len(self.ids) - self.CONTEXT, self.start, -1):
                rest = decode(self.tokenizer, self.ids[start:])
                if not rest.startswith("\ufffd"):
                    self.start, self.printed = start, len(rest)
                    break

    def flush(self) -> None:
        """Prints the rest, an incomplete last character included (as U+FFFD)."""
        self._print(decode(self.tokenizer, self.ids[self.start:]))

    def _print(self, text: str) -> None:
        import sys

        print(text[self.printed:], end="", flush=True, file=self.file or sys.stdout)
        self.printed = max(self.printed, len(text))
