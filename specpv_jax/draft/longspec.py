"""LongSpec draft: constant-memory drafting at any context length.

One layer over the target's token embeddings. For token t at position p:

    x = embed(t)                                   (the target's embedding)
    x = x + SelfAttn(norm(x))    own q/k/v/o, RoPE at p, over the last `window` tokens and itself
    x = x + CrossAttn(norm(x))   own q/o; queries rotated at p meet the target's last-layer keys
                                 and values, read in place from the target's cache
    x = x + MLP(norm(x))
    logits = lm_head(norm(x))                      (the target's LM head; no norm without `final_norm`)

The draft's own cache is a ring of `window` slots (`KVCache` with L = 1, S =
window, `length` = tokens committed; slot = position % window). A token's
self-attention K/V depend only on the token and its position, so committing
accepted tokens costs their k/v projections alone. At a tree node of depth d
the target has verified everything before the root, so the cross-attention
sees the target's keys up to d + 1 positions back; training draws that lag
from 1-4 (`specpv_jax.train.longspec`).

Parameter tree:

    {input_layernorm, cross_layernorm, post_attention_layernorm, norm}/scale [H]
    self_attn/{q,k,v,o}_proj/kernel; cross_attn/{q,o}_proj/kernel
    mlp/{gate,up,down}_proj/kernel
    with `attention_bias`: self_attn/{q,k,v}_proj/bias, cross_attn/q_proj/bias; without `final_norm`: no norm
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from specpv_jax import model as M
from specpv_jax import rope
from specpv_jax.attention import attend, attend_prefix
from specpv_jax.cache import KVCache
from specpv_jax.config import LongSpecConfig, ModelConfig, SpecConfig
from specpv_jax.model import Params
from specpv_jax.tree import Tree, frontier_slots, grow_tree


NORMS = ("input_layernorm", "cross_layernorm", "post_attention_layernorm", "norm")
BIASED = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("cross_attn", "q_proj"))


@dataclasses.dataclass(frozen=True)
class LongSpecDraft:
    """A loaded LongSpec draft: config and params (embedding and LM head come from the target)."""

    cfg: LongSpecConfig
    params: Params = dataclasses.field(repr=False)
    source: str = ""

    kind = "longspec"
    d2t = None


def _dtype(params: Params):
    return params["self_attn"]["q_proj"]["kernel"].dtype


def _norm(p: Params, x: jax.Array, eps: float) -> jax.Array:
    return M.RMSNorm(eps, x.dtype).apply({"params": p}, x)


def _dense(p: Params, x: jax.Array) -> jax.Array:
    y = x @ p["kernel"]
    return y + p["bias"] if "bias" in p else y


def self_kv(params: Params, cfg: LongSpecConfig, embed: jax.Array, tokens: jax.Array, positions: jax.Array):
    """Self-attention keys (rotated) and values of `tokens [B, T]` at `positions [B, T]`: `[B, Hkv, T, D]` each."""
    dtype = _dtype(params)
    x = jnp.take(embed, tokens, axis=0).astype(dtype)
    cos, sin = rope.tables(cfg.rope, cfg.head_dim, positions, dtype)
    return _kv(params, cfg, _norm(params["input_layernorm"], x, cfg.rms_norm_eps), cos, sin)


def _kv(params, cfg, h, cos, sin):
    b, t, _ = h.shape
    sa = params["self_attn"]
    k = _dense(sa["k_proj"], h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = _dense(sa["v_proj"], h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    return rope.apply_rope(k, cos, sin).transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def layer(params: Params, cfg: LongSpecConfig, embed: jax.Array, tokens: jax.Array, positions: jax.Array,
          self_attend, cross_attend):
    """The draft layer on `tokens [B, T]` at `positions [B, T]`.

    self_attend(q [B, T, Hq, D], k, v [B, Hkv, T, D]) and cross_attend(q [B, T, Hc, Dt]) supply the
    attention (training: masks over the sequence; drafting: the ring and the target's cache).
    Returns (hidden `[B, T, H]` before the final norm, the tokens' self K/V).
    """
    dtype, eps = _dtype(params), cfg.rms_norm_eps
    b, t = tokens.shape
    x = jnp.take(embed, tokens, axis=0).astype(dtype)
    cos, sin = rope.tables(cfg.rope, cfg.head_dim, positions, dtype)
    h = _norm(params["input_layernorm"], x, eps)
    q = rope.apply_rope(_dense(params["self_attn"]["q_proj"], h).reshape(b, t, cfg.num_heads, cfg.head_dim), cos, sin)
    k, v = _kv(params, cfg, h, cos, sin)
    x = x + _dense(params["self_attn"]["o_proj"], self_attend(q, k, v).reshape(b, t, -1))
    if cfg.target_head_dim != cfg.head_dim:
        cos, sin = rope.tables(cfg.rope, cfg.target_head_dim, positions, dtype)
    h = _norm(params["cross_layernorm"], x, eps)
    qc = _dense(params["cross_attn"]["q_proj"], h).reshape(b, t, cfg.cross_heads, cfg.target_head_dim)
    x = x + _dense(params["cross_attn"]["o_proj"], cross_attend(rope.apply_rope(qc, cos, sin)).reshape(b, t, -1))
    h = _norm(params["post_attention_layernorm"], x, eps)
    mlp = params["mlp"]
    x = x + _dense(mlp["down_proj"], jax.nn.silu(_dense(mlp["gate_proj"], h)) * _dense(mlp["up_proj"], h))
    return x, k, v


def logprobs(params: Params, cfg: LongSpecConfig, target: Params, tcfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Float32 log-probabilities `[..., V]` through the target's LM head."""
    if cfg.final_norm:
        hidden = _norm(params["norm"], hidden, cfg.rms_norm_eps)
    return jax.nn.log_softmax(M.logits(target, tcfg, hidden), axis=-1)


def window_mask(t: int, window: int) -> jax.Array:
    """`[T, T]`: query i sees itself and the `window` keys before it (as the root does at inference)."""
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    return jnp.asarray((j <= i) & (j >= i - window))


def train_forward(params: Params, cfg: LongSpecConfig, embed: jax.Array, tokens: jax.Array, positions: jax.Array,
                  target_k: jax.Array, target_v: jax.Array, lag: jax.Array) -> jax.Array:
    """The layer over whole sequences `tokens [B, T]` (differentiable).

    target_k, target_v: `[B, Hkv_t, T, Dt]` the target's last-layer K/V of the same
    tokens at the same positions; query i sees target keys j <= i - lag `[B]`
    (rows i < lag see none and produce junk: mask them out of the loss).
    Returns hidden states `[B, T, H]`.
    """
    b, t = tokens.shape
    scale = cfg.head_dim ** -0.5
    self_mask = jnp.broadcast_to(window_mask(t, cfg.window), (b, t, t))
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    cross_mask = j[None] <= i[None] - lag[:, None, None]
    hidden, _, _ = layer(params, cfg, embed, tokens, positions,
                         lambda q, k, v: attend(q, None, None, None, k, v, self_mask, scale),
                         lambda q: attend(q, None, None, None, target_k, target_v, cross_mask,
                                          cfg.target_head_dim ** -0.5))
    return hidden


# --------------------------------------------------------------------------- the ring cache


def empty_ring(cfg: LongSpecConfig, batch: int, dtype) -> KVCache:
    """The draft's whole cache: `window` slots, whatever the context length."""
    shape = (1, batch, cfg.num_kv_heads, cfg.window, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), length=jnp.zeros((batch,), jnp.int32))


def ring_slots(length: jax.Array, count: jax.Array, t: int, w: int) -> jax.Array:
    """`[B, T]` the ring slot of each of `t` new entries, `w` (dropped) for those past `count [B]` and those the
    last `w` of them overwrite."""
    i = jnp.arange(t)[None, :]
    kept = (i < count[:, None]) & (i >= count[:, None] - w)
    return jnp.where(kept, (length[:, None] + i) % w, w)


def ring_write(ring: KVCache, k: jax.Array, v: jax.Array, count: jax.Array) -> KVCache:
    """Appends the first `count [B]` of `k, v [B, Hkv, T, D]` at positions `ring.length + t`: of more than the
    `window` slots, the last `window` (each slot is written once: which of two writes to one index lands is
    unspecified on GPU)."""
    b, h, t, _ = k.shape
    w = ring.k.shape[3]
    slot = ring_slots(ring.length, count, t, w)[:, None, :]
    rows, heads = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]
    return ring.replace(k=ring.k.at[0, rows, heads, slot].set(k.astype(ring.k.dtype), mode="drop"),
                        v=ring.v.at[0, rows, heads, slot].set(v.astype(ring.v.dtype), mode="drop"),
                        length=ring.length + count)


def start(params: Params, cfg: LongSpecConfig, embed: jax.Array, ids: jax.Array, lengths: jax.Array) -> KVCache:
    """The ring after right-padded prompts `ids [B, T]` of `lengths [B]`: their last `window` tokens."""
    b, w = ids.shape[0], cfg.window
    first = jnp.maximum(lengths - w, 0)
    pos = first[:, None] + jnp.arange(w)[None, :]
    tokens = jnp.take_along_axis(ids, jnp.clip(pos, 0, ids.shape[1] - 1), axis=1)
    k, v = self_kv(params, cfg, embed, tokens, pos)
    ring = empty_ring(cfg, b, _dtype(params)).replace(length=first)
    return ring_write(ring, k, v, jnp.minimum(lengths, w))


def commit(params: Params, cfg: LongSpecConfig, embed: jax.Array, ring: KVCache, tokens: jax.Array,
           count: jax.Array) -> KVCache:
    """Appends the first `count [B]` of `tokens [B, P]` (the verified path, root first) to the ring."""
    positions = ring.length[:, None] + jnp.arange(tokens.shape[1])[None, :]
    k, v = self_kv(params, cfg, embed, tokens, positions)
    return ring_write(ring, k, v, count)


# --------------------------------------------------------------------------- drafting


def _runner(params: Params, cfg: LongSpecConfig, target: Params, tcfg: ModelConfig, ring: KVCache,
            target_cache: KVCache):
    """`run(tokens, positions, mask, k_extra, v_extra) -> (hidden, k, v)`: the layer at inference, self-attending
    to the ring, `k_extra/v_extra` and the new tokens, cross-attending to the target's last-layer cache."""
    embed = target["embed_tokens"]["embedding"]
    seen = jnp.minimum(ring.length, ring.k.shape[3])  # filled ring slots
    last = tcfg.num_layers - 1

    def cross(q):
        return attend_prefix(q, target_cache.k, target_cache.v, target_cache.length, cfg.target_head_dim ** -0.5,
                             layer=last)

    def run(tokens, positions, mask, k_extra, v_extra):
        def self_attend(q, k_new, v_new):
            keys = k_new if k_extra is None else jnp.concatenate([k_extra, k_new], axis=2)
            values = v_new if v_extra is None else jnp.concatenate([v_extra, v_new], axis=2)
            return attend(q, ring.k, ring.v, seen, keys, values, mask, cfg.head_dim ** -0.5, layer=0)

        return layer(params, cfg, embed, tokens, positions, self_attend, cross)

    return run


def root_step(params: Params, cfg: LongSpecConfig, target: Params, tcfg: ModelConfig, ring: KVCache,
              target_cache: KVCache, root: jax.Array):
    """The draft at `root [B]` (position `ring.length`): log-probabilities `[B, V]` of the next token and
    the root's self K/V `[B, Hkv, 1, D]`. The same computation as training at lag 1."""
    run = _runner(params, cfg, target, tcfg, ring, target_cache)
    b = root.shape[0]
    hidden, k, v = run(root[:, None], ring.length[:, None], jnp.ones((b, 1, 1), bool), None, None)
    return logprobs(params, cfg, target, tcfg, hidden[:, 0]), k, v


def draft_tree(params: Params, cfg: LongSpecConfig, spec: SpecConfig, target: Params, tcfg: ModelConfig,
               ring: KVCache, target_cache: KVCache, root: jax.Array) -> Tree:
    """Grows a top-k or beam tree (`tree.grow_tree`) below `root [B]`, which sits at position `ring.length`.

    Every node attends to the ring, the root, its drafted ancestors and itself, and
    cross-attends to the target's last-layer cache below `target_cache.length`
    (the root's position: the target has verified everything before it).
    """
    k, depth = spec.tree_top_k, spec.tree_depth
    b = root.shape[0]
    run = _runner(params, cfg, target, tcfg, ring, target_cache)
    first, k_root, v_root = root_step(params, cfg, target, tcfg, ring, target_cache, root)

    def expand(level, slot, tokens, parent, mask, carry):
        k_buf, v_buf = carry
        mask = jnp.concatenate([jnp.ones((*tokens.shape, 1), bool), mask], axis=-1)  # the root: every node's ancestor
        positions = jnp.broadcast_to(ring.length[:, None] + level, tokens.shape)
        out, k_new, v_new = run(tokens, positions, mask, jnp.concatenate([k_root, k_buf], axis=2),
                                jnp.concatenate([v_root, v_buf], axis=2))
        k_buf = k_buf.at[:, :, slot: slot + tokens.shape[1]].set(k_new)
        v_buf = v_buf.at[:, :, slot: slot + tokens.shape[1]].set(v_new)
        return logprobs(params, cfg, target, tcfg, out), (k_buf, v_buf)

    buf = jnp.zeros((b, cfg.num_kv_heads, frontier_slots(k, depth, spec.tree_beam), cfg.head_dim), _dtype(params))
    return grow_tree(root, first, expand, (buf, buf), k, depth, spec.tree_nodes, spec.tree_threshold,
                     beam=spec.tree_beam)


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(cfg: LongSpecConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random draft parameters (tests, benchmarks, and the start of training)."""
    h = cfg.hidden_size
    shapes = {
        "self_attn": {"q_proj": (h, cfg.num_heads * cfg.head_dim), "k_proj": (h, cfg.num_kv_heads * cfg.head_dim),
                      "v_proj": (h, cfg.num_kv_heads * cfg.head_dim), "o_proj": (cfg.num_heads * cfg.head_dim, h)},
        "cross_attn": {"q_proj": (h, cfg.cross_heads * cfg.target_head_dim),
                       "o_proj": (cfg.cross_heads * cfg.target_head_dim, h)},
        "mlp": {"gate_proj": (h, cfg.intermediate_size), "up_proj": (h, cfg.intermediate_size),
                "down_proj": (cfg.intermediate_size, h)},
    }
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    kernels = [{"kernel": (jax.random.normal(k, s) * s[0] ** -0.5).astype(dtype)} for k, s in zip(keys, leaves)]
    params = jax.tree.unflatten(treedef, kernels)
    if cfg.attention_bias:
        for attn, proj in BIASED:
            params[attn][proj]["bias"] = jnp.zeros(shapes[attn][proj][1], dtype)
    for name in NORMS if cfg.final_norm else NORMS[:-1]:
        params[name] = {"scale": jnp.ones((h,), dtype)}
    return params
