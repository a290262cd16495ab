"""KV-cache pytrees. Shapes are static; validity is tracked by per-row lengths."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from specpv_jax.attention import PREFIX_BLOCK
from specpv_jax.config import ModelConfig


@flax.struct.dataclass
class FullCache:
    """The target's KV cache over the whole context.

    k, v: `[L, B, Hkv, S, D]`; length: `[B]` int32, positions `[0, length)` are valid.
    Entries at and beyond `length` are scratch: written by verification, kept
    only when committed by advancing `length`.
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array

    @classmethod
    def empty(cls, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype) -> "FullCache":
        """An empty cache holding at least `max_len` positions (rounded up to whole attention blocks)."""
        max_len = -(-max_len // PREFIX_BLOCK) * PREFIX_BLOCK
        shape = (layers, batch, kv_heads, max_len, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), length=jnp.zeros((batch,), jnp.int32))

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "FullCache":
        """The target's empty cache."""
        return cls.empty(cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim, dtype)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def write_tokens(buf: jax.Array, layer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Writes `new [B, Hkv, T, D]` into `buf [L, B, Hkv, S, D]` at `layer`, rows at `start [B] + t`.

    Writes past the end of the buffer are dropped, never clamped onto valid entries.
    """
    b, h, t, _ = new.shape
    rows = jnp.arange(b)[:, None, None]
    heads = jnp.arange(h)[None, :, None]
    pos = (start[:, None] + jnp.arange(t)[None, :])[:, None, :]
    return buf.at[layer, rows, heads, pos].set(new.astype(buf.dtype), mode="drop")


def commit_path(cache: FullCache, path: jax.Array, count: jax.Array) -> FullCache:
    """Keeps an accepted tree path and advances the lengths.

    The tree's K/V sit at `length + node`; the nodes `path [B, P]` (root first,
    valid for `count [B] + 1` entries) move to `length + [0, count]`, in place.
    """
    p = path.shape[1]
    slot = jnp.arange(p)[None, :]
    src = cache.length[:, None] + path
    dst = jnp.where(slot <= count[:, None], cache.length[:, None] + slot, cache.max_len)  # past the end: dropped

    rows = jnp.arange(path.shape[0])[:, None]

    def move(buf):  # advanced indices on the batch and position axes: [B, P, L, Hkv, D] moved at once
        return buf.at[:, rows, :, dst].set(buf[:, rows, :, src], mode="drop")

    return cache.replace(k=move(cache.k), v=move(cache.v), length=cache.length + count + 1)
