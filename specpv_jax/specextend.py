"""SpecExtend: tree speculation with an independent small draft model (`mode="specextend"`).

Each step of the jitted loop: the draft takes in the tokens committed last step,
grows a top-k tree from its working cache (`draft.small`), the target verifies
the tree against its full cache (on GPU the Pallas kernel's hybrid tree
attention: split-K prefix part with LSE, dense tree part, merged exactly), the
accepted path is committed, and every `retrieve_every` steps the draft's
working cache is rebuilt around the context the target attends to (Cross-model
Retrieval). Lossless: acceptance is the same rule as every other mode. The
reference code's OPT-tree is `SPECEXTEND_TREE`.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from specpv_jax import model as M
from specpv_jax.cache import KVCache
from specpv_jax.config import SpecConfig
from specpv_jax.draft import small
from specpv_jax.host import stage_factory
from specpv_jax.loop import Output, Run, decode_loop, prefill
from specpv_jax.sampling import Sampler
from specpv_jax.speculative import verify_tree

# The reference code's OPT-tree (50 nodes per level of 50 x 50 children, gain threshold 0.7): the same nodes
# as our top-k tree with these settings. Its max_depth=10 counts a last level it drafts and then drops.
SPECEXTEND_TREE = SpecConfig(tree_top_k=50, tree_depth=9, tree_nodes=50, tree_threshold=0.7)
# With retrieval the draft prefills the prompt through a sliding window, as the reference does (flash-attn's
# window_size=(512, -1): each token and the 512 before it): a small draft trained on short texts then never
# relates positions further apart than that (its decoding attends to a working cache of about 1.2K positions).
DRAFT_PREFILL_WINDOW = 513


@flax.struct.dataclass
class SpecExtendState:
    """Loop carry: the target's cache, the draft's state, the committed tokens the draft has not
    seen yet (`pending [B, depth + 1]`, first `pending_count [B]` real, the last one the next root)."""

    cache: KVCache
    draft: small.DraftState
    pending: jax.Array
    pending_count: jax.Array
    out: Output
    key: jax.Array


def specextend_step(params, dparams, run: Run, sampler: Sampler, eos: jax.Array,
                    s: SpecExtendState) -> SpecExtendState:
    """The draft takes in the pending tokens and grows a tree, the target verifies it against the full cache and
    commits the accepted path; every `retrieve_every` steps the draft's working cache is chosen again."""
    cfg, dcfg, spec = run.cfg, run.dcfg, run.spec
    draft, logprobs = small.advance(dparams, dcfg, s.draft, s.pending, s.pending_count, run.attention)
    root = jnp.take_along_axis(s.pending, (s.pending_count - 1)[:, None], axis=1)[:, 0]
    tree = small.draft_tree(dparams, dcfg, spec, draft.work, logprobs, root, run.attention)
    last_layer = cfg.num_layers - 1
    live = ~s.out.done
    acc, cache, out, key = verify_tree(params, run, sampler, tree, s.cache, live, s.key,
                                       (last_layer,) if draft.store is not None else ())
    draft = small.DraftState(work=draft.work.keep_finished(live, s.draft.work),
                             store=None if draft.store is None else draft.store.keep_finished(live, s.draft.store))

    if draft.store is not None:
        def retrieve(d):
            deepest = jnp.take_along_axis(acc.path, acc.count[:, None], axis=1)  # [B, 1]
            x = jnp.take_along_axis(out.features[0], deepest[:, :, None], axis=1)  # last layer's input [B, 1, H]
            q = M.layer_queries(params, cfg, last_layer, x, (s.cache.length + acc.count)[:, None])[:, 0]
            return small.retrieve(dcfg, spec, d, q, cache.k[last_layer], cache.length)

        draft = lax.cond((s.out.steps + 1) % spec.retrieve_every == 0, retrieve, lambda d: d, draft)

    emitted = acc.emitted(tree)
    return SpecExtendState(cache=cache, draft=draft, pending=emitted, pending_count=acc.count + 1,
                           out=s.out.append(emitted, acc.count + 1, eos, acc.finite, tree.draft_nan), key=key)


def prefill_spec(spec: SpecConfig) -> SpecConfig:
    """The settings of `spec` that prefill reads (the draft's first working cache, `small.start`), the others at
    their defaults: one compiled prefill serves every tree of a depth and every other mode's budget."""
    return SpecConfig(tree_depth=spec.tree_depth, tree_top_k=1, tree_nodes=1, chunk_tokens=spec.chunk_tokens,
                      draft_chunks=spec.draft_chunks, retrieve_every=spec.retrieve_every)


@stage_factory
def specextend_prefill_fn(run: Run, spec: SpecConfig):
    """Prefills the target and the draft over the prompts; returns (cache, draft state, last logits `[B, V]`).
    `spec`: `prefill_spec`'s."""
    def fn(params, dparams, ids, lengths, cache, draft_cache):
        cache, last, _, _ = prefill(params, run, ids, lengths, cache)
        draft_run = Run(cfg=run.dcfg, out_slots=0, chunk=run.chunk, attention=run.attention)
        draft_cache, _, _, _ = prefill(dparams, draft_run, ids, lengths, draft_cache,
                                       window=DRAFT_PREFILL_WINDOW if spec.draft_chunks else None)
        return cache, small.start(run.dcfg, spec, draft_cache), M.logits(params, run.cfg, last)

    return jax.jit(fn, donate_argnums=(4, 5))


@stage_factory
def specextend_decode_fn(run: Run):
    """Jitted `fn(params, dparams, cache, draft_state, logits, key, sampler, eos, limit) -> (Output, cache,
    draft_state)`: the `specextend` loop from `specextend_prefill_fn`'s results (cache and draft state donated)."""
    def fn(params, dparams, cache, draft_state, logits, key, sampler, eos, limit):
        params, dparams = M.for_decode_loop(params, run.cfg), M.for_decode_loop(dparams, run.dcfg)
        first, out, key = Output.first_token(run, sampler, logits, key, eos, limit)
        b = first.shape[0]
        pending = jnp.zeros((b, run.spec.tree_depth + 1), jnp.int32).at[:, 0].set(first)
        state = SpecExtendState(cache=cache, draft=draft_state, pending=pending,
                                pending_count=jnp.ones((b,), jnp.int32),
                                out=out, key=key)
        state = decode_loop(run, functools.partial(specextend_step, params, dparams, run, sampler, eos), state)
        return state.out, state.cache, state.draft

    return jax.jit(fn, donate_argnums=(2, 3))
