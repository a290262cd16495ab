"""Functional decoder for LLaMA-3.x, Qwen2 and Qwen3.

Layers are Flax modules applied with explicit, stacked parameters and run with
`lax.scan`, so compile time does not grow with depth. The KV cache goes in and
comes out as a pytree; nothing is mutable.

Parameter tree (names mirror the HF module paths; `layers` leaves have a
leading `[L]` axis):

    embed_tokens/embedding [V, H]
    layers/{input_layernorm, post_attention_layernorm}/scale [L, H]
    layers/self_attn/{q,k,v,o}_proj/{kernel, bias?}, layers/self_attn/{q,k}_norm/scale (Qwen3)
    layers/mlp/{gate,up,down}_proj/kernel
    norm/scale [H]
    lm_head/kernel [H, V]      (absent with tied embeddings)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from specpv_jax import offload, retrieval, rope
from specpv_jax.attention import attend, causal_mask
from specpv_jax.cache import BlockSummary, KVCache, fold_keys, write_tokens
from specpv_jax.config import ModelConfig

Params = dict[str, Any]


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled in the input dtype (as in HF)."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * normed.astype(x.dtype)


def _dense(features: int, bias: bool, dtype, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=dtype, name=name)


class Attention(nn.Module):
    """GQA self-attention with RoPE over a prefix cache plus the new tokens.

    The stacked cache `k_cache, v_cache [L, B, Hkv, S, D]` is read at `layer`
    below `cache_len`; with `write`, the new K/V are first written there at
    `cache_len + [0, T)`. (Writing before the prefix is read lets XLA update the
    cache in place; the other order makes it copy the whole cache per layer.)
    `k_extra, v_extra [B, Hkv, U, D]` optionally add context keys before the new
    ones (the draft's tree levels); `new_mask` then spans `[B, T, U + T]`.
    Returns `(out, q, k_new, v_new, k_cache, v_cache)` (q after RoPE, `[B, T, Hq, D]`).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    out_features: int
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    eps: float = 1e-6
    dtype: Any = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, h, cos, sin, k_cache, v_cache, cache_len, new_mask, layer=None, k_extra=None, v_extra=None,
                 write=True, prefix_from=None):
        b, t, _ = h.shape
        q = _dense(self.num_heads * self.head_dim, self.qkv_bias, self.dtype, "q_proj")(h)
        k = _dense(self.num_kv_heads * self.head_dim, self.qkv_bias, self.dtype, "k_proj")(h)
        v = _dense(self.num_kv_heads * self.head_dim, self.qkv_bias, self.dtype, "v_proj")(h)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = RMSNorm(self.eps, self.dtype, name="q_norm")(q)
            k = RMSNorm(self.eps, self.dtype, name="k_norm")(k)
        q = rope.apply_rope(q, cos, sin)
        k = rope.apply_rope(k, cos, sin).transpose(0, 2, 1, 3)
        v = v.transpose(0, 2, 1, 3)
        if write and k_cache is not None:
            k_cache = write_tokens(k_cache, layer, k, cache_len)
            v_cache = write_tokens(v_cache, layer, v, cache_len)
        keys, values = k, v
        if k_extra is not None:
            keys = jnp.concatenate([k_extra.astype(k.dtype), k], axis=2)
            values = jnp.concatenate([v_extra.astype(v.dtype), v], axis=2)
        out = attend(q, k_cache, v_cache, cache_len, keys, values, new_mask, scale=self.head_dim ** -0.5, layer=layer,
                     impl=self.attention, prefix_from=prefix_from)
        out = _dense(self.out_features, self.o_bias, self.dtype, "o_proj")(out.reshape(b, t, -1))
        return out, q, k, v, k_cache, v_cache


class MLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        gate = _dense(self.intermediate_size, False, self.dtype, "gate_proj")(h)
        up = _dense(self.intermediate_size, False, self.dtype, "up_proj")(h)
        return _dense(self.hidden_size, False, self.dtype, "down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP.

    Returns the new hidden state, this layer's queries (after RoPE) and new K/V, and
    the cache with them written.
    """

    cfg: ModelConfig
    dtype: Any = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x, cos, sin, k_cache, v_cache, cache_len, new_mask, layer=None, k_extra=None, v_extra=None,
                 write=True, prefix_from=None):
        """k_cache, v_cache: `[B, Hkv, S, D]`, or the stacked `[L, ...]` cache read at `layer`;
        None for cache-free self-attention (training). k_extra, v_extra, write, prefix_from: as in `Attention`."""
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        h = RMSNorm(eps, self.dtype, name="input_layernorm")(x)
        attn, q, k, v, k_cache, v_cache = Attention(
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, cfg.qkv_bias, cfg.o_bias, cfg.qk_norm,
            eps, self.dtype, self.attention, name="self_attn")(h, cos, sin, k_cache, v_cache, cache_len, new_mask,
                                                                layer, k_extra, v_extra, write, prefix_from)
        x = x + attn
        h = RMSNorm(eps, self.dtype, name="post_attention_layernorm")(x)
        return x + MLP(cfg.hidden_size, cfg.intermediate_size, self.dtype, name="mlp")(h), q, k, v, k_cache, v_cache


@flax.struct.dataclass
class ForwardOut:
    """hidden: `[B, T, H]` after the final norm; features: `[n_capture, B, T, H]`,
    the inputs of the layers named in `capture_layers`; cache: new K/V written at
    `cache.length`, lengths unchanged (the caller commits; offloaded: the cache as given); block_scores:
    `[L, B, Hkv, NB]` retrieval scores when a block summary was given, else None;
    new_kv: with `collect_kv`, the new tokens' keys (after RoPE) and values, each `[L, B, Hkv, T, D]`;
    kept: what `forward`'s `keep` picked from each layer, stacked over layers (else None)."""

    hidden: jax.Array
    features: jax.Array
    cache: KVCache | None
    block_scores: jax.Array | None = None
    new_kv: tuple[jax.Array, jax.Array] | None = None
    kept: Any = None


def param_dtype(params: Params):
    return params["embed_tokens"]["embedding"].dtype


def forward(params: Params, cfg: ModelConfig, ids: jax.Array, positions: jax.Array, cache: KVCache | None,
            new_mask: jax.Array | None = None, capture_layers: Sequence[int] = (),
            attention: str = "xla", summary: BlockSummary | None = None,
            score_mask: jax.Array | None = None, committed: jax.Array | None = None,
            extra_kv: tuple[jax.Array, jax.Array] | None = None, write: bool = True, collect_kv: bool = False,
            keep: Callable | None = None, window: int | None = None) -> ForwardOut:
    """Runs new tokens `ids [B, T]` at `positions [B, T]` over `cache`.

    The new tokens attend to the cache prefix `[0, cache.length)` and to each
    other under `new_mask [B, T, T]` (causal when None; a tree mask for
    verification). Their K/V are written at `cache.length + [0, T)` (unless
    `write=False`). With `cache=None` the tokens attend only to each other
    (training; differentiable). attention: "xla" or "pallas" (see
    `attention.attend`). With a block `summary`, each layer also scores the
    summary's blocks against the queries where `score_mask [B, T]` is set
    (SpecPV retrieval), after folding in the keys of the first `committed [B]`
    new tokens (re-fed ones, already part of the sequence). `extra_kv` (k, v
    `[L, B, Hkv, U, D]`) adds keys between the prefix and the new tokens (a
    draft tree's earlier levels); `new_mask` is then `[B, T, U + T]`.
    `collect_kv` returns the new tokens' K/V per layer. With `keep`, the cache
    and summary live in host memory (`offload`); they are never written (as
    `write=False`, `collect_kv=True`: the caller writes the returned K/V back),
    and each layer's K/V are moved to the device whole and once, the next
    layer's move overlapping this one's math; attention runs on that copy, and
    `keep(keys, values, scores)` (the copy, each `[B, Hkv, S, D]`, and the
    layer's block scores) picks what the caller needs from it, returned stacked
    over layers as `ForwardOut.kept`. `window`: each new token sees only the positions less
    than `window` before its own (a sliding window over prefix and new tokens; XLA attention), for caches
    whose slot i holds position i (as `loop.prefill` fills them).
    """
    dtype = param_dtype(params)
    b, t = ids.shape
    offloaded = keep is not None
    if new_mask is None:
        new_mask = causal_mask(b, t)
    prefix_from = None
    if window is not None:
        if extra_kv is not None or offloaded:
            raise ValueError("forward: window= takes the new tokens and an on-device cache only")
        new_mask = new_mask & (positions[:, :, None] - positions[:, None, :] < window)
        prefix_from = positions - (window - 1)
    x = embed(params, ids)
    cos, sin = rope.tables(cfg.rope, cfg.head_dim, positions, dtype)
    layer = DecoderLayer(cfg, dtype, attention)
    capture = jnp.asarray(capture_layers, jnp.int32).reshape(-1)
    if offloaded:
        write, collect_kv = False, True
    n_layers = cfg.num_layers

    def body(carry, xs):
        x, k_all, v_all, feats = carry
        i, layer_params, extra = xs
        feats = jnp.where((capture == i)[:, None, None, None], x[None], feats)
        if offloaded:  # the carry holds layer i on the device; layer i + 1 starts moving
            here, layer_index = (k_all, v_all), None
            ahead = jnp.minimum(i + 1, n_layers - 1)
            k_all, v_all = offload.layer_to_device(cache.k, ahead), offload.layer_to_device(cache.v, ahead)
        else:
            here, layer_index = (k_all, v_all), i
        x, q, k, v, k_out, v_out = layer.apply({"params": layer_params}, x, cos, sin, *here, cache_len,
                                               new_mask, layer_index, *extra, write, prefix_from)
        if not offloaded:
            k_all, v_all = k_out, v_out
        scores = None
        if summary is not None:
            kmax, kmin = ((offload.layer_to_device(summary.kmax, i), offload.layer_to_device(summary.kmin, i))
                          if offloaded else (summary.kmax[i], summary.kmin[i]))
            if committed is not None:
                kmax, kmin = fold_keys(kmax, kmin, k, cache_len, committed, summary.block)
            scores = retrieval.block_scores(q, kmax, kmin, score_mask)
        kept = keep(*here, scores) if offloaded else None
        return (x, k_all, v_all, feats), (scores, (k, v) if collect_kv else None, kept)

    feats = jnp.zeros((capture.shape[0], b, t, cfg.hidden_size), dtype)
    k_all, v_all, cache_len = (None, None, None) if cache is None else (cache.k, cache.v, cache.length)
    if offloaded:
        k_all, v_all = offload.layer_to_device(cache.k, 0), offload.layer_to_device(cache.v, 0)
    extra = (None, None) if extra_kv is None else extra_kv
    (x, k_all, v_all, feats), (scores, new_kv, kept) = lax.scan(
        body, (x, k_all, v_all, feats), (jnp.arange(n_layers), params["layers"], extra))
    hidden = final_norm(params, cfg, x)
    if cache is not None and not offloaded:
        cache = cache.replace(k=k_all, v=v_all)
    return ForwardOut(hidden=hidden, features=feats, cache=cache, block_scores=scores, new_kv=new_kv, kept=kept)


def embed(params: Params, ids: jax.Array) -> jax.Array:
    """Token embeddings `[..., H]` of `ids [...]`."""
    return jnp.take(params["embed_tokens"]["embedding"], ids, axis=0)


def final_norm(params: Params, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """The last layer's output `x [..., H]` after the final norm (the hidden state the LM head reads)."""
    return RMSNorm(cfg.rms_norm_eps, param_dtype(params)).apply({"params": params["norm"]}, x)


def forward_by_layer(params: Params, cfg: ModelConfig, ids: jax.Array, chunk: int, slots: int,
                     store: Callable, stored: Any, capture_layers: Sequence[int] = (), attention: str = "xla",
                     tick: Callable | None = None) -> tuple[jax.Array, jax.Array, Any]:
    """A prompt `ids [B, T]` (positions `0..T-1`, T a multiple of `chunk`) run a layer at a time: each layer
    takes every chunk, in order, before the next layer starts (the same computation as `forward` chunk by
    chunk over a `slots`-slot cache). A layer's K/V live on the device only while it runs, in a `slots`-slot
    buffer, then go to `store(stored, layer, k, v) -> stored` (k, v `[B, Hkv, slots, D]`, zeros past T): a
    prefill that never reads back the cache it fills (offload's, in host memory, which a chunk-at-a-time
    prefill would read whole for every chunk). `tick(step)` runs after each chunk of each layer (inside jit;
    `step` counts them from 0, layer-major).

    Returns x `[B, T, H]` (the last layer's output, before `final_norm`), the inputs of the layers in
    `capture_layers` `[n, B, T, H]`, and what `store` returned.
    """
    dtype = param_dtype(params)
    b, t = ids.shape
    layer = DecoderLayer(cfg, dtype, attention)
    capture = jnp.asarray(capture_layers, jnp.int32).reshape(-1)
    mask, n_chunks = causal_mask(b, chunk), t // chunk

    def run_layer(carry, xs):
        x, feats, k_buf, v_buf, stored = carry
        i, layer_params = xs

        def run_chunk(c, carry):
            x, feats, k_buf, v_buf = carry
            # Opaque to XLA: with a one-chunk prompt's start (0) known, the prefix attention's masked values fold
            # to a constant zero broadcast, whose dot jaxlib 0.10.2-0.11.x's YNNPACK fusion returns as NaN (where
            # they are on: SPECPV_JAX_CPU_YNN=1, or JAX started before the import; specpv_jax/xla_cpu.py).
            start = lax.optimization_barrier(c * chunk)
            x_c = lax.dynamic_slice_in_dim(x, start, chunk, axis=1)
            if capture_layers:  # a chunk at a time: a whole-prompt select would copy x (and XLA did, twice)
                at = (jnp.argmax(capture == i), 0, start, 0)
                held = lax.dynamic_slice(feats, at, (1, b, chunk, x.shape[2]))
                feats = lax.dynamic_update_slice(feats, jnp.where(jnp.any(capture == i), x_c[None], held), at)
            positions = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (b, chunk))
            cos, sin = rope.tables(cfg.rope, cfg.head_dim, positions, dtype)
            x_c, _, _, _, k_buf, v_buf = layer.apply({"params": layer_params}, x_c, cos, sin, k_buf, v_buf,
                                                     jnp.full((b,), start, jnp.int32), mask, 0)
            if tick is not None:
                tick(i * n_chunks + c)
            return lax.dynamic_update_slice_in_dim(x, x_c, start, axis=1), feats, k_buf, v_buf

        # The buffers go from layer to layer: each chunk reads only slots the layer's earlier chunks wrote.
        x, feats, k_buf, v_buf = lax.fori_loop(0, n_chunks, run_chunk, (x, feats, k_buf, v_buf))
        return (x, feats, k_buf, v_buf, store(stored, i, k_buf[0], v_buf[0])), None

    x = embed(params, ids)
    feats = jnp.zeros((capture.shape[0], b, t, cfg.hidden_size), dtype)
    k_buf, v_buf = (jnp.zeros((1, b, cfg.num_kv_heads, slots, cfg.head_dim), dtype) for _ in range(2))
    (x, feats, _, _, stored), _ = lax.scan(run_layer, (x, feats, k_buf, v_buf, stored),
                                           (jnp.arange(cfg.num_layers), params["layers"]))
    return x, feats, stored


def layer_queries(params: Params, cfg: ModelConfig, layer: int, x: jax.Array, positions: jax.Array) -> jax.Array:
    """The queries (after RoPE) layer `layer` computes from its inputs `x [B, T, H]`: `[B, T, Hq, D]`.

    Lets a caller recompute one layer's attention (retrieval scores) from captured features. The layer runs
    whole, without a cache; under jit, XLA drops what the queries do not need.
    """
    dtype = param_dtype(params)
    cos, sin = rope.tables(cfg.rope, cfg.head_dim, positions, dtype)
    _, q, *_ = DecoderLayer(cfg, dtype).apply({"params": jax.tree.map(lambda a: a[layer], params["layers"])}, x,
                                              cos, sin, None, None, None, causal_mask(*x.shape[:2]))
    return q


def logits(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Float32 logits `[..., V]` from final hidden states `[..., H]`: by the `lm_head` kernel where `params`
    have one (an untied model's, or a tied one's from `for_decode_loop`), else by the tied embedding."""
    if "lm_head" in params:
        return jnp.einsum("...h,hv->...v", hidden, params["lm_head"]["kernel"], preferred_element_type=jnp.float32)
    return jnp.einsum("...h,vh->...v", hidden, params["embed_tokens"]["embedding"],
                      preferred_element_type=jnp.float32)


def for_decode_loop(params: Params, cfg: ModelConfig) -> Params:
    """`params` for a jitted decode loop, called inside the jitted function before the loop: on XLA:CPU a tied
    model also gets its embedding's transpose as `lm_head` (one copy, made once per call), since there a loop's
    product with the embedding's transpose runs slower than with a [H, V] kernel (the demo models' decode
    loops at 4K took 0.70-0.91x the time with the copy in the speculative modes; BENCHMARKS.md). Elsewhere,
    `params`."""
    if not cfg.tie_word_embeddings or jax.default_backend() != "cpu":
        return params
    return {**params, "lm_head": {"kernel": params["embed_tokens"]["embedding"].T}}


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters with the converted-checkpoint layout (for tests and speed benchmarks)."""
    k_embed, k_layers, k_head = jax.random.split(key, 3)
    x = jnp.zeros((1, 1, cfg.hidden_size), dtype)
    cos = sin = jnp.zeros((1, 1, cfg.head_dim), dtype)
    args = (x, cos, sin, None, None, None, causal_mask(1, 1))
    layer = DecoderLayer(cfg, dtype)
    layers = jax.vmap(lambda k: layer.init(k, *args)["params"])(jax.random.split(k_layers, cfg.num_layers))
    params = {
        "embed_tokens": {"embedding": (0.02 * jax.random.normal(k_embed, (cfg.vocab_size, cfg.hidden_size)))
                         .astype(dtype)},
        "layers": layers,
        "norm": {"scale": jnp.ones((cfg.hidden_size,), dtype)},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": (jax.random.normal(k_head, (cfg.hidden_size, cfg.vocab_size))
                                        * cfg.hidden_size ** -0.5).astype(dtype)}
    return params
