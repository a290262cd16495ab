"""The target's full KV cache in host memory (`SpecConfig(offload=True)`, modes "specpv" and "exact").

Placement: the full cache's k, v `[L, B, Hkv, S, D]` and its block summaries
kmax, kmin `[L, B, Hkv, S / block, D]` live in host memory
(`memory_kind="pinned_host"`); lengths, the partial cache, the draft's caches,
the weights and every computation stay on the device. Inside jit a host array
is only sliced and then moved to the device (`to_device`), or updated in place
with `dynamic_update_slice` by data moved to host (`to_host`): the primitives
XLA's host offloading supports. Nothing is computed on host arrays.

Traffic (host <-> device) by step:

- partial verification: none; it reads only the partial cache.
- full verification: each layer is moved to the device whole and once, the
  next layer's copy overlapping the current layer's math (`model.forward`'s
  `keep`); attention runs on that copy, and `keeper` keeps of it what the
  refresh needs (the sink, the best retrieval candidates, a span at the end of
  each row). `commit_and_refresh` then rebuilds the partial cache and the
  summary blocks the step touched from those, and writes back only the span
  (with the committed tokens' K/V) and those summary blocks.
- prefill: a layer at a time (`model.forward_by_layer`), each layer's K/V
  written with `write_rows` once its last chunk has run, nothing read back;
  the decode loop then builds the summaries with one more pass (`summarize`).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from specpv_jax import retrieval
from specpv_jax.cache import BlockSummary, KVCache, summarize_blocks, write_all_layers
from specpv_jax.config import ModelConfig, SpecConfig

HOST = "pinned_host"


def to_device(x: jax.Array) -> jax.Array:
    """In jit: `x` moved to device memory (same sharding)."""
    return jax.device_put(x, jax.memory.Space.Device)


def to_host(x: jax.Array) -> jax.Array:
    """In jit: `x` moved to host memory (same sharding)."""
    return jax.device_put(x, jax.memory.Space.Host)


def host_zeros(shape: tuple[int, ...], dtype, where: Sharding) -> jax.Array:
    """Zeros allocated straight in host memory beside `where`'s devices (never on a device)."""
    return jax.device_put(np.zeros(shape, dtype), where.with_memory_kind(HOST))


def empty_cache(cfg: ModelConfig, batch: int, max_len: int, dtype, mesh=None) -> KVCache:
    """`KVCache.for_model` with k, v in host memory (lengths on the device); `mesh`: a one-device mesh to follow."""
    shapes = jax.eval_shape(lambda: KVCache.for_model(cfg, batch, max_len, dtype))
    device = SingleDeviceSharding(jax.devices()[0]) if mesh is None else NamedSharding(mesh, PartitionSpec())
    return KVCache(k=host_zeros(shapes.k.shape, dtype, device), v=host_zeros(shapes.v.shape, dtype, device),
                   length=jax.device_put(np.zeros((batch,), np.int32), device))


def empty_summary(cache: KVCache, block: int) -> BlockSummary:
    """Block summaries for a host cache, allocated in host memory: kmax, kmin `[L, B, Hkv, S // block, D]`."""
    shape = cache.k.shape[:3] + (cache.max_len // block, cache.k.shape[4])
    return BlockSummary(kmax=host_zeros(shape, cache.k.dtype, cache.k.sharding),
                        kmin=host_zeros(shape, cache.k.dtype, cache.k.sharding), block=block)


def layer_to_device(buf: jax.Array, layer: jax.Array) -> jax.Array:
    """In jit: `buf [L, ...]` (host) at `layer`, moved to the device: `[...]` (sliced on host, squeezed on
    the device)."""
    return to_device(lax.dynamic_slice_in_dim(buf, layer, 1, axis=0))[0]


def write_rows(buf: jax.Array, new: jax.Array, start: jax.Array | int, layer: jax.Array | int = 0) -> jax.Array:
    """Writes `new [L', B, Hkv, T, D]` (device) into `buf [L, B, Hkv, S, D]` (host) at layers
    `layer + [0, L')`, slots `start + [0, T)`; `start` a scalar (every row) or `[B]` (one update per row).

    `dynamic_update_slice` clamps a start that leaves too little room instead of
    dropping the overflow (as `write_tokens` does), so callers keep
    `start + T <= S`: prefill's layers (whole, at 0), summary blocks
    (`BlockSummary.window_starts`), `commit_and_refresh`'s tail spans.
    """
    if new.shape[3] > buf.shape[3] or new.shape[0] > buf.shape[0]:
        raise ValueError(f"cannot write {new.shape} into {buf.shape}")
    new = new.astype(buf.dtype)
    if jnp.ndim(start) == 0:
        return lax.dynamic_update_slice(buf, to_host(new), (layer, 0, 0, start, 0))
    for b in range(buf.shape[1]):  # static: one contiguous update per row
        buf = lax.dynamic_update_slice(buf, to_host(new[:, b:b + 1]), (layer, b, 0, start[b], 0))
    return buf


def summarize(cache: KVCache, summary: BlockSummary) -> BlockSummary:
    """`BlockSummary.of(cache)` for a host cache, written into the host `summary` layer by layer."""
    def body(carry, i):
        kmax_h, kmin_h, keys = carry
        ahead = layer_to_device(cache.k, jnp.minimum(i + 1, n_layers - 1))
        kmax, kmin = summarize_blocks(keys[None], jnp.zeros_like(cache.length), cache.length, summary.block)
        return (write_rows(kmax_h, kmax, 0, i), write_rows(kmin_h, kmin, 0, i), ahead), None

    n_layers = cache.k.shape[0]
    (kmax, kmin, _), _ = lax.scan(body, (summary.kmax, summary.kmin, layer_to_device(cache.k, 0)),
                                  jnp.arange(n_layers))
    return summary.replace(kmax=kmax, kmin=kmin)


def committed(new: jax.Array, path: jax.Array, n_missing: jax.Array, m: int) -> jax.Array:
    """The K/V a full step commits, `[L, B, Hkv, m + P, D]`: each row's `n_missing [B]` re-fed tokens, then
    the accepted tree path's nodes (slots past those: scratch).

    new: `[L, B, Hkv, m + N, D]`, the step's K/V for `m` missing slots then the N
    tree nodes; path: `[B, P]` node ids from the root (as `commit_path` takes them).
    """
    p = path.shape[1]
    slot = jnp.arange(m + p)[None, :]
    node = jnp.take_along_axis(path, jnp.clip(slot - n_missing[:, None], 0, p - 1), axis=1)
    src = jnp.where(slot < n_missing[:, None], slot, m + node)  # [B, m + P]
    return jnp.take_along_axis(new, src[None, :, None, :, None], axis=3)


def tail_span(full_len: jax.Array, spec: SpecConfig, summary_blocks: int, size: int) -> tuple[jax.Array, int]:
    """First slot `[B]` and width of the span at the end of each row that a full step's refresh reads and writes
    whole: from the first block the partial cache's window or a block its retrieval may newly take can reach
    (the block holding `full_len - window`), through the committed tokens and the `summary_blocks` summary
    blocks recomputed from the one holding `full_len`; moved back to end inside a `size`-slot cache."""
    width = tail_width(spec, summary_blocks, size)
    block = spec.block_size
    return jnp.clip((full_len - spec.window_tokens) // block * block, 0, size - width), width


def tail_width(spec: SpecConfig, summary_blocks: int, size: int) -> int:
    """Slots of `tail_span`: the window rounded up to whole blocks, one block more, and the summary blocks."""
    block = spec.block_size
    return min(size, -(-spec.window_tokens // block) * block + (summary_blocks + 1) * block)


@flax.struct.dataclass
class Kept:
    """What a full step keeps on the device from each layer of the host cache as it streams past (`keeper`).

    blocks: `[L, B, Hkv, R_blocks]`, in position order, the best-scoring retrieval candidates under the
    length before the step (`retrieval.candidate_blocks`); keys, values: `[L, B, Hkv, sink + R + width, D]`,
    the sink, those blocks' tokens, then the `tail_span`.
    """

    blocks: jax.Array
    keys: jax.Array
    values: jax.Array


def keeper(full_len: jax.Array, spec: SpecConfig, summary_blocks: int, size: int):
    """`model.forward`'s `keep` for an offloaded full step: `keep(keys, values, scores)` (one layer on the
    device, `[B, Hkv, S, D]`, and its block scores `[B, Hkv, NB]`) -> that layer's `Kept` entries.

    Enough for `commit_and_refresh` without reading the host cache again: candidates under the length the
    step ends with are those under `full_len [B]` plus blocks inside the tail span; of the former, the
    retrieval's final choice (top-R) takes only blocks that are also among the top-R here.
    """
    first, width = tail_span(full_len, spec, summary_blocks, size)
    n_best = spec.retrieval_tokens // spec.block_size

    def keep(keys, values, scores):
        candidate = retrieval.candidate_blocks(full_len, scores.shape[-1], spec)[:, None, :]
        _, best = lax.top_k(jnp.where(candidate, scores, -jnp.inf), n_best)
        best = jnp.sort(best, axis=-1)  # [B, Hkv, R_blocks]
        retrieved = (best[..., None] * spec.block_size + jnp.arange(spec.block_size)).reshape(*best.shape[:2], -1)
        lead = best.shape[:2]
        slots = jnp.concatenate([jnp.broadcast_to(jnp.arange(spec.sink_tokens), lead + (spec.sink_tokens,)),
                                 retrieved,
                                 jnp.broadcast_to((first[:, None] + jnp.arange(width))[:, None], lead + (width,))],
                                axis=-1)[..., None]
        return Kept(blocks=best, keys=jnp.take_along_axis(keys, slots, axis=2),
                    values=jnp.take_along_axis(values, slots, axis=2))

    return keep


def commit_and_refresh(cache: KVCache, kept: Kept, new_k: jax.Array, new_v: jax.Array, start: jax.Array,
                       summary: BlockSummary, summary_blocks: int, partial: KVCache, blocks: jax.Array,
                       spec: SpecConfig) -> tuple[KVCache, BlockSummary, KVCache]:
    """A full step's commit, summary update and partial refresh for a host cache, from what the step `kept`.

    cache: the host cache, lengths already final; kept: from `keeper(start, spec, summary_blocks, S)`;
    new_k, new_v: `[L, B, Hkv, W, D]` (device) to write at `start [B] + [0, W)` (`committed`); `summary_blocks`
    blocks from the one holding `start` are recomputed (`BlockSummary.update`); the partial cache is rebuilt
    from the retrieved `blocks [L, B, Hkv, R_blocks]` (`retrieval.select_blocks` under the final lengths).
    The tail span is updated on the device as `commit_path` would (writes past the end dropped) and goes back
    whole with the summary blocks, every layer at once (a loop that read one layer of a host buffer while
    writing another made XLA copy the whole buffer every iteration). Exact for rows whose final length is
    past `spec.partial_threshold`, the only ones that verify partially.
    """
    size = cache.max_len
    first, width = tail_span(start, spec, summary_blocks, size)
    head = kept.keys.shape[3] - width  # sink + retrieved candidates, then the tail span
    tail_k, tail_v = (write_all_layers(x[..., head:, :], new, start - first)
                      for x, new in ((kept.keys, new_k), (kept.values, new_v)))
    sum_starts = summary.window_starts(start, summary_blocks, size)
    kmax, kmin = summary.recompute(tail_k, sum_starts - first, cache.length - first, summary_blocks)

    slots = retrieval.static_slots(cache.length, blocks, spec)  # [L, B, Hkv, static]
    block, n_kept = slots // spec.block_size, kept.blocks.shape[-1]
    rank = jnp.zeros_like(block) if n_kept == 0 else jax.vmap(jnp.searchsorted)(
        kept.blocks.reshape(-1, n_kept), block.reshape(-1, block.shape[-1])).reshape(block.shape)
    in_kept = spec.sink_tokens + jnp.minimum(rank, max(n_kept - 1, 0)) * spec.block_size + slots % spec.block_size
    from_kept = jnp.where(slots < spec.sink_tokens, slots, in_kept)
    tail = slots - first[:, None, None]  # slots in the tail span: from there, after the commit
    src = jnp.where(tail >= 0, head + jnp.minimum(tail, width - 1), from_kept)[..., None]
    static_k, static_v = (jnp.take_along_axis(jnp.concatenate([x[..., :head, :], t], axis=3), src, axis=3)
                          for x, t in ((kept.keys, tail_k), (kept.values, tail_v)))
    block_starts = sum_starts // summary.block
    return (cache.replace(k=write_rows(cache.k, tail_k, first), v=write_rows(cache.v, tail_v, first)),
            summary.replace(kmax=write_rows(summary.kmax, kmax, block_starts),
                            kmin=write_rows(summary.kmin, kmin, block_starts)),
            retrieval.with_static(partial, static_k, static_v, spec))
