"""LongSpec: tree speculation with a constant-memory draft (`mode="longspec"`).

Each step of the jitted loop: the draft (`draft.longspec`) grows a top-k tree
below the last emitted token from its `window`-slot ring and the target's
last-layer cache (read in place), the target verifies the tree against its full
cache (on GPU the Pallas kernel's hybrid tree attention), the accepted path is
committed to both caches. LongSpec's static tree [4, 16, 16, 16, 16] is
`LONGSPEC_TREE` (a beam tree: top-k 4, depth 5, all 68 candidates). Lossless:
acceptance is the same rule as every other mode.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from specpv_jax import model as M
from specpv_jax.cache import KVCache
from specpv_jax.config import SpecConfig
from specpv_jax.draft import longspec
from specpv_jax.host import stage_factory
from specpv_jax.loop import Output, Run, decode_loop, prefill
from specpv_jax.sampling import Sampler
from specpv_jax.speculative import verify_tree

LONGSPEC_TREE = SpecConfig(tree_top_k=4, tree_depth=5, tree_nodes=68, tree_beam=True)


@flax.struct.dataclass
class LongSpecState:
    """Loop carry: the target's cache, the draft's ring (both of length = the root's position), the
    root (last emitted token, in neither cache yet)."""

    cache: KVCache
    ring: KVCache
    root: jax.Array
    out: Output
    key: jax.Array


def longspec_step(params, dparams, run: Run, sampler: Sampler, eos: jax.Array, s: LongSpecState) -> LongSpecState:
    """Draft a tree from the ring and the target's cache, verify it against the full cache, commit the accepted
    path and write the draft's K/V of its tokens into the ring."""
    cfg, dcfg = run.cfg, run.dcfg
    tree = longspec.draft_tree(dparams, dcfg, run.spec, params, cfg, s.ring, s.cache, s.root)
    live = ~s.out.done
    acc, cache, _, key = verify_tree(params, run, sampler, tree, s.cache, live, s.key)
    count = jnp.where(live, acc.count + 1, 0)
    path_tokens = jnp.take_along_axis(tree.tokens, acc.path, axis=1)  # root first
    ring = longspec.commit(dparams, dcfg, params["embed_tokens"]["embedding"], s.ring, path_tokens, count)
    emitted = acc.emitted(tree)
    return LongSpecState(cache=cache, ring=ring, root=jnp.where(live, acc.bonus, s.root),
                         out=s.out.append(emitted, acc.count + 1, eos, acc.finite, tree.draft_nan), key=key)


@stage_factory
def longspec_prefill_fn(run: Run):
    """Prefills the target over the prompts and fills the draft's ring; returns (cache, ring, last logits `[B, V]`)."""
    def fn(params, dparams, ids, lengths, cache):
        cache, last, _, _ = prefill(params, run, ids, lengths, cache)
        ring = longspec.start(dparams, run.dcfg, params["embed_tokens"]["embedding"], ids, lengths)
        return cache, ring, M.logits(params, run.cfg, last)

    return jax.jit(fn, donate_argnums=(4,))


@stage_factory
def longspec_decode_fn(run: Run):
    """Jitted `fn(params, dparams, cache, ring, logits, key, sampler, eos, limit) -> (Output, cache, ring)`: the
    `longspec` loop from `longspec_prefill_fn`'s results (cache and ring donated)."""
    def fn(params, dparams, cache, ring, logits, key, sampler, eos, limit):
        params = M.for_decode_loop(params, run.cfg)
        first, out, key = Output.first_token(run, sampler, logits, key, eos, limit)
        state = LongSpecState(cache=cache, ring=ring, root=first, out=out, key=key)
        state = decode_loop(run, functools.partial(longspec_step, params, dparams, run, sampler, eos), state)
        return state.out, state.cache, state.ring

    return jax.jit(fn, donate_argnums=(2, 3))
