"""Validating user prompts and packing them into static, bucketed shapes.

Internally every batch is right-padded (row b's tokens sit at `[0, length_b)`),
so a token's position equals its index and each row keeps its own cache length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from specpv_jax.config import ModelConfig


class PromptError(ValueError):
    """A prompt that cannot be generated from as given."""


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """ids: `[B, T]` int32, right-padded with 0 to a bucket length; lengths: `[B]` int32."""

    ids: np.ndarray
    lengths: np.ndarray

    @property
    def batch(self) -> int:
        return self.ids.shape[0]


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucket_length(n: int, chunk: int) -> int:
    """Padded prompt length: the next power of two up to `chunk`, then multiples of `chunk`.

    A few buckets keep new prompt lengths from recompiling the generate loop.
    """
    if n <= chunk:
        return min(max(16, 1 << (n - 1).bit_length()), chunk)
    return round_up(n, chunk)


def _numpy(x: Any) -> np.ndarray:
    """`x` as a numpy array; a JAX array is fetched explicitly, as a caller's `jax.transfer_guard` requires."""
    try:
        return np.asarray(jax.device_get(x) if isinstance(x, jax.Array) else x)
    except ValueError as e:  # [1, [2, 3]]: numpy's "inhomogeneous shape"
        raise PromptError(f"input_ids must be token ids [T], rows of them, or [B, T]: {e}") from None


def _rows(input_ids: Any, attention_mask: Any) -> list[np.ndarray]:
    if isinstance(input_ids, (list, tuple)) and input_ids and np.ndim(input_ids[0]) >= 1:  # rows (lists, arrays)
        rows = [_numpy(r) for r in input_ids]
        for r in rows:
            _check_dtype(r)
            if r.ndim != 1:
                raise PromptError(f"each prompt must be a 1-D list of token ids, got shape {r.shape}")
        if attention_mask is None:
            return rows
        if len({r.size for r in rows}) > 1:
            raise PromptError(f"attention_mask needs padded rows of one length, got rows of {[r.size for r in rows]} "
                              "tokens (give ragged rows without a mask)")
        input_ids = np.stack(rows)  # a tokenizer's padded lists (padding=True without return_tensors)
    ids = _numpy(input_ids)
    _check_dtype(ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise PromptError(f"input_ids must have shape [T] or [B, T], got {ids.shape}")
    if attention_mask is None:
        return list(ids)
    mask = _numpy(attention_mask)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise PromptError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
    if not (mask.dtype == bool or np.issubdtype(mask.dtype, np.number)) or not np.isin(mask, (0, 1)).all():
        raise PromptError("attention_mask must hold only 0 and 1 (or False and True)")
    rows = []
    for b, (r, m) in enumerate(zip(ids, mask.astype(bool))):
        idx = np.flatnonzero(m)
        if idx.size and idx[-1] - idx[0] + 1 != idx.size:
            raise PromptError(f"attention_mask row {b} is not one contiguous run of ones "
                              "(only left or right padding is supported)")
        rows.append(r[idx])
    return rows


def _check_dtype(a: np.ndarray) -> None:
    if a.dtype.kind in "US":
        raise PromptError("input_ids is text: encode it into token ids first, e.g. "
                          "target.tokenizer(text)['input_ids']")
    if a.dtype == object and all(isinstance(i, int) for i in a.flat):  # Python ints past int64
        raise PromptError(f"input_ids holds ids too large for any vocabulary (e.g. {max(a.flat, key=abs)})")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise PromptError(f"input_ids must be integer token ids, got dtype {a.dtype}")


def prepare(input_ids: Any, cfg: ModelConfig, max_new_tokens: int, chunk: int,
            attention_mask: Any = None) -> PromptBatch:
    """Validates prompts and packs them right-padded into a bucketed `[B, T]` array.

    Accepts a list of ids, a ragged list of lists, or an integer array `[T]` /
    `[B, T]` (or equal-length lists) with an optional 0/1 `attention_mask` (left or right padding).
    """
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise PromptError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if isinstance(input_ids, Mapping):  # a tokenizer's whole output (a BatchEncoding) read as its keys: "is text"
        raise PromptError("input_ids is a mapping (a tokenizer's output?): pass its ['input_ids'], and its "
                          "['attention_mask'] as attention_mask= for padded rows")
    rows = _rows(input_ids, attention_mask)
    if not rows:
        raise PromptError("input_ids is empty: give at least one prompt")
    for b, r in enumerate(rows):
        if r.size == 0:
            raise PromptError(f"prompt {b} is empty: give at least one token (e.g. the BOS token)")
        bad = r[(r < 0) | (r >= cfg.vocab_size)]
        if bad.size:
            raise PromptError(f"prompt {b} has token id {int(bad[0])} outside the vocabulary [0, {cfg.vocab_size})")
        if r.size + max_new_tokens > cfg.max_position_embeddings:
            new = f"; with max_new_tokens={max_new_tokens} that is {r.size + max_new_tokens} positions" \
                if max_new_tokens else ""
            raise PromptError(f"prompt {b} has {r.size} tokens{new}, over the model's max_position_embeddings="
                              f"{cfg.max_position_embeddings}")
    lengths = np.array([r.size for r in rows], np.int32)
    ids = np.zeros((len(rows), bucket_length(int(lengths.max()), chunk)), np.int32)
    for b, r in enumerate(rows):
        ids[b, : r.size] = r
    return PromptBatch(ids=ids, lengths=lengths)
