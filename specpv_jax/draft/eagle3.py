"""EAGLE-3 head: a one-layer self-speculative draft over fused target features.

The head pairs the target feature of position t (its hidden states at the
inputs of `feature_layers`, concatenated and projected by `fc`) with the
embedding of token t + 1 and predicts token t + 2. Deeper tree levels feed the
head's own output hidden state in place of the target feature. The head keeps
its own one-layer KV cache (a `KVCache` with L = 1) over all committed pairs.

Parameter tree (names mirror the public checkpoints):

    fc/kernel [n_feat * Ht, H]
    midlayer/{input_layernorm, hidden_norm, post_attention_layernorm}/scale [H]
    midlayer/self_attn/{q,k,v}_proj/kernel [2H, *], midlayer/self_attn/o_proj/kernel
    midlayer/mlp/{gate,up,down}_proj/kernel
    norm/scale [H]; lm_head/kernel [H, V_draft]
    embed_tokens/embedding [V, H]   (optional; else the target's embedding)
    input_norm/scale [n_feat * Ht]; fc_norm/{i}/scale [Ht]   (`DraftConfig.norm_before_fc`, `fc_norm` only)
    midlayer/self_attn/{q,k}_norm/scale [D]   (`DraftConfig.qk_norm` only)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from specpv_jax import rope, sharding
from specpv_jax.attention import causal_mask
from specpv_jax.cache import KVCache
from specpv_jax.config import DraftConfig, SpecConfig
from specpv_jax.model import MLP, Attention, Params, RMSNorm
from specpv_jax.tree import Tree, frontier_widths, grow_tree


class MidLayer(nn.Module):
    """The head's decoder layer: attention over concat(norm(embedding), norm(feature))."""

    cfg: DraftConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, emb, hidden, cos, sin, cache: KVCache, new_mask, k_extra=None, v_extra=None, write=True,
                 prefix_from=None):
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        normed = RMSNorm(eps, self.dtype, name="hidden_norm")(hidden)
        x = jnp.concatenate([RMSNorm(eps, self.dtype, name="input_layernorm")(emb), normed], axis=-1)
        k_cache, v_cache, length = (None, None, None) if cache is None else (cache.k, cache.v, cache.length)
        attn, _, k, v, k_cache, v_cache = Attention(
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, qk_norm=cfg.qk_norm, eps=eps,
            dtype=self.dtype, name="self_attn")(x, cos, sin, k_cache, v_cache, length, new_mask, 0, k_extra, v_extra,
                                                write, prefix_from=prefix_from)
        h = (normed if cfg.norm_before_residual else hidden) + attn
        h = h + MLP(cfg.hidden_size, cfg.intermediate_size, self.dtype, name="mlp")(
            RMSNorm(eps, self.dtype, name="post_attention_layernorm")(h))
        return h, k, v, None if cache is None else cache.replace(k=k_cache, v=v_cache)


@dataclasses.dataclass(frozen=True)
class Eagle3:
    """A loaded EAGLE-3 head: config, params and the draft-to-target vocabulary offsets `d2t [V_draft]`."""

    cfg: DraftConfig
    params: Params = dataclasses.field(repr=False)
    d2t: jax.Array = dataclasses.field(repr=False)
    source: str = ""

    kind = "eagle3"


def _dtype(params: Params):
    return params["fc"]["kernel"].dtype


def embed_table(params: Params, target_params: Params) -> jax.Array:
    own = params.get("embed_tokens")
    return own["embedding"] if own is not None else target_params["embed_tokens"]["embedding"]


def head_forward(params: Params, cfg: DraftConfig, embed: jax.Array, tokens: jax.Array, hidden: jax.Array,
                 positions: jax.Array, cache: KVCache | None, new_mask: jax.Array, k_extra=None, v_extra=None,
                 write: bool = True):
    """One head pass. tokens, positions: `[B, T]`; hidden: `[B, T, n_feat * Ht]` target features
    or `[B, T, H]` the head's own states. With `write`, the new K/V go into the cache at
    `cache.length` (lengths unchanged); with `cache=None` the pairs attend only to
    `k_extra, v_extra` and each other (training). Returns (state `[B, T, H]`, k, v `[B, Hkv, T, D]`, cache);
    the state is what deeper tree levels are fed and `head_logprobs` reads.

    A `cfg.sliding_window` limits what the cache and the new tokens show each query by position (cache slots
    hold their positions: the head's full cache, not a bounded one); `k_extra` (tree ancestors) stays visible.
    """
    dtype = _dtype(params)
    if hidden.shape[-1] != cfg.hidden_size:  # the EAGLE-3 reference's rule, kept for heads it trained
        hidden = _project_features(params, cfg, hidden.astype(dtype))
    emb = jnp.take(embed, tokens, axis=0).astype(dtype)
    cos, sin = rope.tables(cfg.rope, cfg.head_dim, positions, dtype)
    prefix_from = None
    if cfg.sliding_window is not None:
        prefix_from = positions - (cfg.sliding_window - 1)
        if k_extra is None:
            new_mask &= positions[:, :, None] - positions[:, None, :] < cfg.sliding_window
    out, k, v, cache = MidLayer(cfg, dtype).apply({"params": params["midlayer"]}, emb, hidden.astype(dtype), cos,
                                                  sin, _pin(cache), new_mask, k_extra, v_extra, write, prefix_from)
    k, v, cache = sharding.constrain_kv(k, 1), sharding.constrain_kv(v, 1), _pin(cache)
    return (_final_norm(params, cfg, out) if cfg.norm_output else out), k, v, cache


def _pin(cache: KVCache | None) -> KVCache | None:
    """The head's cache held as placed (`sharding.constrain_kv`): on a mesh whose model axis does not divide its
    KV heads (the cache whole on every device), XLA otherwise re-splits it in the decode loop and gathers it
    back once per call."""
    if cache is None:
        return None
    return cache.replace(k=sharding.constrain_kv(cache.k, -3), v=sharding.constrain_kv(cache.v, -3))


def _project_features(params: Params, cfg: DraftConfig, features: jax.Array) -> jax.Array:
    """Target features `[..., n_feat * Ht]` -> `[..., H]`: `fc`, after the head's feature norms if it has any."""
    eps = cfg.rms_norm_eps
    if cfg.norm_before_fc:
        features = RMSNorm(eps, features.dtype).apply({"params": params["input_norm"]}, features)
    if cfg.fc_norm:
        chunks = jnp.split(features, len(cfg.feature_layers), axis=-1)
        features = jnp.concatenate([RMSNorm(eps, features.dtype).apply({"params": params["fc_norm"][str(i)]}, c)
                                    for i, c in enumerate(chunks)], axis=-1)
    return features @ params["fc"]["kernel"]


def _final_norm(params: Params, cfg: DraftConfig, hidden: jax.Array) -> jax.Array:
    return RMSNorm(cfg.rms_norm_eps, _dtype(params)).apply({"params": params["norm"]}, hidden)


def head_logprobs(params: Params, cfg: DraftConfig, state: jax.Array) -> jax.Array:
    """Float32 log-probabilities over the draft vocabulary, `[..., V_draft]`, of a head state (`head_forward`'s)."""
    h = state if cfg.norm_output else _final_norm(params, cfg, state)
    logits = jnp.einsum("...h,hv->...v", h, params["lm_head"]["kernel"], preferred_element_type=jnp.float32)
    return jax.nn.log_softmax(logits, axis=-1)


def advance(params: Params, cfg: DraftConfig, embed: jax.Array, cache: KVCache, features: jax.Array,
            tokens: jax.Array, count: jax.Array, position: jax.Array | None = None):
    """Commits new (feature t, token t + 1) pairs to the head's cache.

    features: `[B, P, n_feat * Ht]`; tokens: `[B, P]`; the first `count [B]` pairs
    of each row are real; the first pair's position is `position [B]` (default:
    the cache length, true for the head's full cache). Returns the cache, the
    head's output at each row's last real pair `[B, H]` (the state the next
    tree grows from) and the pairs' K/V `[B, Hkv, P, D]` (for a second cache).
    """
    b, p = tokens.shape
    start = cache.length if position is None else position
    positions = start[:, None] + jnp.arange(p, dtype=jnp.int32)[None]
    h, k, v, cache = head_forward(params, cfg, embed, tokens, features, positions, cache, causal_mask(b, p))
    cache = cache.replace(length=cache.length + count)
    last = jnp.take_along_axis(h, jnp.maximum(count - 1, 0)[:, None, None], axis=1)[:, 0]
    return cache, last, k, v


def draft_tree(params: Params, cfg: DraftConfig, spec: SpecConfig, embed: jax.Array, d2t: jax.Array,
               cache: KVCache, last_hidden: jax.Array, root: jax.Array,
               position: jax.Array | None = None) -> Tree:
    """Grows a top-k or beam tree (`tree.grow_tree`) from the head state `last_hidden [B, H]` below `root [B]`.

    Each level runs the head on the frontier nodes, fed their parents' head
    outputs, attending to the committed cache, their frontier ancestors and
    themselves (the cache is read, not written). Level-1 nodes sit at `position [B]` (default: the cache
    length).
    """
    k, depth = spec.tree_top_k, spec.tree_depth
    b = root.shape[0]
    start = cache.length if position is None else position

    def expand(level, slot, tokens, parent, mask, carry):
        prev_out, k_buf, v_buf = carry
        hidden = jnp.take_along_axis(prev_out, parent[:, :, None], axis=1)
        positions = jnp.broadcast_to(start[:, None] + level - 1, tokens.shape)
        out, k_new, v_new, _ = head_forward(params, cfg, embed, tokens, hidden, positions, cache, mask, k_buf, v_buf,
                                            write=False)
        f = tokens.shape[1]
        k_buf = k_buf.at[:, :, slot: slot + f].set(k_new)
        v_buf = v_buf.at[:, :, slot: slot + f].set(v_new)
        prev_out = prev_out.at[:, :f].set(out)  # one carry shape at every level (a skipped level keeps it)
        return head_logprobs(params, cfg, out), (prev_out, k_buf, v_buf)

    widths = frontier_widths(k, depth, spec.tree_beam)
    buf = jnp.zeros((b, cfg.num_kv_heads, sum(widths), cfg.head_dim), _dtype(params))
    carry = (jnp.broadcast_to(last_hidden[:, None], (b, max(widths, default=k), last_hidden.shape[-1])), buf, buf)
    return grow_tree(root, head_logprobs(params, cfg, last_hidden), expand, carry, k, depth, spec.tree_nodes,
                     spec.tree_threshold, lambda ids: ids + d2t[ids], spec.tree_beam)


def empty_cache(cfg: DraftConfig, batch: int, max_len: int, params: Params) -> KVCache:
    """The head's empty one-layer cache."""
    return KVCache.empty(1, batch, cfg.num_kv_heads, max_len, cfg.head_dim, _dtype(params))


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(cfg: DraftConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random head parameters (tests, benchmarks, and the start of training)."""
    k_fc, k_mid, k_head = jax.random.split(key, 3)
    b, h = 1, cfg.hidden_size
    cache = KVCache.empty(1, b, cfg.num_kv_heads, 1, cfg.head_dim, dtype)
    x = jnp.zeros((b, 1, h), dtype)
    cos = sin = jnp.zeros((b, 1, cfg.head_dim), dtype)
    mid = MidLayer(cfg, dtype).init(k_mid, x, x, cos, sin, cache, causal_mask(b, 1))["params"]
    fan_in = len(cfg.feature_layers) * cfg.target_hidden_size
    params = {
        "fc": {"kernel": (jax.random.normal(k_fc, (fan_in, h)) * fan_in ** -0.5).astype(dtype)},
        "midlayer": mid,
        "norm": {"scale": jnp.ones((h,), dtype)},
        "lm_head": {"kernel": (jax.random.normal(k_head, (h, cfg.draft_vocab_size)) * h ** -0.5).astype(dtype)},
    }
    if cfg.norm_before_fc:
        params["input_norm"] = {"scale": jnp.ones((fan_in,), dtype)}
    if cfg.fc_norm:
        params["fc_norm"] = {str(i): {"scale": jnp.ones((cfg.target_hidden_size,), dtype)}
                             for i in range(len(cfg.feature_layers))}
    return params


def identity_d2t(cfg: DraftConfig) -> jax.Array:
    """Offsets for a draft vocabulary equal to the first `draft_vocab_size` target ids."""
    return jnp.zeros((cfg.draft_vocab_size,), jnp.int32)


def d2t_problem(d2t: np.ndarray, vocab_size: int) -> str | None:
    """What is wrong with draft-to-target offsets `d2t [V_draft]` (integers mapping draft id i to target id
    i + d2t[i], each a different id of the target's `vocab_size`), or None."""
    if d2t.dtype.kind not in "iu":
        return f"d2t must hold integer offsets, got dtype {d2t.dtype}"
    target_ids = d2t.astype(np.int64) + np.arange(d2t.size)
    if target_ids.min() < 0 or target_ids.max() >= vocab_size:
        return f"d2t maps draft ids outside the target vocabulary [0, {vocab_size})"
    if np.unique(target_ids).size != target_ids.size:  # the tree's siblings would repeat a token
        return "d2t maps two draft ids to one target id"
    return None


def d2t_from_token_ids(token_ids: np.ndarray) -> np.ndarray:
    """Offsets `d2t` for a draft vocabulary made of the given (sorted, distinct) target ids."""
    token_ids = np.asarray(token_ids, np.int64)
    return (token_ids - np.arange(token_ids.size)).astype(np.int32)
