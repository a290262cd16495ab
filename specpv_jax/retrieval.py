"""SpecPV retrieval: score key blocks against a step's queries and rebuild the partial cache.

The partial cache of each (layer, row) is `sink` tokens + the `retrieval`
tokens of the best-scoring blocks (in position order) + the last `window`
tokens + a buffer for tokens accepted in partial verification. A block's score
per KV head is `max(q . kmax, q . kmin)` averaged over the step's query
positions and the group's query heads (the SpecPV reference's quest selector).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from specpv_jax.cache import KVCache
from specpv_jax.config import SpecConfig


def block_scores(q: jax.Array, kmax: jax.Array, kmin: jax.Array, query_mask: jax.Array) -> jax.Array:
    """Block scores `[B, Hkv, NB]` (float32) of queries `q [B, T, Hq, D]` where `query_mask [B, T]`.

    kmax, kmin: `[B, Hkv, NB, D]`, one layer's block summaries.
    """
    b, t, hq, d = q.shape
    hkv = kmax.shape[1]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    s = jnp.maximum(jnp.einsum("bthgd,bhnd->bthgn", qg, kmax, preferred_element_type=jnp.float32),
                    jnp.einsum("bthgd,bhnd->bthgn", qg, kmin, preferred_element_type=jnp.float32))
    weight = query_mask / jnp.maximum(query_mask.sum(1, keepdims=True), 1) / (hq // hkv)
    return jnp.einsum("bthgn,bt->bhn", s, weight.astype(jnp.float32))


def candidate_blocks(length: jax.Array, n_blocks: int, spec: SpecConfig) -> jax.Array:
    """`[B, NB]` bool: complete blocks after the sink and before the recent window of `length [B]` tokens."""
    j = jnp.arange(n_blocks)[None, :]
    return (j >= spec.sink_tokens // spec.block_size) & (
        j < ((length - spec.window_tokens) // spec.block_size)[:, None])


def select_blocks(scores: jax.Array, length: jax.Array, spec: SpecConfig) -> jax.Array:
    """The `retrieval_tokens / block_size` best candidate blocks per (layer, row, KV head), in position order.

    scores: `[L, B, Hkv, NB]`; returns block ids `[L, B, Hkv, R_blocks]`. Rows whose
    context is below `spec.partial_threshold` get some non-candidate blocks (they
    never verify partially).
    """
    ok = candidate_blocks(length, scores.shape[-1], spec)[None, :, None, :]
    _, ids = lax.top_k(jnp.where(ok, scores, -jnp.inf), spec.retrieval_tokens // spec.block_size)
    return jnp.sort(ids, axis=-1)


def refresh(partial: KVCache, full: KVCache, blocks: jax.Array, spec: SpecConfig) -> KVCache:
    """Rebuilds the partial cache from the full one: sink + retrieved blocks + recent window, empty buffer.

    blocks: `[L, B, Hkv, R_blocks]` from `select_blocks`; the window ends at `full.length`.
    """
    slots = static_slots(full.length, blocks, spec)[..., None]  # [L, B, Hkv, static, 1]
    k, v = (jnp.take_along_axis(buf, slots, axis=3) for buf in (full.k, full.v))
    return with_static(partial, k, v, spec)


def static_slots(length: jax.Array, blocks: jax.Array, spec: SpecConfig) -> jax.Array:
    """Full-cache slots `[L, B, Hkv, static]` of the partial cache's static part: sink, the retrieved
    `blocks [L, B, Hkv, R_blocks]`, and the window ending at `length [B]`."""
    offsets = jnp.arange(spec.block_size)
    retrieved = (blocks[..., None] * spec.block_size + offsets).reshape(*blocks.shape[:3], -1)  # [L, B, Hkv, R]
    window = jnp.maximum(length[:, None] - spec.window_tokens + jnp.arange(spec.window_tokens)[None, :], 0)
    window = jnp.broadcast_to(window[None, :, None, :], retrieved.shape[:3] + (spec.window_tokens,))
    sink = jnp.broadcast_to(jnp.arange(spec.sink_tokens), retrieved.shape[:3] + (spec.sink_tokens,))
    return jnp.concatenate([sink, retrieved, window], axis=-1)


def with_static(partial: KVCache, k: jax.Array, v: jax.Array, spec: SpecConfig) -> KVCache:
    """The partial cache with static part `k, v [L, B, Hkv, static, D]` and an empty buffer."""
    def rebuild(part, new):
        return lax.dynamic_update_slice_in_dim(part, new, 0, axis=3)

    static = jnp.full_like(partial.length, spec.static_tokens)
    return partial.replace(k=rebuild(partial.k, k), v=rebuild(partial.v, v), length=static)


def empty_partial(full: KVCache, spec: SpecConfig, extra: int = 0) -> KVCache:
    """A partial cache shaped for `full` (static part + buffer + `extra` slots), not yet filled."""
    layers, batch, heads, _, dim = full.k.shape
    return KVCache.empty(layers, batch, heads, spec.static_tokens + spec.buffer_size + extra, dim, full.k.dtype)
