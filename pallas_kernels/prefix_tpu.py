"""Prefix attention on TPU (Pallas Mosaic): the TPU half of `tree_attention`.

Grid (batch row, KV head, row block, key block). The key-block axis is
sequential: each step folds one `[block_k, D]` block of K and V into running
softmax statistics kept in VMEM, so a block of packed query rows reads its
(row, head)'s valid prefix once. Tree verification fits one row block; a
prefill chunk (G x 512 rows) takes several, which keeps VMEM use bounded. Cache
lengths and the layer index are prefetched scalars: the K/V index maps clamp to
the row's last valid block, so blocks past `cache_len` are never copied (the
pipeline skips a copy whose block index did not change) and their steps do no
math. Row statistics are kept lane-replicated (`[M, 128]`), the layout TPU
vector units want.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
ROW_ALIGN = 16  # packed rows are padded to whole bf16 sublane tiles
MAX_BLOCK_ROWS = 256  # rows per block: the fp32 logits of a block are [rows, block_k]


def row_blocks(rows: int) -> tuple[int, int]:
    """Packed query rows -> (padded rows, rows per block)."""
    block = min(pl.cdiv(rows, ROW_ALIGN) * ROW_ALIGN, MAX_BLOCK_ROWS)
    return pl.cdiv(rows, block) * block, block


def _prefix_kernel(len_ref, layer_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref, *, scale,
                   block_k):
    """q_ref [M, D] (a block of packed rows); k_ref, v_ref [block_k, D] (key block j of this row and head);
    o_ref [M, D] and lse_ref [M, 128] receive the fp32 result after the last block; m/l/acc: VMEM scratch."""
    del layer_ref  # used by the index maps only
    j = pl.program_id(3)
    length = len_ref[pl.program_id(0)]

    @pl.when(j == 0)
    def _start():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(j * block_k < length)
    def _fold():
        start = j * block_k
        key_ok = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1) < length  # [1, block_k]
        row_ok = start + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0) < length  # [block_k, 1]
        # Keys past cache_len (and past the buffer, in a partial last block) may hold anything: NaN included.
        v = jnp.where(row_ok, v_ref[...], jnp.zeros((), v_ref.dtype))
        s = lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32) * scale
        s = jnp.where(key_ok, s, -jnp.inf)
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # finite: this block has a valid key
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new[:, :1])
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)
        m_ref[...] = m_new
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_ref[...] = alpha[:, :1] * acc_ref[...] + pv

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_ref[...]
        o_ref[...] = acc_ref[...] / jnp.where(l[:, :1] > 0, l[:, :1], 1.0)
        lse_ref[...] = jnp.where(l > 0, m_ref[...] + jnp.log(l), -jnp.inf)


def prefix_attention_tpu(qp, k5, v5, lens, layer, *, scale, block_k, block_m, interpret):
    """Prefix attention of packed rows qp [B, Hkv, R, D] (R and block_m from `row_blocks`) over the stacked
    cache k5, v5 [L, B, Hkv, S, D] at `layer`, valid below lens [B] (int32, clipped to S).

    Returns fp32 out [B, Hkv, 1, R, D] and lse [B, Hkv, 1, R] (one split, the GPU kernel's layout).
    `interpret` (bool) runs the TPU interpreter, which models TPU memory spaces, on any backend.
    """
    B, Hkv, R, D = qp.shape
    S = k5.shape[3]
    if S < block_k:  # a block may not exceed the array; short caches are cheap to pad
        pad = [(0, 0)] * 3 + [(0, block_k - S), (0, 0)]
        k5, v5 = jnp.pad(k5, pad), jnp.pad(v5, pad)
    n_blocks = pl.cdiv(k5.shape[3], block_k)

    def kv_block(b, h, r, j, lens_ref, layer_ref):
        last = jnp.maximum(lens_ref[b] - 1, 0) // block_k  # steps past the valid prefix re-point at it
        return layer_ref[0], b, h, jnp.minimum(j, last), 0

    def row_block(b, h, r, j, lens_ref, layer_ref):
        return b, h, r, 0

    kv_spec = pl.BlockSpec((None, None, None, block_k, D), kv_block)
    out, lse = pl.pallas_call(
        functools.partial(_prefix_kernel, scale=scale, block_k=block_k),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, Hkv, R // block_m, n_blocks),
            in_specs=[pl.BlockSpec((None, None, block_m, D), row_block), kv_spec, kv_spec],
            out_specs=[pl.BlockSpec((None, None, block_m, D), row_block),
                       pl.BlockSpec((None, None, block_m, LANES), row_block)],
            scratch_shapes=[pltpu.VMEM((block_m, LANES), jnp.float32), pltpu.VMEM((block_m, LANES), jnp.float32),
                            pltpu.VMEM((block_m, D), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct((B, Hkv, R, D), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, R, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="tree_attention_prefix_tpu",
    )(lens, layer.reshape(1), qp, k5, v5)
    return out[:, :, None], lse[:, :, None, :, 0]
