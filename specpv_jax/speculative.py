"""The `eagle` mode's loop: the EAGLE-3 head drafts a tree, the target verifies it, commit, repeat.

Everything between prefill and the final tokens runs inside one jitted
`lax.while_loop`; rows of a batch accept different numbers of tokens and
finish independently.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from specpv_jax import model as M
from specpv_jax import verify
from specpv_jax.attention import causal_mask
from specpv_jax.cache import KVCache, commit_path
from specpv_jax.config import DraftConfig
from specpv_jax.draft import eagle3
from specpv_jax.host import stage_factory
from specpv_jax.loop import Output, Run, decode_loop, prefill
from specpv_jax.sampling import Sampler
from specpv_jax.tree import Tree


@flax.struct.dataclass
class EagleState:
    """Loop carry for `eagle` mode.

    pair_feats `[B, P, n_feat * H]`, pair_tokens `[B, P]`, pair_count `[B]`: the
    (feature, next token) pairs the head has not seen yet (P = depth + 1);
    root `[B]`: the last emitted token, root of the next tree.
    """

    cache: KVCache
    draft_cache: KVCache
    pair_feats: jax.Array
    pair_tokens: jax.Array
    pair_count: jax.Array
    root: jax.Array
    out: Output
    key: jax.Array


def flat_features(features: jax.Array) -> jax.Array:
    """`[n, B, T, H]` -> `[B, T, n * H]` (EAGLE-3 concatenates captured layers in order)."""
    n, b, t, h = features.shape
    return features.transpose(1, 2, 0, 3).reshape(b, t, n * h)


def draft_prefill_chunk(dparams, dcfg: DraftConfig, embed, draft_cache: KVCache, start, next_ids, features):
    """The head's prefill for one target chunk: pairs (feature t, token t + 1) at positions `start + [0, C)`.

    next_ids `[B, C]`: token t + 1; features `[n, B, C, H]`: the target's captured layers at token t.
    """
    b, c = next_ids.shape
    positions = jnp.broadcast_to(start + jnp.arange(c, dtype=jnp.int32), (b, c))
    cache = draft_cache.replace(length=jnp.full((b,), start, jnp.int32))
    _, _, _, cache = eagle3.head_forward(dparams, dcfg, embed, next_ids, flat_features(features), positions,
                                         cache, causal_mask(b, c))
    return cache


def draft(params, dparams, d2t, run: Run, s: EagleState) -> tuple[Tree, KVCache]:
    """The head sees the pairs committed last step, then grows the next tree below `s.root`."""
    embed = eagle3.embed_table(dparams, params)
    draft_cache, head_state, _, _ = eagle3.advance(dparams, run.dcfg, embed, s.draft_cache, s.pair_feats,
                                                   s.pair_tokens, s.pair_count)
    return eagle3.draft_tree(dparams, run.dcfg, run.spec, embed, d2t, draft_cache, head_state, s.root), draft_cache


def verify_tree(params, run: Run, sampler: Sampler, tree: Tree, cache: KVCache, live: jax.Array, key: jax.Array,
                capture_layers: tuple[int, ...] = ()) -> tuple[verify.Acceptance, KVCache, M.ForwardOut, jax.Array]:
    """Verifies `tree` against the full `cache` and commits each row's accepted path; rows not `live [B]` keep
    their length. Returns (acceptance, cache, the target's forward output, the next key)."""
    out = M.forward(params, run.cfg, tree.tokens, cache.length[:, None] + tree.depth, cache, tree.mask,
                    capture_layers=capture_layers, attention=run.attention)
    key, sub = jax.random.split(key)
    acc = verify.accept(tree, M.logits(params, run.cfg, out.hidden), sampler, sub)
    committed = commit_path(out.cache, acc.path, acc.count)
    return acc, committed.keep_finished(live, cache), out, key


def eagle_step(params, dparams, d2t, run: Run, sampler: Sampler, eos: jax.Array, s: EagleState) -> EagleState:
    """Draft a tree from the head, verify it against the full cache, commit the accepted path."""
    tree, draft_cache = draft(params, dparams, d2t, run, s)
    live = ~s.out.done
    acc, cache, out, key = verify_tree(params, run, sampler, tree, s.cache, live, s.key, run.dcfg.feature_layers)
    emitted, feats = acc.emitted(tree), acc.along_path(flat_features(out.features))
    return EagleState(cache=cache, draft_cache=draft_cache.keep_finished(live, s.draft_cache),
                      pair_feats=feats, pair_tokens=emitted, pair_count=acc.count + 1, root=acc.bonus,
                      out=s.out.append(emitted, acc.count + 1, eos, acc.finite, tree.draft_nan), key=key)


@stage_factory
def eagle_prefill_fn(run: Run):
    """Jitted `fn(params, dparams, ids [B, T], lengths [B], cache, draft_cache) -> (cache, draft_cache,
    logits [B, V], last_feats [n, B, H])`: the target's prefill, the head's cache filled chunk by chunk beside it."""
    def fn(params, dparams, ids, lengths, cache, draft_cache):
        embed = eagle3.embed_table(dparams, params)
        consume = functools.partial(draft_prefill_chunk, dparams, run.dcfg, embed)
        cache, last, last_feats, draft_cache = prefill(params, run, ids, lengths, cache, run.dcfg.feature_layers,
                                                       consume, draft_cache)
        draft_cache = draft_cache.replace(length=lengths - 1)  # the last pair waits for the first new token
        return cache, draft_cache, M.logits(params, run.cfg, last), last_feats

    return jax.jit(fn, donate_argnums=(4, 5))


def initial_state(run: Run, cache: KVCache, draft_cache: KVCache, logits: jax.Array, last_feats: jax.Array,
                  key: jax.Array, sampler: Sampler, eos: jax.Array, limit: jax.Array) -> EagleState:
    """The loop carry after sampling each row's first token from the prefill `logits [B, V]`.

    The head still owes the pair (last prompt feature, first token).
    """
    first, out, key = Output.first_token(run, sampler, logits, key, eos, limit)
    b = first.shape[0]
    p = run.spec.tree_depth + 1
    feats = jnp.zeros((b, p, last_feats.shape[0] * run.cfg.hidden_size), last_feats.dtype)
    feats = feats.at[:, 0].set(flat_features(last_feats[:, :, None])[:, 0])
    return EagleState(cache=cache, draft_cache=draft_cache, pair_feats=feats,
                      pair_tokens=jnp.zeros((b, p), jnp.int32).at[:, 0].set(first),
                      pair_count=jnp.ones((b,), jnp.int32), root=first,
                      out=out, key=key)


@stage_factory
def eagle_decode_fn(run: Run):
    """Jitted `fn(params, dparams, d2t, cache, draft_cache, logits, last_feats, key, sampler, eos, limit) ->
    (Output, cache, draft_cache)`: the `eagle` loop from `eagle_prefill_fn`'s results (caches donated)."""
    def fn(params, dparams, d2t, cache, draft_cache, logits, last_feats, key, sampler, eos, limit):
        params = M.for_decode_loop(params, run.cfg)
        state = initial_state(run, cache, draft_cache, logits, last_feats, key, sampler, eos, limit)
        step = functools.partial(eagle_step, params, dparams, d2t, run, sampler, eos)
        state = decode_loop(run, step, state)
        return state.out, state.cache, state.draft_cache

    return jax.jit(fn, donate_argnums=(3, 4))
