"""An independent small draft model with SpecExtend's Cross-model Retrieval.

Any supported decoder (loaded like a target) drafts for a bigger one that
shares its tokenizer. It drafts top-k trees (`tree.grow_tree`) from its own
next-token distributions.

Cross-model Retrieval keeps the draft's attention short at any context length:
its *working* cache holds only the `draft_chunks` best `chunk_tokens`-token
chunks of the context (in position order), then every token from the chunk in
progress at the last retrieval on. Every `retrieve_every` steps the chunks are
re-chosen by the target's last-layer attention of the deepest accepted token
(softmax per head, mean over heads, mean within each chunk). A second cache, the
*store*, keeps every token's draft K (without RoPE) and V at its original
position; a rebuild gathers the chosen tokens from it and rotates their keys to
their compact positions 0, 1, ... in the working cache. All shapes are static.
With `draft_chunks=0` there is no store: the working cache is the whole
context at original positions (classic draft-model speculation).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from specpv_jax import model as M
from specpv_jax import rope
from specpv_jax.attention import causal_mask
from specpv_jax.cache import KVCache, write_all_layers
from specpv_jax.config import ModelConfig, SpecConfig
from specpv_jax.tree import Tree, frontier_slots, grow_tree


@dataclasses.dataclass(frozen=True)
class SmallDraft:
    """A loaded small draft model: a decoder's config and params (its own embeddings and LM head)."""

    cfg: ModelConfig
    params: M.Params = dataclasses.field(repr=False)
    source: str = ""

    kind = "small"
    d2t = None  # draft ids are target ids


def fit_problems(cfg: ModelConfig, target: ModelConfig) -> list[str]:
    """Ways a small draft cannot draft for `target` (empty when it can)."""
    if cfg.vocab_size != target.vocab_size:
        return [f"its vocabulary has {cfg.vocab_size} tokens, the target's {target.vocab_size} "
                "(a draft model must share the target's tokenizer)"]
    return []


@flax.struct.dataclass
class DraftState:
    """work: the cache the draft attends to (`[Ld, B, Hkv, W, D]`, keys rotated to their
    working positions, length = next working position); store: every committed token's key
    without RoPE and value at its original position (retrieval only, else None)."""

    work: KVCache
    store: KVCache | None


def rotate_keys(cfg: ModelConfig, keys: jax.Array, positions: jax.Array, inverse: bool = False) -> jax.Array:
    """Applies the draft's RoPE at `positions [B, T]` to `keys [L, B, Hkv, T, D]`, or undoes it (`inverse`).

    The forward pass rotates keys as `m R(p) k` (m: the RoPE attention scaling), so
    the inverse is `R(-p) y / m^2`.
    """
    cos, sin = rope.tables(cfg.rope, cfg.head_dim, positions, jnp.float32)
    cos, sin = cos[None, :, None], sin[None, :, None]
    x = keys.astype(jnp.float32)
    turned = rope.rotate_half(x)
    out = (x * cos - turned * sin) / rope.attention_scaling(cfg.rope) ** 2 if inverse else x * cos + turned * sin
    return out.astype(keys.dtype)


def attention_row(q: jax.Array, keys: jax.Array, length: jax.Array) -> jax.Array:
    """Attention probabilities of one query per row over its keys, averaged over query heads.

    q: `[B, Hq, D]` (after RoPE); keys: `[B, Hkv, S, D]` valid below `length [B]`.
    Returns `[B, S]` float32 (0 at and past `length`).
    """
    b, hq, d = q.shape
    hkv = keys.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d)
    s = jnp.einsum("bhgd,bhsd->bhgs", qg, keys, preferred_element_type=jnp.float32) * d ** -0.5
    valid = jnp.arange(keys.shape[2])[None, :] < length[:, None]
    probs = jax.nn.softmax(jnp.where(valid[:, None, None], s, -jnp.inf), axis=-1)
    return probs.mean(axis=(1, 2))


def chunk_means(row: jax.Array, chunk: int) -> jax.Array:
    """`[B, S]` -> `[B, S // chunk]`: mean of each whole chunk."""
    b, s = row.shape
    return row[:, : s // chunk * chunk].reshape(b, s // chunk, chunk).mean(-1)


def select_chunks(scores: jax.Array, selectable: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The `k` best chunks among the first `selectable [B]` of `scores [B, NC]`, in position order.

    Returns (chunk ids `[B, k]` ascending, count `[B]` = min(k, selectable)); with
    fewer than k selectable chunks the first `count` ids are all of them.
    """
    nc = scores.shape[1]
    masked = jnp.where(jnp.arange(nc)[None, :] < selectable[:, None], scores, -jnp.inf)
    _, ids = jax.lax.top_k(masked, min(k, nc))
    ids = jnp.sort(ids, axis=1)
    if ids.shape[1] < k:  # a cache shorter than k chunks: pad with ids that are never used
        ids = jnp.pad(ids, ((0, 0), (0, k - ids.shape[1])))
    return ids.astype(jnp.int32), jnp.minimum(selectable, k).astype(jnp.int32)


def rebuild(cfg: ModelConfig, store: KVCache, chunks: jax.Array, n_chunks: jax.Array, chunk: int,
            size: int) -> KVCache:
    """A working cache of `size` slots: the chosen `chunks [B, K]` (first `n_chunks [B]` used), then
    the tail from the start of the chunk in progress to the store's end, keys rotated to slots 0, 1, ..."""
    tail_start = store.length // chunk * chunk
    slot = jnp.arange(size)[None, :]
    head = n_chunks[:, None] * chunk
    which = jnp.take_along_axis(chunks, jnp.minimum(slot // chunk, chunks.shape[1] - 1), axis=1)
    src = jnp.where(slot < head, which * chunk + slot % chunk, tail_start[:, None] + slot - head)
    src = jnp.clip(src, 0, store.max_len - 1)

    def gather(buf):  # [L, B, Hkv, S, D] -> [L, B, Hkv, size, D]
        return jnp.take_along_axis(buf, src[None, :, None, :, None], axis=3)

    b = src.shape[0]
    keys = rotate_keys(cfg, gather(store.k), jnp.broadcast_to(slot, (b, size)))
    return KVCache(k=keys, v=gather(store.v), length=(head[:, 0] + store.length - tail_start).astype(jnp.int32))


def start(cfg: ModelConfig, spec: SpecConfig, cache: KVCache) -> DraftState:
    """The draft state after prefill (`cache`: the draft's own cache over the prompts, RoPE at original
    positions). With retrieval, the first working cache holds the most recent chunks."""
    if spec.draft_chunks == 0:
        return DraftState(work=cache, store=None)
    b = cache.length.shape[0]
    positions = jnp.broadcast_to(jnp.arange(cache.max_len), (b, cache.max_len))
    store = cache.replace(k=rotate_keys(cfg, cache.k, positions, inverse=True))
    return DraftState(work=_retrieve(cfg, spec, store, jnp.arange(cache.max_len // spec.chunk_tokens,
                                                                  dtype=jnp.float32)[None].repeat(b, 0)),
                      store=store)


def _retrieve(cfg: ModelConfig, spec: SpecConfig, store: KVCache, scores: jax.Array) -> KVCache:
    c = spec.chunk_tokens
    chunks, n = select_chunks(scores, store.length // c, spec.draft_chunks)
    return rebuild(cfg, store, chunks, n, c, spec.draft_working_slots(store.max_len))


def retrieve(cfg: ModelConfig, spec: SpecConfig, state: DraftState, q: jax.Array, target_keys: jax.Array,
             target_length: jax.Array) -> DraftState:
    """Re-chooses the working cache's chunks by the target's attention: `q [B, Hq, D]` the target's
    last-layer query of the deepest accepted token, `target_keys [B, Hkv, S, D]` that layer's keys."""
    scores = chunk_means(attention_row(q, target_keys, target_length), spec.chunk_tokens)
    return state.replace(work=_retrieve(cfg, spec, state.store, scores))


def advance(params: M.Params, cfg: ModelConfig, state: DraftState, tokens: jax.Array, count: jax.Array,
            attention: str = "xla") -> tuple[DraftState, jax.Array]:
    """Feeds the committed tokens the draft has not seen, `tokens [B, P]` (first `count [B]` real).

    Returns the state and the draft's log-probabilities after the last real token `[B, V]`.
    """
    b, p = tokens.shape
    work = state.work
    positions = work.length[:, None] + jnp.arange(p, dtype=jnp.int32)[None]
    out = M.forward(params, cfg, tokens, positions, work, causal_mask(b, p), attention=attention,
                    collect_kv=state.store is not None)
    store = state.store
    if store is not None:
        k, v = out.new_kv
        store = store.replace(k=write_all_layers(store.k, rotate_keys(cfg, k, positions, inverse=True), store.length),
                              v=write_all_layers(store.v, v, store.length), length=store.length + count)
    last = jnp.take_along_axis(out.hidden, jnp.maximum(count - 1, 0)[:, None, None], axis=1)[:, 0]
    logprobs = jax.nn.log_softmax(M.logits(params, cfg, last), axis=-1)
    return DraftState(work=out.cache.replace(length=work.length + count), store=store), logprobs


def draft_tree(params: M.Params, cfg: ModelConfig, spec: SpecConfig, work: KVCache, logprobs: jax.Array,
               root: jax.Array, attention: str = "xla") -> Tree:
    """A top-k or beam tree (`tree.grow_tree`) below `root [B]` (already in `work`), from the draft's
    `logprobs [B, V]` after it."""
    k, depth = spec.tree_top_k, spec.tree_depth
    b = root.shape[0]

    def expand(level, slot, tokens, parent, mask, carry):
        k_buf, v_buf = carry
        positions = jnp.broadcast_to(work.length[:, None] + level - 1, tokens.shape)
        out = M.forward(params, cfg, tokens, positions, work, mask, attention=attention, extra_kv=carry,
                        write=False, collect_kv=True)
        k_new, v_new = out.new_kv
        k_buf = k_buf.at[:, :, :, slot: slot + tokens.shape[1]].set(k_new)
        v_buf = v_buf.at[:, :, :, slot: slot + tokens.shape[1]].set(v_new)
        return jax.nn.log_softmax(M.logits(params, cfg, out.hidden), axis=-1), (k_buf, v_buf)

    slots = frontier_slots(k, depth, spec.tree_beam)
    buf = jnp.zeros((cfg.num_layers, b, cfg.num_kv_heads, slots, cfg.head_dim), work.k.dtype)
    return grow_tree(root, logprobs, expand, (buf, buf), k, depth, spec.tree_nodes, spec.tree_threshold,
                     beam=spec.tree_beam)
