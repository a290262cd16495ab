"""Attention of new tokens over a prefix cache plus themselves (XLA path).

One contract serves prefill chunks (causal), decode (T = 1) and tree
verification (tree mask): queries see prefix keys `[0, cache_len)` and the new
keys allowed by `new_mask`. The prefix is read block by block with an online
softmax and a trip count set by the longest row, so cost follows the valid
length, not the buffer size; a buffer that fits one block (decode's case) is
read in one pass, with no loop. The Pallas kernels in `pallas_kernels/` keep
the same contract.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from specpv_jax import sharding

NEG_INF = -1e30  # finite: a fully masked block gives exp(-huge) = 0, never NaN
PREFIX_BLOCK = 256  # caches are allocated in multiples of this
# Query rows x keys scored per (batch row, KV head) in one step of the blockwise prefix loop (8 MiB of fp32
# logits and as much again for their exponentials, per KV head). Fewer, larger steps are faster (2-core CPU,
# demo target at 16K, from fixed 1024-key blocks to this rule: an AR step 9.6 -> 8.2 ms, verifying 7 tokens
# 24 -> 15 ms, 31 tokens 61 -> 49 ms); a prefill chunk (512 tokens x a GQA group of 4) reads 1024 keys a step.
SCORE_TILE = 1 << 21
IMPLEMENTATIONS = ("auto", "xla", "pallas")


def resolve_implementation(impl: str, dtype=None) -> str:
    """"auto" -> the Pallas (Triton) kernel for 16-bit weights (`dtype`; None: any) on an NVIDIA GPU it runs
    on (compute capability 8.0 and up), XLA elsewhere: on older GPUs (Colab's T4), on ROCm GPUs and for
    float32, where the kernel has not run, and on TPU, until the Mosaic kernel (`pallas_kernels.prefix_tpu`,
    tested in the TPU interpreter) has run on one. "pallas" asks for the kernel wherever it may run, and
    raises naming the GPU where it cannot."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r} (choose from {', '.join(IMPLEMENTATIONS)})")
    if jax.default_backend() != "gpu":
        return "xla" if impl == "auto" else impl
    from pallas_kernels.tree_attention import cuda_capability, device_problem  # imported only on a GPU

    device = jax.devices()[0]
    problem = device_problem("gpu", device)
    if impl == "auto":
        half = dtype is None or jnp.dtype(dtype).itemsize == 2
        return "pallas" if half and problem is None and cuda_capability(device) is not None else "xla"
    if impl == "pallas" and problem is not None:
        raise ValueError(problem)
    return impl


def causal_mask(batch: int, t: int) -> jax.Array:
    """`[B, T, T]` lower-triangular mask (query i sees new keys j <= i)."""
    return jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (batch, t, t))


def _group_rows(q: jax.Array, hkv: int) -> jax.Array:
    """`[B, T, Hq, D]` -> `[B, Hkv, G*T, D]`: a KV head's query heads x tokens as one block of rows."""
    b, t, hq, d = q.shape
    return q.reshape(b, t, hkv, hq // hkv, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, -1, d)


def _ungroup_rows(o: jax.Array, t: int) -> jax.Array:
    b, hkv, _, d = o.shape
    return o.reshape(b, hkv, -1, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, -1, d)


def attend(q: jax.Array, k_cache: jax.Array | None, v_cache: jax.Array | None, cache_len: jax.Array | None,
           k_new: jax.Array, v_new: jax.Array, new_mask: jax.Array, scale: float,
           layer: jax.Array | None = None, impl: str = "xla", prefix_from: jax.Array | None = None) -> jax.Array:
    """Softmax attention over prefix + new tokens.

    q: `[B, T, Hq, D]`; k_new, v_new: `[B, Hkv, U, D]` (usually U = T, the new
    tokens); new_mask: `[B, T, U]` bool (True = may attend; every query must see
    at least one new key, normally itself). k_cache, v_cache:
    `[B, Hkv, S, D]`, or `[L, B, Hkv, S, D]` read at `layer`; valid below
    `cache_len [B]`. With no cache (None) this is plain masked self-attention
    (differentiable; used in training). Returns `[B, T, Hq, D]` in q's dtype;
    softmax statistics in float32.

    impl "pallas" runs `pallas_kernels.tree_attention` where its contract fits
    (a cache, U = T new keys, D in {64, 128}); other calls take the XLA path.
    prefix_from: `[B, T]`, query t of row b sees prefix slots from
    `prefix_from[b, t]` on only (a sliding window; XLA path only).
    """
    b, t, hq, d = q.shape
    if (impl == "pallas" and prefix_from is None and k_cache is not None
            and k_new.shape[2] == t and d in _kernel_head_dims()):
        return _tree_kernel(q, k_cache, v_cache, cache_len, k_new, v_new, new_mask, scale, layer)
    hkv = k_new.shape[1]
    group = hq // hkv
    qr = _group_rows(q, hkv)
    s_new = jnp.einsum("bhmd,bhud->bhmu", qr, k_new, preferred_element_type=jnp.float32) * scale
    mask = jnp.tile(new_mask, (1, group, 1))[:, None]  # rows ordered (g, t)
    s_new = jnp.where(mask, s_new, NEG_INF)
    m = s_new.max(-1)
    p = jnp.exp(s_new - m[..., None])
    l = p.sum(-1)
    o = jnp.einsum("bhmu,bhud->bhmd", p.astype(v_new.dtype), v_new, preferred_element_type=jnp.float32)
    if k_cache is not None:
        lo = None if prefix_from is None else jnp.tile(prefix_from, (1, group))[:, None, :]  # rows (g, t)
        m, l, o = _prefix_online_softmax(qr, k_cache, v_cache, cache_len, scale, layer, (m, l, o), lo)
    return _ungroup_rows(o / l[..., None], t).astype(q.dtype)


def _kernel_head_dims() -> tuple[int, ...]:
    from pallas_kernels.tree_attention import SUPPORTED_HEAD_DIMS  # imported only when the kernel is asked for

    return SUPPORTED_HEAD_DIMS


def _tree_kernel(q, k_cache, v_cache, cache_len, k_new, v_new, new_mask, scale, layer):
    """`pallas_kernels.tree_attention`'s output; under a context mesh (`jax.set_mesh`) it runs once per shard.

    XLA cannot partition a kernel's custom call: on a sharded cache it would
    gather every operand, the whole KV cache included, onto each device. Rows
    split along "data" and KV heads (with their query heads) along "model"
    where the mesh divides them, as `sharding.cache_sharding` places caches.
    """
    from pallas_kernels import tree_attention  # kernels know nothing of models; imported on use

    stacked = layer is not None

    def kernel(q, k_cache, v_cache, cache_len, k_new, v_new, new_mask, layer):
        return tree_attention(q, k_cache, v_cache, cache_len, k_new, v_new, new_mask,
                              layer=layer if stacked else None, scale=scale)[0]

    args = (q, k_cache, v_cache, cache_len, k_new, v_new, new_mask, jnp.int32(0) if layer is None else layer)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(*args)
    rows, heads = sharding.attention_axes(mesh, q.shape[0], k_new.shape[1])
    cache = P(None, rows, heads) if stacked else P(rows, heads)
    in_specs = (P(rows, None, heads), cache, cache, P(rows), P(rows, heads), P(rows, heads), P(rows), P())
    return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=P(rows, None, heads),
                         check_vma=False)(*args)


def attend_prefix(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cache_len: jax.Array, scale: float,
                  layer: jax.Array | None = None) -> jax.Array:
    """Attention of `q [B, T, Hq, D]` over the cache prefix `[0, cache_len)` alone (cross-attention onto a
    cache read in place, blockwise as in `attend`). Rows with an empty prefix get zeros. Returns `[B, T, Hq, D]`."""
    b, t, hq, d = q.shape
    hkv = k_cache.shape[-3]
    qr = _group_rows(q, hkv)
    rows = qr.shape[2]
    init = (jnp.full((b, hkv, rows), NEG_INF, jnp.float32), jnp.zeros((b, hkv, rows), jnp.float32),
            jnp.zeros((b, hkv, rows, d), jnp.float32))
    _, l, o = _prefix_online_softmax(qr, k_cache, v_cache, cache_len, scale, layer, init)
    # Until a row's first valid key, masked keys count exp(0) = 1; the first valid block starts at
    # slot 0, so a non-empty prefix wipes them (factor exp(NEG_INF - m) = 0). Empty prefixes: zero.
    o = jnp.where((cache_len > 0)[:, None, None, None], o / jnp.maximum(l, 1e-30)[..., None], 0.0)
    return _ungroup_rows(o, t).astype(q.dtype)


def read_block(size: int, rows: int) -> int:
    """Keys per step of the prefix loop over a `size`-slot buffer for `rows` query rows: the fewest steps that
    keep rows x keys within `SCORE_TILE`, as equal blocks rounded up to a multiple of `PREFIX_BLOCK` (the last
    block ends at the buffer's end and overlaps the one before; keys read twice are counted once)."""
    if size == 0:
        return 0
    steps = -(-size // max(PREFIX_BLOCK, SCORE_TILE // rows // PREFIX_BLOCK * PREFIX_BLOCK))
    even = -(-size // steps)
    return min(size, -(-even // PREFIX_BLOCK) * PREFIX_BLOCK)


def _prefix_online_softmax(qr, k_cache, v_cache, cache_len, scale, layer, init, lo=None):
    """Folds prefix key blocks `[0, max(cache_len))` into running (max, sum, out) statistics.

    The last block may start early to stay inside the buffer; keys it shares with
    the block before are masked, so none is counted twice. `lo [B, 1, rows]`: each
    row's first visible slot (`attend`'s prefix_from; `init` must then hold a
    finite max for every row, as `attend`'s does); blocks before every row's are
    skipped.
    """
    size = k_cache.shape[-2]
    if size == 0:
        return init
    block = read_block(size, qr.shape[2])
    stacked = layer is not None

    def read(buf, start):
        if stacked:
            return lax.dynamic_slice(buf, (layer, 0, 0, start, 0), (1,) + buf.shape[1:3] + (block, buf.shape[-1]))[0]
        return lax.dynamic_slice_in_dim(buf, start, block, axis=2)

    def block_start(j):
        return jnp.minimum(j * block, size - block)

    def fold(j, keys, values, carry):
        m, l, o = carry
        start = block_start(j)
        s = jnp.einsum("bhmd,bhsd->bhms", qr, keys, preferred_element_type=jnp.float32) * scale
        pos = start + jnp.arange(block)
        valid = (pos >= j * block)[None, :] & (pos[None, :] < cache_len[:, None])
        seen = valid[:, None, None, :] if lo is None else valid[:, None, None, :] & (pos >= lo[..., None])
        s = jnp.where(seen, s, NEG_INF)
        values = jnp.where(valid[:, None, :, None], values, 0)  # stale slots: even NaN there must not count
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum("bhms,bhsd->bhmd", p.astype(v_cache.dtype), values, preferred_element_type=jnp.float32)
        return m_new, l * corr + p.sum(-1), o * corr[..., None] + pv

    def fetch(j):
        return read(k_cache, block_start(j)), read(v_cache, block_start(j))

    if block == size:
        # One step reads the whole buffer (every decode step's case): no loop. A loop whose trip count is known
        # only at run time costs a GPU a host round trip per trip; rows past their length are masked as in it.
        return fold(0, *fetch(0), init)
    n_blocks = (jnp.max(cache_len) + block - 1) // block
    first = 0 if lo is None else jnp.clip(jnp.min(lo) // block, 0, n_blocks)
    return lax.fori_loop(first, n_blocks, lambda j, c: fold(j, *fetch(j), c), init)


def attend_dense(q, k_cache, v_cache, cache_len, k_new, v_new, new_mask, scale, prefix_from=None):
    """The same attention as one dense softmax over the whole buffer (a test oracle)."""
    b, t, hq, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    k = jnp.concatenate([k_cache, k_new], axis=2)
    v = jnp.concatenate([v_cache, v_new], axis=2)
    slots = jnp.arange(s)[None, None, :]
    prefix = slots < cache_len[:, None, None]
    if prefix_from is not None:
        prefix &= slots >= prefix_from[:, :, None]
    allowed = jnp.concatenate([jnp.broadcast_to(prefix, (b, t, s)), new_mask], -1)
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("bthgd,bhsd->bhgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(allowed[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    v = jnp.where(allowed.any(axis=1)[:, None, :, None], v, 0)  # a slot no query sees is never read: 0 x NaN is NaN
    out = jnp.einsum("bhgts,bhsd->bthgd", probs, v.astype(jnp.float32))
    return out.reshape(b, t, hq, d).astype(q.dtype)
