"""Prefix attention on Hopper GPUs (Pallas Mosaic GPU): the same contract as the Triton kernel.

JAX 0.11 deprecates Pallas's Triton backend in favour of Mosaic GPU, so this is
the GPU kernel's successor. One program per (row block, split, batch row x KV
head), warp-specialized as in FlashAttention-3: one or two compute warpgroups
of 64 packed query rows each, and a memory warpgroup that streams the
program's slice of the prefix into a two-slot K/V ring by TMA, refilling a
slot once every compute warpgroup has released it. The compute warpgroups
share each K/V block, so a block is fetched once for up to 128 rows (a 60-node
tree with 4 query heads per KV head is 240 rows: two programs, not four), and
run both products on the tensor cores (wgmma) with an fp32 online softmax in
registers. Split boundaries follow the row's own `cache_len`, as in the Triton
kernel, and nothing past a split's last block is fetched.

TMA reads whole [block_k, D] boxes, so the last block of a split is moved back
to end at the buffer's end when it would run past it; keys already counted and
keys past the split are masked out, and the values past the split are zeroed
in shared memory (whatever the buffer holds past `cache_len`, NaN included,
never reaches the output).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK_M = 64  # packed query rows per compute warpgroup: one wgmma tile
MAX_COMPUTE_WARPGROUPS = 2  # each holds a [64, D] fp32 accumulator and [64, block_k] scores in registers
DTYPES = (jnp.bfloat16, jnp.float16)  # wgmma would read fp32 as tf32: fp32 caches use the Triton kernel
_LOG2E = math.log2(math.e)
_SLOTS = 2
MAX_BLOCK_K = 128  # two slots of K and V blocks of 128 x 128 bf16: 128 KiB of shared memory


def rows_per_program(rows: int) -> int:
    """Packed rows one program takes, for `rows` packed rows per (batch row, KV head): 64 or 128."""
    return BLOCK_M * min(MAX_COMPUTE_WARPGROUPS, pl.cdiv(rows, BLOCK_M))


def _prefix_kernel(len_ref, layer_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, qo_smem, k_smem, v_smem, lse_smem,
                   q_bar, k_bar, v_bar, released, tail_bar, *, scale, block_k, num_splits, kv_heads, compute_wgs):
    """q_ref [B, Hkv, R, D]; k_ref, v_ref [L, B, Hkv, S, D] in global memory; o_ref [B, Hkv, splits, R, D] (q's
    dtype) and lse_ref [B, Hkv, splits, R] (fp32) receive this program's partial result for its rows."""
    wg, row_block, split, bh = (lax.axis_index(name) for name in ("wg", "rows", "split", "bh"))
    b, h = lax.div(bh, kv_heads), lax.rem(bh, kv_heads)
    length, layer = len_ref[b], layer_ref[0]
    S = k_ref.shape[3]
    per_split = pl.cdiv(pl.cdiv(length, num_splits), block_k) * block_k
    lo = split * per_split
    hi = jnp.minimum(lo + per_split, length)
    steps = pl.cdiv(jnp.maximum(hi - lo, 0), block_k)

    def block_start(j):
        """(first key the block holds, first key it counts): they differ only for a last block moved back."""
        wanted = lo + j * block_k
        return jnp.minimum(wanted, S - block_k), wanted

    # Three warpgroups split the SM's 64K registers evenly (168 per thread); the memory warpgroup needs few, so
    # it hands its share to the two compute warpgroups (as in FlashAttention-3).
    rebalance_registers = compute_wgs == 2

    @pl.when(wg == compute_wgs)
    def _memory_warpgroup():
        if rebalance_registers:
            plgpu.set_max_registers(40, action="decrease")

        def fetch(j, slot):
            keys = (layer, b, h, pl.ds(block_start(j)[0], block_k))
            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_bar.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_bar.at[slot])

        for j in range(_SLOTS):
            pl.when(j < steps)(functools.partial(fetch, j, j))

        def refill(j, _):
            slot = lax.rem(j, _SLOTS)
            plgpu.barrier_wait(released.at[slot])  # every compute warpgroup is done with block j
            fetch(j + _SLOTS, slot)

        lax.fori_loop(0, jnp.maximum(steps - _SLOTS, 0), refill, None)

    @pl.when(wg < compute_wgs)
    def _compute_warpgroup():
        if rebalance_registers:
            plgpu.set_max_registers(232, action="increase")
        q_smem = qo_smem.at[wg]
        rows = pl.ds((row_block * compute_wgs + wg) * BLOCK_M, BLOCK_M)
        plgpu.copy_gmem_to_smem(q_ref.at[b, h, rows], q_smem, q_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])

        def body(j, carry):
            m, l, acc = carry  # m in log2 units (scores pre-scaled by log2 e)
            slot = lax.rem(j, _SLOTS)
            plgpu.barrier_wait(k_bar.at[slot])

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
                return acc_ref[...]

            s = pl.run_scoped(scores, plgpu.ACC((BLOCK_M, block_k), jnp.float32))
            first, wanted = block_start(j)
            key = first + plgpu.broadcasted_iota(jnp.int32, (BLOCK_M, block_k), 1, layout=plgpu.Layout.WGMMA)
            s = jnp.where((key >= wanted) & (key < hi), s * (scale * _LOG2E), -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))  # finite: every visited block counts a key
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l = l * alpha + p.sum(axis=1)
            plgpu.barrier_wait(v_bar.at[slot])

            @pl.when(first + block_k > hi)  # only a split's last block; the same in every compute warpgroup
            def _values_past_the_split():
                @pl.when(wg == 0)
                def _zero():  # weight 0 times a NaN or inf left in the buffer past cache_len would still be NaN
                    v_ref_slot = v_smem.at[slot]
                    v = v_ref_slot[...]
                    key = first + plgpu.broadcasted_iota(jnp.int32, v.shape, 0, layout=plgpu.Layout.WGMMA)
                    v_ref_slot[...] = jnp.where(key < hi, v, jnp.zeros((), v.dtype))
                    plgpu.commit_smem()  # make the stores visible to the tensor cores

                plgpu.barrier_arrive(tail_bar)  # no warpgroup reads the block before it is zeroed
                plgpu.barrier_wait(tail_bar)

            def values(acc_ref):
                plgpu.wgmma(acc_ref, p.astype(v_smem.dtype), v_smem.at[slot])
                return acc_ref[...]

            pv = pl.run_scoped(values, plgpu.ACC((BLOCK_M, acc.shape[1]), jnp.float32))
            # Both products have read the slot (run_scoped waited): release it, if it is to be refilled.
            pl.when(j + _SLOTS < steps)(lambda: plgpu.barrier_arrive(released.at[slot]))
            return m_new, l, acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv

        D = q_smem.shape[1]
        row_stat = plgpu.Layout.WGMMA.reduce(1)
        init = (plgpu.layout_cast(jnp.full((BLOCK_M,), -jnp.inf, jnp.float32), row_stat),
                plgpu.layout_cast(jnp.zeros((BLOCK_M,), jnp.float32), row_stat),
                plgpu.layout_cast(jnp.zeros((BLOCK_M, D), jnp.float32), plgpu.Layout.WGMMA))
        m, l, acc = lax.fori_loop(0, steps, body, init)
        has_keys = l > 0
        # The queries are no longer needed: their shared memory takes the output.
        q_smem[...] = (acc / lax.broadcast_in_dim(jnp.where(has_keys, l, 1.0), acc.shape, [0])).astype(q_smem.dtype)
        lse_smem.at[wg][...] = jnp.where(has_keys, (m + jnp.log2(jnp.where(has_keys, l, 1.0))) / _LOG2E, -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, h, split, rows])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, split, rows])
        plgpu.wait_smem_to_gmem(0)


def check_args(k_cache, block_k: int, interpret: bool) -> None:
    """Raises ValueError for what this kernel cannot take (checked before tracing)."""
    if interpret:
        raise ValueError("tree_attention cannot interpret the Mosaic GPU kernel (JAX's Mosaic GPU interpreter "
                         "needs the test-only extensions in tests/mosaic_gpu_interpret.py): pass interpret=False "
                         "on a Hopper GPU, or platform='gpu' to interpret the Triton kernel")
    if k_cache.dtype not in DTYPES:
        raise ValueError(f"the Mosaic GPU kernel takes bfloat16 or float16 caches, got {k_cache.dtype} "
                         "(use platform='gpu' for float32)")
    if block_k > MAX_BLOCK_K:
        raise ValueError(f"block_k must be 64 or {MAX_BLOCK_K} for the Mosaic GPU kernel, got {block_k}")
    S = k_cache.shape[-2]
    if S % 8 or S < block_k:  # TMA reads whole blocks, in tiles of 8 rows
        raise ValueError(f"the Mosaic GPU kernel needs a cache length S that is a multiple of 8 and >= block_k "
                         f"= {block_k}, got S={S} (k_cache {k_cache.shape}); our caches are allocated in "
                         "multiples of 256")


def prefix_attention_mosaic_gpu(qp, k5, v5, lens, layer, *, scale, block_k, num_splits):
    """Split-K prefix attention on packed rows qp [B, Hkv, R, D] -> partials.

    R: a multiple of rows_per_program(R). k5, v5: [L, B, Hkv, S, D] with S >= block_k; lens [B] int32 (0..S);
    layer: int32 scalar. Returns out [B, Hkv, num_splits, R, D] in qp's dtype (the Triton kernel's is fp32;
    accumulation is fp32 in both) and lse [B, Hkv, num_splits, R] in fp32.
    """
    B, Hkv, R, D = qp.shape
    compute_wgs = rows_per_program(R) // BLOCK_M
    tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kernel = functools.partial(_prefix_kernel, scale=scale, block_k=block_k, num_splits=num_splits, kv_heads=Hkv,
                               compute_wgs=compute_wgs)
    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((B, Hkv, num_splits, R, D), qp.dtype),
                  jax.ShapeDtypeStruct((B, Hkv, num_splits, R), jnp.float32)),
        scratch_types=[
            plgpu.SMEM((compute_wgs, BLOCK_M, D), qp.dtype, transforms=tiles),  # queries, then outputs
            plgpu.SMEM((_SLOTS, block_k, D), k5.dtype, transforms=tiles),
            plgpu.SMEM((_SLOTS, block_k, D), v5.dtype, transforms=tiles),
            plgpu.SMEM((compute_wgs, BLOCK_M), jnp.float32),
            plgpu.Barrier(num_barriers=compute_wgs),
            plgpu.Barrier(num_barriers=_SLOTS),
            plgpu.Barrier(num_barriers=_SLOTS),
            plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=_SLOTS),
            plgpu.Barrier(num_arrivals=compute_wgs),
        ],
        # Row blocks vary fastest in launch order, so programs sharing a K/V slice run together (L2 reuse).
        grid=(R // (compute_wgs * BLOCK_M), num_splits, B * Hkv),
        grid_names=("rows", "split", "bh"),
        num_threads=compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True,
                                             lowering_semantics=plgpu.LoweringSemantics.Lane),
    )(lens, layer.reshape(1), qp, k5, v5)
