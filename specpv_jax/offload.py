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
- full verification: each layer's attention reads the valid prefix in
  `attention.read_block` blocks, the next block's copy overlapping the
  current block's math; `commit_and_refresh` then moves each whole layer to
  the device once more (the next layer prefetched) to rebuild the partial
  cache and the summary blocks the step touched, and writes back only the
  committed tokens' K/V and those summary blocks.
- prefill: each chunk's attention reads the prefix before it (host reads grow
  quadratically with prompt / chunk: a larger `prefill_chunk` helps), and the
  chunk's K/V are written with `write_rows`; the decode loop then builds the
  summaries with one more pass (`summarize`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from specpv_jax import retrieval
from specpv_jax.cache import BlockSummary, KVCache, summarize_blocks, write_tokens
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
    `start + T <= S`: prefill chunks (T = chunk divides the padded prompt, <= S),
    summary blocks (`BlockSummary.window_starts`), `commit_and_refresh`'s windows.
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


def commit_and_refresh(cache: KVCache, new_k: jax.Array, new_v: jax.Array, start: jax.Array,
                       summary: BlockSummary, summary_blocks: int, partial: KVCache, blocks: jax.Array,
                       spec: SpecConfig) -> tuple[KVCache, BlockSummary, KVCache]:
    """A full step's commit, summary update and partial refresh for a host cache, one layer at a time.

    cache: the host cache, lengths already final; new_k, new_v: `[L, B, Hkv, W, D]`
    (device) to write at `start [B] + [0, W)` (`committed`); `summary_blocks`
    blocks from the one holding `start` are recomputed (`BlockSummary.update`);
    the partial cache is rebuilt from the retrieved `blocks [L, B, Hkv, R_blocks]`
    (`retrieval.refresh`). Each layer is moved to the device whole (the next one
    prefetched) and updated there as `commit_path` would (writes past the end
    dropped); only its rows' windows `[min(start, S - W), + W)`, which hold every
    written slot, and the summary blocks go back, for every layer at once after
    the loop: a loop that read one layer of a host buffer while writing another
    made XLA copy the whole buffer every iteration. (A finished row's `start` may
    sit closer than W to the end: its window then starts earlier and carries
    its valid entries back unchanged, where a clamped write of `new` at `start`
    would overwrite them.)
    """
    n_layers, _, _, size, _ = cache.k.shape
    width = new_k.shape[3]
    back = jnp.minimum(start, size - width)
    sum_starts = summary.window_starts(start, summary_blocks, size)
    slots = retrieval.static_slots(cache.length, blocks, spec)

    def window(buf):  # [B, Hkv, S, D] -> each row's [Hkv, W, D] from `back`
        return jax.vmap(lambda b, s: lax.dynamic_slice_in_dim(b, s, width, axis=1))(buf, back)

    def body(on_device, xs):  # on_device: layer i's keys and values, moved to the device last iteration
        i, k_new, v_new, slot = xs
        ahead = (layer_to_device(cache.k, jnp.minimum(i + 1, n_layers - 1)),
                 layer_to_device(cache.v, jnp.minimum(i + 1, n_layers - 1)))
        keys = write_tokens(on_device[0][None], 0, k_new, start)[0]
        values = write_tokens(on_device[1][None], 0, v_new, start)[0]
        kmax, kmin = summary.recompute(keys[None], sum_starts, cache.length, summary_blocks)
        static = (jnp.take_along_axis(keys, slot[..., None], axis=2),
                  jnp.take_along_axis(values, slot[..., None], axis=2))
        return ahead, (window(keys), window(values), kmax[0], kmin[0], static)

    first = (layer_to_device(cache.k, 0), layer_to_device(cache.v, 0))
    _, (k_back, v_back, kmax, kmin, (static_k, static_v)) = lax.scan(
        body, first, (jnp.arange(n_layers), new_k, new_v, slots))
    block_starts = sum_starts // summary.block
    return (cache.replace(k=write_rows(cache.k, k_back, back), v=write_rows(cache.v, v_back, back)),
            summary.replace(kmax=write_rows(summary.kmax, kmax, block_starts),
                            kmin=write_rows(summary.kmin, kmin, block_starts)),
            retrieval.with_static(partial, static_k, static_v, spec))
