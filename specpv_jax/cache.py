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
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "FullCache":
        """An empty cache holding at least `max_len` positions (rounded up to whole attention blocks)."""
        max_len = -(-max_len // PREFIX_BLOCK) * PREFIX_BLOCK
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   length=jnp.zeros((batch,), jnp.int32))

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
