"""Tree attention for speculative verification: a Pallas split-K kernel and its jnp reference.

A verification step scores T tree nodes at once. Each node attends to the whole
prefix cache (positions `< cache_len[b]`) and to the tree nodes its mask allows
(its ancestors and itself). The prefix part is the expensive one and runs in a
Pallas kernel; the T x T tree part is tiny and runs in jnp; the two are joined
with an exact log-sum-exp merge. The prefix kernel below is the GPU (Triton)
one; `prefix_tpu` holds the TPU (Mosaic) one and `prefix_mosaic_gpu` a Hopper
(Mosaic GPU) one, Triton's successor, with the same packing and outputs.

Kernel layout. For each (batch row, KV head) the G = Hq // Hkv query heads of
the group and the T tree nodes are packed into G*T rows (padded to a power of
two >= 16 for Triton), so every K/V block is read once per KV head, not once per
query head. The prefix is split across `num_splits` programs (split-K, as in
flash-decoding); each loops over its key blocks with an online softmax in fp32
and writes a partial (out, lse). Split boundaries follow the row's own
`cache_len`, so work is balanced across splits and nothing past the valid
length is loaded.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import prefix_mosaic_gpu
from pallas_kernels.prefix_tpu import prefix_attention_tpu, row_blocks

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Keys per inner step, by platform; each TPU grid step has a fixed cost (~0.35 us).
DEFAULT_BLOCK_K = {"gpu": 64, "mosaic_gpu": 64, "tpu": 512}
_MAX_BLOCK_M = 128  # rows per program: larger tiles spill registers on Triton
_TARGET_PROGRAMS = 256  # about two programs per SM on a 132-SM H100
# The NVIDIA compute capabilities each compiled GPU kernel runs on: jaxlib's Triton refuses GPUs older than Ampere
# (FAILED_PRECONDITION when the kernel compiles: free Colab's T4 is 7.5), and the Mosaic GPU kernel's wgmma is
# Hopper's alone.
CUDA_CAPABILITIES = {"gpu": ((8, 0), None), "mosaic_gpu": ((9, 0), (10, 0))}


# ----------------------------------------------------------------------------- merging


def _combine(outs: jax.Array, lses: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Exact LSE merge of fp32 attention results stacked on `axis`; safe when all lse are -inf."""
    lse_max = jnp.max(lses, axis=axis, keepdims=True)
    lse_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    weights = jnp.exp(lses - lse_max)  # 0 for empty parts
    total = jnp.sum(weights, axis=axis)
    # An empty part's output is not read at all (0 * NaN would be NaN).
    weighted = jnp.where(weights[..., None] > 0, weights[..., None] * outs, 0.0)
    out = jnp.sum(weighted, axis=axis) / jnp.where(total > 0, total, 1.0)[..., None]
    return out, jnp.squeeze(lse_max, axis) + jnp.log(total)


@jax.jit
def merge_attention(out_a, lse_a, out_b, lse_b):
    """Merges attention over two disjoint key sets: (out [..., D], lse [...]) each -> (out, lse).

    `out` is returned in `out_a`'s dtype, `lse` in float32. A side with no keys
    (lse = -inf) contributes nothing; both empty gives out = 0, lse = -inf.
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape or out_a.shape[:-1] != lse_a.shape:
        raise ValueError(f"merge_attention needs out_a, out_b [..., D] and lse_a, lse_b [...] of one shape, got "
                         f"out_a {out_a.shape}, lse_a {lse_a.shape}, out_b {out_b.shape}, lse_b {lse_b.shape}")
    out, lse = _combine(jnp.stack([out_a.astype(jnp.float32), out_b.astype(jnp.float32)]),
                        jnp.stack([lse_a.astype(jnp.float32), lse_b.astype(jnp.float32)]), axis=0)
    return out.astype(out_a.dtype), lse


def _masked_attention(s: jax.Array, mask: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax of fp32 logits s [B, Hkv, G, T, K] under `mask` (broadcastable) over v [B, Hkv, K, D]; fp32."""
    s = jnp.where(mask, s, -jnp.inf)
    v = jnp.where(jnp.any(jnp.broadcast_to(mask, s.shape), axis=(-3, -2))[..., None], v, 0)  # 0 x NaN is NaN
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhgtk,bhkd->bhgtd", p, v, precision=lax.Precision.HIGHEST)
    out = out / jnp.where(l > 0, l, 1.0)
    return out, jnp.squeeze(m + jnp.log(l), -1)


# ----------------------------------------------------------------------------- argument checks


def _check_args(q, k_cache, v_cache, cache_len, k_tree, v_tree, tree_mask, layer):
    """Raises ValueError naming the offending argument; returns (B, T, Hq, Hkv, S, D)."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, Hq, D], got shape {q.shape}")
    B, T, Hq, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D={D} (q shape {q.shape}) is not supported; supported: {SUPPORTED_HEAD_DIMS}")
    if T < 1 or B < 1:
        raise ValueError(f"q must have at least one row and one tree node, got shape {q.shape}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must have the same shape")
    if layer is None and k_cache.ndim != 4:
        raise ValueError(f"k_cache must be [B, Hkv, S, D] (or [L, B, Hkv, S, D] with layer=), "
                         f"got shape {k_cache.shape}")
    if layer is not None and k_cache.ndim != 5:
        raise ValueError(f"layer= needs a stacked k_cache [L, B, Hkv, S, D], got shape {k_cache.shape}")
    if layer is not None and (jnp.ndim(layer) != 0 or not jnp.issubdtype(jnp.result_type(layer), jnp.integer)):
        raise ValueError(f"layer must be an integer scalar, got {layer!r}")
    if layer is not None and (index := _concrete(layer)) is not None and not 0 <= index < k_cache.shape[0]:
        raise ValueError(f"layer {index} is outside the stacked cache's {k_cache.shape[0]} layers "
                         f"(k_cache {k_cache.shape})")
    cb, Hkv, S, cd = k_cache.shape[-4:]
    if cb != B or cd != D:
        raise ValueError(f"k_cache {k_cache.shape} does not match q {q.shape}: need batch {B} and head dim {D}")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"query heads Hq={Hq} (q {q.shape}) must be a multiple of KV heads "
                         f"Hkv={Hkv} (k_cache {k_cache.shape})")
    for name, x in (("k_tree", k_tree), ("v_tree", v_tree)):
        if x.shape != (B, Hkv, T, D):
            raise ValueError(f"{name} must be [B, Hkv, T, D] = {(B, Hkv, T, D)}, got shape {x.shape}")
    if tree_mask.shape != (B, T, T):
        raise ValueError(f"tree_mask must be [B, T, T] = {(B, T, T)}, got shape {tree_mask.shape}")
    if tree_mask.dtype != jnp.bool_:
        raise ValueError(f"tree_mask must be bool, got {tree_mask.dtype}")
    if not hasattr(cache_len, "shape") or cache_len.shape != (B,) or not jnp.issubdtype(cache_len.dtype,
                                                                                          jnp.integer):
        raise ValueError(f"cache_len must be an integer array of shape [B] = {(B,)}, "
                         f"got {getattr(cache_len, 'dtype', type(cache_len).__name__)}"
                         f"{list(getattr(cache_len, 'shape', ()))}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype {q.dtype} is not supported; supported: "
                         f"{[jnp.dtype(d).name for d in SUPPORTED_DTYPES]}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("k_tree", k_tree), ("v_tree", v_tree)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} dtype {x.dtype} must match q dtype {q.dtype}")
    return B, T, Hq, Hkv, S, D


def cuda_capability(device=None) -> tuple[int, int] | None:
    """The CUDA compute capability of `device` (default: JAX's first device), e.g. (9, 0); None where it is
    not an NVIDIA GPU or does not say."""
    device = jax.devices()[0] if device is None else device
    if device.platform != "gpu" or "cuda" not in str(device.client.platform_version).lower():
        return None
    try:
        major, minor = (int(x) for x in str(getattr(device, "compute_capability", "")).split("."))
    except ValueError:
        return None
    return major, minor


def device_problem(platform: str, device=None) -> str | None:
    """Why `platform`'s compiled kernel cannot run on `device` (default: JAX's first device); None when nothing
    is known against it (an NVIDIA GPU in range, or another device: a TPU, a ROCm GPU)."""
    device = jax.devices()[0] if device is None else device
    capability = cuda_capability(device) if platform in CUDA_CAPABILITIES else None
    if capability is None:
        return None
    low, high = CUDA_CAPABILITIES[platform]
    if capability >= low and (high is None or capability < high):
        return None
    kernel = {"gpu": "The Triton tree-attention kernel", "mosaic_gpu": "The Mosaic GPU tree-attention kernel"}[platform]
    needs = f"{low[0]}.{low[1]} or newer" if high is None else f"{low[0]}.x (Hopper)"
    return (f"{kernel} needs an NVIDIA GPU of compute capability {needs}; {device.device_kind} is "
            f"{capability[0]}.{capability[1]}: take the XLA path (attention=\"xla\", which \"auto\" picks there)")


def _concrete(x) -> int | None:
    """The value of an integer scalar, or None when it is traced."""
    try:
        return int(x)
    except jax.errors.ConcretizationTypeError:
        return None


def _stack_layer(k_cache, v_cache, layer):
    """Views a single-layer cache as a 1-layer stack; returns (k [L,B,Hkv,S,D], v, layer int32), a traced
    layer clamped to 0..L-1 (a kernel's block index past the stack would read outside it)."""
    if layer is None:
        return k_cache[None], v_cache[None], jnp.zeros((), jnp.int32)
    return k_cache, v_cache, jnp.clip(jnp.asarray(layer, jnp.int32), 0, k_cache.shape[0] - 1)


# ----------------------------------------------------------------------------- reference


def tree_attention_reference(q, k_cache, v_cache, cache_len, k_tree, v_tree, tree_mask, *, layer=None, scale=None):
    """Dense jnp oracle for `tree_attention` (same arguments and outputs, no tuning knobs).

    One softmax over the concatenated logits of the valid prefix keys and the
    tree keys allowed by `tree_mask`, all in fp32.
    Returns out [B, T, Hq, D] (q's dtype) and lse [B, T, Hq] (float32).
    """
    D = _check_args(q, k_cache, v_cache, cache_len, k_tree, v_tree, tree_mask, layer)[-1]
    k5, v5, layer = _stack_layer(k_cache, v_cache, layer)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return _reference(q, k5, v5, cache_len, k_tree, v_tree, tree_mask, layer, scale=scale)


@functools.partial(jax.jit, static_argnames=("scale",))
def _reference(q, k5, v5, cache_len, k_tree, v_tree, tree_mask, layer, *, scale):
    B, T, Hq, D = q.shape
    Hkv, S = k5.shape[2], k5.shape[3]
    G = Hq // Hkv
    qg = q.astype(jnp.float32).reshape(B, T, Hkv, G, D).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]
    k_pre, v_pre = k5[layer].astype(jnp.float32), v5[layer].astype(jnp.float32)
    hi = lax.Precision.HIGHEST
    s_pre = jnp.einsum("bhgtd,bhsd->bhgts", qg, k_pre, precision=hi) * scale
    s_tree = jnp.einsum("bhgtd,bhsd->bhgts", qg, k_tree.astype(jnp.float32), precision=hi) * scale
    prefix_ok = jnp.arange(S)[None, :] < cache_len[:, None]  # [B, S]
    mask = jnp.concatenate([jnp.broadcast_to(prefix_ok[:, None, :], (B, T, S)), tree_mask], axis=-1)
    v_all = jnp.concatenate([v_pre, v_tree.astype(jnp.float32)], axis=2)  # [B, Hkv, S+T, D]
    out, lse = _masked_attention(jnp.concatenate([s_pre, s_tree], axis=-1), mask[:, None, None], v_all)
    return _ungroup(out, lse, q.dtype)


def _ungroup(out, lse, dtype):
    """[B, Hkv, G, T, D], [B, Hkv, G, T] -> [B, T, Hq, D] (dtype), [B, T, Hq]."""
    B, Hkv, G, T, D = out.shape
    out = out.transpose(0, 3, 1, 2, 4).reshape(B, T, Hkv * G, D).astype(dtype)
    return out, lse.transpose(0, 3, 1, 2).reshape(B, T, Hkv * G)


# ----------------------------------------------------------------------------- kernel


def _prefix_kernel(len_ref, layer_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, block_k, num_splits):
    """One (batch row, KV head, split, row block): online softmax over this split's prefix keys.

    q_ref [M, D]; k_ref, v_ref [L, S, D] (the whole cache of this row and head);
    o_ref [M, D] and lse_ref [M] receive the fp32 partial result.
    """
    length, layer = len_ref[()], layer_ref[0]
    per_split = pl.cdiv(pl.cdiv(length, num_splits), block_k) * block_k
    lo = pl.program_id(1) * per_split
    hi = jnp.minimum(lo + per_split, length)
    q = q_ref[...]
    M, D = q.shape

    def body(j, carry):
        m, l, acc = carry
        start = pl.multiple_of(lo + j * block_k, block_k)
        valid = start + jnp.arange(block_k) < hi
        # Masked loads: rows past `hi` (and past the buffer end) are never read.
        rows = (layer, pl.ds(start, block_k), slice(None))
        k = plgpu.load(k_ref.at[rows], mask=valid[:, None], other=jnp.zeros((), k_ref.dtype))
        v = plgpu.load(v_ref.at[rows], mask=valid[:, None], other=jnp.zeros((), v_ref.dtype))
        # HIGHEST keeps fp32 caches exact on Triton (IEEE, not TF32); no-op for bf16.
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32) * scale
        s = jnp.where(valid[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))  # finite: every visited block has a valid key
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)
        return m_new, alpha * l + jnp.sum(p, axis=1), alpha[:, None] * acc + pv

    init = (jnp.full((M,), -jnp.inf, jnp.float32), jnp.zeros((M,), jnp.float32), jnp.zeros((M, D), jnp.float32))
    m, l, acc = lax.fori_loop(0, pl.cdiv(jnp.maximum(hi - lo, 0), block_k), body, init)
    o_ref[...] = acc / jnp.where(l > 0, l, 1.0)[:, None]
    lse_ref[...] = jnp.where(l > 0, m + jnp.log(l), -jnp.inf)


def _default_num_splits(S, rows, programs_per_split, block_k):
    """Enough splits to fill the GPU, few enough that fp32 partials stay well under the K/V bytes."""
    fill = pl.cdiv(_TARGET_PROGRAMS, programs_per_split)
    partial_cap = max(1, S // (8 * rows))
    return max(1, min(fill, partial_cap, pl.cdiv(S, block_k)))


def _prefix_attention(qp, k5, v5, lens, layer, *, scale, block_k, block_m, num_splits, interpret):
    """Split-K prefix attention on packed rows qp [B, Hkv, R, D] -> fp32 partials.

    Returns out [B, Hkv, num_splits, R, D] and lse [B, Hkv, num_splits, R].
    """
    B, Hkv, R, D = qp.shape
    L, _, _, S, _ = k5.shape
    kernel = functools.partial(_prefix_kernel, scale=scale, block_k=block_k, num_splits=num_splits)
    # Row blocks vary fastest in Triton's launch order, so programs sharing a K/V chunk run together (L2 reuse).
    kv_spec = pl.BlockSpec((L, None, None, S, D), lambda r, s, b, h: (0, b, h, 0, 0))
    return pl.pallas_call(
        kernel,
        grid=(R // block_m, num_splits, B, Hkv),
        in_specs=[
            pl.BlockSpec((None,), lambda r, s, b, h: (b,)),
            pl.BlockSpec((1,), lambda r, s, b, h: (0,)),
            pl.BlockSpec((None, None, block_m, D), lambda r, s, b, h: (b, h, r, 0)),
            kv_spec,
            kv_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, block_m, D), lambda r, s, b, h: (b, h, s, r, 0)),
            pl.BlockSpec((None, None, None, block_m), lambda r, s, b, h: (b, h, s, r)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, Hkv, num_splits, R, D), jnp.float32),
            jax.ShapeDtypeStruct((B, Hkv, num_splits, R), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=4 if block_m <= 64 else 8, num_stages=2),
        interpret=interpret,
        name="tree_attention_prefix",
    )(lens, layer.reshape(1), qp, k5, v5)


def _tree_part(qg, k_tree, v_tree, tree_mask, scale):
    """Attention of qg [B, Hkv, G, T, D] over the tree keys under tree_mask [B, T, T]; fp32."""
    hi = lax.Precision.HIGHEST
    s = jnp.einsum("bhgtd,bhsd->bhgts", qg.astype(jnp.float32), k_tree.astype(jnp.float32), precision=hi)
    return _masked_attention(s * scale, tree_mask[:, None, None], v_tree.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("scale", "block_k", "num_splits", "platform", "interpret"))
def _tree_attention(q, k5, v5, cache_len, k_tree, v_tree, tree_mask, layer, *, scale, block_k, num_splits,
                    platform, interpret):
    B, T, Hq, D = q.shape
    S, Hkv = k5.shape[3], k5.shape[2]
    G = Hq // Hkv
    qg = q.reshape(B, T, Hkv, G, D).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]
    out, lse = _tree_part(qg, k_tree, v_tree, tree_mask, scale)
    if S > 0:
        R = G * T
        lens = jnp.clip(cache_len.astype(jnp.int32), 0, S)
        if platform == "tpu":
            rows, block_m = row_blocks(R)
            part_out, part_lse = prefix_attention_tpu(_pad_rows(qg, rows), k5, v5, lens, layer, scale=scale,
                                                      block_k=block_k, block_m=block_m, interpret=interpret)
        else:  # the GPU kernels, both split-K over the prefix
            if platform == "mosaic_gpu":
                block_m = prefix_mosaic_gpu.rows_per_program(R)
                kernel = prefix_mosaic_gpu.prefix_attention_mosaic_gpu
            else:
                block_m = min(max(16, pl.next_power_of_2(R)), _MAX_BLOCK_M)
                kernel = functools.partial(_prefix_attention, block_m=block_m, interpret=interpret)
            rows = pl.cdiv(R, block_m) * block_m
            if num_splits is None:
                num_splits = _default_num_splits(S, rows, B * Hkv * (rows // block_m), block_k)
            part_out, part_lse = kernel(_pad_rows(qg, rows), k5, v5, lens, layer, scale=scale, block_k=block_k,
                                        num_splits=num_splits)
        out, lse = _merge_splits(part_out, part_lse, out, lse, G, T)
    return _ungroup(out, lse, q.dtype)


def _pad_rows(qg, rows):
    """[B, Hkv, G, T, D] -> packed rows [B, Hkv, rows, D], zero-padded past G*T."""
    B, Hkv, G, T, D = qg.shape
    return jnp.pad(qg.reshape(B, Hkv, G * T, D), ((0, 0), (0, 0), (0, rows - G * T), (0, 0)))


def _merge_splits(part_out, part_lse, tree_out, tree_lse, G, T):
    """Prefix partials [B, Hkv, splits, rows(, D)] (padded rows) + tree part [B, Hkv, G, T(, D)] -> merged."""
    B, Hkv, splits, _, D = part_out.shape
    part_out = part_out[:, :, :, :G * T].reshape(B, Hkv, splits, G, T, D)
    part_lse = part_lse[:, :, :, :G * T].reshape(B, Hkv, splits, G, T)
    return _combine(jnp.concatenate([part_out, tree_out[:, :, None]], axis=2),
                    jnp.concatenate([part_lse, tree_lse[:, :, None]], axis=2), axis=2)


def tree_attention(q, k_cache, v_cache, cache_len, k_tree, v_tree, tree_mask, *, layer=None, scale=None,
                   block_k=None, num_splits=None, platform=None, interpret=None):
    """Attention of T tree nodes over a prefix KV cache plus the tree itself.

    Args:
      q: [B, T, Hq, D] queries of the tree nodes (D in {64, 128}); float32, bfloat16 or float16, as the caches
        and tree keys/values (accumulation in float32).
      k_cache, v_cache: [B, Hkv, S, D] prefix cache, valid below `cache_len`;
        or a stacked [L, B, Hkv, S, D] cache together with `layer`.
      cache_len: [B] integer, valid prefix length per row (0..S).
      k_tree, v_tree: [B, Hkv, T, D] keys and values of the tree nodes.
      tree_mask: [B, T, T] bool, True where node i may attend to node j (diagonal True).
      layer: integer scalar selecting the layer of a stacked cache: 0..L-1 (checked when concrete; a traced one
        is clamped to that range).
      scale: softmax scale (a Python float: compiled in), default 1/sqrt(D).
      block_k: keys per inner step, a power of two (>= 16 on GPU, 64 or 128 with Mosaic GPU,
        >= 128 on TPU); default 64 on GPU, 512 on TPU.
      num_splits: prefix splits per (row, KV head), GPU kernels only ("gpu", "mosaic_gpu"); default picks one
        from the shapes.
      platform: "gpu" (Triton kernel), "mosaic_gpu" (Mosaic GPU kernel: Hopper, bf16/f16 only,
        compiled only) or "tpu" (Mosaic kernel); default "tpu" on a TPU backend, "gpu" elsewhere.
      interpret: Pallas interpret mode (for the TPU kernel, the TPU interpreter); default True on
        CPU, False elsewhere.

    Query head h reads KV head h // (Hq // Hkv). Returns out [B, T, Hq, D] in
    q's dtype and lse [B, T, Hq] float32 (natural-log softmax denominator,
    scale included).
    """
    D = _check_args(q, k_cache, v_cache, cache_len, k_tree, v_tree, tree_mask, layer)[-1]
    if platform is None:
        platform = "tpu" if jax.default_backend() == "tpu" else "gpu"
    if platform not in DEFAULT_BLOCK_K:
        raise ValueError(f"platform must be one of {tuple(DEFAULT_BLOCK_K)}, got {platform!r}")
    block_k = DEFAULT_BLOCK_K[platform] if block_k is None else block_k
    smallest = {"tpu": 128, "mosaic_gpu": 64}.get(platform, 16)  # a TPU key block is the logits' lane axis
    if isinstance(block_k, bool) or not isinstance(block_k, int) or block_k < smallest or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= {smallest} on {platform}, got {block_k}")
    if num_splits is not None and (platform == "tpu" or isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"num_splits must be >= 1 and applies to the GPU kernels only, got {num_splits} "
                         f"on {platform}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if not interpret and (problem := device_problem(platform)) is not None:
        raise ValueError(problem)
    if platform == "mosaic_gpu":
        prefix_mosaic_gpu.check_args(k_cache, block_k, bool(interpret))
    k5, v5, layer = _stack_layer(k_cache, v_cache, layer)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return _tree_attention(q, k5, v5, cache_len, k_tree, v_tree, tree_mask, layer, scale=scale, block_k=block_k,
                           num_splits=num_splits, platform=platform, interpret=bool(interpret))
