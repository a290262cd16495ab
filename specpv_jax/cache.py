"""KV-cache pytrees. Shapes are static; validity is tracked by per-row lengths.

One layout, `KVCache` (`k, v [L, B, Hkv, S, D]`, `length [B]`), serves every cache:
the target's full cache over the whole context, SpecPV's partial cache (S =
sink + retrieval + window + buffer slots), the EAGLE-3 head's cache (L = 1), a
small draft model's caches (SpecExtend) and LongSpec's ring of recent K/V.
`BlockSummary` keeps per-block key extrema of the full cache for retrieval.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from specpv_jax.attention import PREFIX_BLOCK
from specpv_jax.config import ModelConfig
from specpv_jax.sharding import zeros


@flax.struct.dataclass
class KVCache:
    """A stacked KV cache.

    k, v: `[L, B, Hkv, S, D]`; length: `[B]` int32, slots `[0, length)` are valid.
    Entries at and beyond `length` are scratch: written by verification, kept
    only when committed by advancing `length`.
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array

    @classmethod
    def empty(cls, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype) -> "KVCache":
        """An empty cache holding at least `max_len` positions (`allocated_slots`)."""
        shape = (layers, batch, kv_heads, allocated_slots(max_len), head_dim)
        # made on the device, also outside jit (eager `jnp.zeros` moves a host scalar over: see `sharding.zeros`)
        return cls(k=zeros(shape, dtype), v=zeros(shape, dtype), length=zeros((batch,), jnp.int32))

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        """An empty cache for the decoder `cfg` (the target's; a small draft model's)."""
        return cls.empty(cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim, dtype)

    @property
    def max_len(self) -> int:
        """The slots allocated per row (`allocated_slots` of the length asked for)."""
        return self.k.shape[3]

    def keep_finished(self, live: jax.Array, old: "KVCache") -> "KVCache":
        """This cache with the rows not `live [B]` (finished) keeping `old`'s lengths: what a step wrote for
        them stays scratch."""
        return self.replace(length=jnp.where(live, self.length, old.length))


def allocated_slots(max_len: int) -> int:
    """The slots a cache of `max_len` positions gets: rounded up to whole attention blocks."""
    return -(-max_len // PREFIX_BLOCK) * PREFIX_BLOCK


def write_tokens(buf: jax.Array, layer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Writes `new [B, Hkv, T, D]` into `buf [L, B, Hkv, S, D]` at `layer`, rows at `start [B] + t`.

    Writes past the end of the buffer are dropped, never clamped onto valid entries.
    """
    b, h, t, _ = new.shape
    rows = jnp.arange(b)[:, None, None]
    heads = jnp.arange(h)[None, :, None]
    pos = (start[:, None] + jnp.arange(t)[None, :])[:, None, :]
    return buf.at[layer, rows, heads, pos].set(new.astype(buf.dtype), mode="drop")


def write_all_layers(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Writes `new [L, B, Hkv, T, D]` into `buf [L, B, Hkv, S, D]` at rows' `start [B] + t` (past the end: dropped)."""
    b, t = new.shape[1], new.shape[3]
    rows = jnp.arange(b)[:, None]
    pos = start[:, None] + jnp.arange(t)[None, :]
    return buf.at[:, rows, :, pos].set(new.transpose(1, 3, 0, 2, 4).astype(buf.dtype), mode="drop")


def commit_path(cache: KVCache, path: jax.Array, count: jax.Array, src: jax.Array | None = None,
                dst: jax.Array | None = None) -> KVCache:
    """Keeps an accepted tree path and advances the lengths to just past it.

    The tree's K/V sit at slot `src + node` (default `src = length`); the nodes
    `path [B, P]` (root first, valid for `count [B] + 1` entries; count < 0 keeps
    none) move to `dst + [0, count]` (default `dst = length`), in place, and the
    length becomes `dst + count + 1`.
    """
    p = path.shape[1]
    src = cache.length if src is None else src
    dst = cache.length if dst is None else dst
    slot = jnp.arange(p)[None, :]
    rows = jnp.arange(path.shape[0])[:, None]
    from_slot = src[:, None] + path
    to_slot = jnp.where(slot <= count[:, None], dst[:, None] + slot, cache.max_len)  # past the end: dropped

    def move(buf):  # advanced indices on the batch and slot axes: [B, P, L, Hkv, D] moved at once
        return buf.at[:, rows, :, to_slot].set(buf[:, rows, :, from_slot], mode="drop")

    return cache.replace(k=move(cache.k), v=move(cache.v), length=dst + count + 1)


@flax.struct.dataclass
class BlockSummary:
    """Elementwise key maximum and minimum of each `block`-token block of the full cache.

    kmax, kmin: `[L, B, Hkv, S // block, D]`. A block's entries are final once the
    full cache's length has passed its end; blocks without valid keys hold 0.
    """

    kmax: jax.Array
    kmin: jax.Array
    block: int = flax.struct.field(pytree_node=False)

    @classmethod
    def of(cls, cache: KVCache, block: int) -> "BlockSummary":
        """Summaries of every block of `cache` (keys at or past `length` ignored), a layer at a time: a backend
        may hold the masked keys as a temporary as large as the keys summarized at once."""
        start = jnp.zeros_like(cache.length)

        def layer(keys):  # [B, Hkv, S, D] -> kmax, kmin [B, Hkv, S // block, D]
            return tuple(x[0] for x in summarize_blocks(keys[None], start, cache.length, block))

        kmax, kmin = lax.map(layer, cache.k)
        return cls(kmax=kmax, kmin=kmin, block=block)

    def update(self, cache: KVCache, old_length: jax.Array, blocks: int) -> "BlockSummary":
        """Recomputes `blocks` blocks from the one holding `old_length [B]`, after the cache grew past it."""
        starts = self.window_starts(old_length, blocks, cache.max_len)
        kmax, kmin = self.recompute(cache.k, starts, cache.length, blocks)
        rows = jnp.arange(starts.shape[0])[:, None]
        dest = starts[:, None] // self.block + jnp.arange(blocks)[None, :]

        def put(summary, new):  # new [L, B, Hkv, blocks, D] -> indexed as [B, blocks, L, Hkv, D]
            return summary.at[:, rows, :, dest].set(new.transpose(1, 3, 0, 2, 4))

        return self.replace(kmax=put(self.kmax, kmax), kmin=put(self.kmin, kmin))

    def window_starts(self, old_length: jax.Array, blocks: int, max_len: int) -> jax.Array:
        """First slot `[B]` of the `blocks` blocks `update` recomputes (from the block holding `old_length`,
        moved back to end inside a `max_len`-slot cache)."""
        return jnp.minimum(old_length // self.block * self.block, max_len - blocks * self.block)

    def recompute(self, keys: jax.Array, starts: jax.Array, length: jax.Array, blocks: int):
        """kmax, kmin `[L, B, Hkv, blocks, D]` of the blocks from `starts [B]` of `keys [L, B, Hkv, S, D]`
        (any number of layers L), keys at or past `length [B]` ignored."""
        width = blocks * self.block

        def window(buf):  # per row: [L, Hkv, S, D] -> [L, Hkv, width, D]
            return jax.vmap(lambda b, s: lax.dynamic_slice_in_dim(b, s, width, axis=2), in_axes=(1, 0),
                            out_axes=1)(buf, starts)

        return summarize_blocks(window(keys), starts, length, self.block)


def blocks_spanned(tokens: int, block: int) -> int:
    """A bound on the `block`-token blocks a span of `tokens` consecutive slots touches (it may start
    mid-block): the summary blocks a step that wrote that many tokens recomputes."""
    return tokens // block + 2


def fold_keys(kmax: jax.Array, kmin: jax.Array, keys: jax.Array, start: jax.Array, count: jax.Array,
              block: int) -> tuple[jax.Array, jax.Array]:
    """One layer's block summaries `kmax, kmin [B, Hkv, NB, D]`, complete below position `start [B]`, with
    the first `count [B]` of `keys [B, Hkv, W, D]` (at positions `start + [0, W)`) folded in: what they
    would be with those keys in the cache. Only the blocks the W slots can reach change."""
    b, _, w, _ = keys.shape
    n = blocks_spanned(w, block)
    first = start // block
    rel = (start[:, None] + jnp.arange(w)[None, :]) // block - first[:, None]  # [B, W]: block within the span
    member = (rel[:, :, None] == jnp.arange(n)) & (jnp.arange(w)[None, :, None] < count[:, None, None])  # [B, W, n]
    big = jnp.asarray(jnp.finfo(keys.dtype).max, keys.dtype)
    inside, expanded = member[:, None, :, :, None], keys[:, :, :, None, :]  # [B, 1, W, n, 1], [B, Hkv, W, 1, D]
    new_max = jnp.where(inside, expanded, -big).max(axis=2).transpose(0, 2, 1, 3)  # [B, n, Hkv, D]
    new_min = jnp.where(inside, expanded, big).min(axis=2).transpose(0, 2, 1, 3)
    blocks = first[:, None] + jnp.arange(n)  # [B, n]
    gets_keys, had_keys = member.any(axis=1), blocks * block < start[:, None]  # [B, n]
    rows = jnp.arange(b)[:, None]

    def fold(summary, new, combine):
        old = summary[rows, :, jnp.minimum(blocks, summary.shape[2] - 1)]  # [B, n, Hkv, D]
        folded = jnp.where(had_keys[..., None, None], combine(old, new), new)  # an empty block's 0 is no key
        return summary.at[rows, :, blocks].set(jnp.where(gets_keys[..., None, None], folded, old), mode="drop")

    return fold(kmax, new_max, jnp.maximum), fold(kmin, new_min, jnp.minimum)


def summarize_blocks(keys: jax.Array, start: jax.Array, length: jax.Array, block: int):
    """Per-block key max and min of `keys [L, B, Hkv, N, D]` whose slot 0 is position `start [B]`.

    Positions at or past `length [B]` are ignored; a block with no valid key gets 0.
    Returns kmax, kmin `[L, B, Hkv, N // block, D]` in the keys' dtype.
    """
    n_layers, b, h, n, d = keys.shape
    valid = (start[:, None] + jnp.arange(n)[None, :]) < length[:, None]  # [B, N]
    valid = valid.reshape(1, b, 1, n // block, block, 1)
    kb = keys.reshape(n_layers, b, h, n // block, block, d)
    any_valid = valid.any(axis=4)
    big = jnp.asarray(jnp.finfo(keys.dtype).max, keys.dtype)
    kmax = jnp.where(any_valid, jnp.where(valid, kb, -big).max(axis=4), 0)
    kmin = jnp.where(any_valid, jnp.where(valid, kb, big).min(axis=4), 0)
    return kmax.astype(keys.dtype), kmin.astype(keys.dtype)
