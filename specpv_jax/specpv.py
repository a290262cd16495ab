"""SpecPV: verify most steps against a small partial cache, periodically against the full one.

Each loop step drafts a tree with the EAGLE-3 head, then verifies it in one of
three branches, chosen for the whole batch:

- partial: the tree attends to the partial cache (sink + retrieved blocks +
  recent window + buffer); accepted K/V go into the buffer and the tokens are
  "missing" from the full cache. Taken when every live row has a refreshed
  partial cache, room in its buffer for another tree and (exact mode) nothing
  that must be confirmed first.
- full with missing tokens: the tokens accepted since the last full step are
  fed again, ahead of the new tree, so their K/V in the full cache come from
  full attention; then the partial cache is rebuilt from this step's block
  scores and its buffer emptied.
- full: as above when no row has missing tokens (short contexts: plain `eagle`).

`mode="specpv"` is the paper: partially verified tokens are emitted at once and
never revised. `mode="exact"` holds them back as provisional; the next full
step re-checks them against the full-context target (greedy: argmax; sampling:
speculative sampling with the partial verification's distributions as the
draft's) and truncates at the first disagreement, emitting the target's token
there.

With `SpecConfig(offload=True)` the full cache and its block summaries live in
host memory (`offload`): partial steps never touch them; full steps move each
layer to the device once (`offload.keeper` keeps what the refresh needs) and
write back through `offload.commit_and_refresh`.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from specpv_jax import model as M
from specpv_jax import offload, retrieval, verify
from specpv_jax.cache import BlockSummary, KVCache, blocks_spanned, commit_path, write_tokens
from specpv_jax.config import SpecConfig
from specpv_jax.draft import eagle3
from specpv_jax.host import stage_factory
from specpv_jax.loop import Run, decode_loop, run_if
from specpv_jax.sampling import Sampler, sample_from
from specpv_jax.speculative import EagleState, draft, flat_features, initial_state
from specpv_jax.tree import Tree


# The most full steps exact mode waits before trying partial verification again (see `next_provisional_cap`).
MAX_BACKOFF = 64


@flax.struct.dataclass
class Counters:
    """Per-kind step counts; `*_rows` count live rows verified, `*_accepted` the tokens they accepted (drafted +
    bonus, or a rolled-back row's correction) as far as the output keeps them (to EOS, within max_new_tokens;
    exact mode's partial steps: as far as it would keep them, provisional tokens a later full step may roll back).
    rollbacks: rows whose provisional tokens a full step rejected (exact mode)."""

    full: jax.Array
    partial: jax.Array
    full_rows: jax.Array
    partial_rows: jax.Array
    full_accepted: jax.Array
    partial_accepted: jax.Array
    rollbacks: jax.Array

    @classmethod
    def zeros(cls) -> "Counters":
        z = jnp.zeros((), jnp.int32)
        return cls(z, z, z, z, z, z, z)


@flax.struct.dataclass
class SpecPVState:
    """eagle: the EAGLE loop carry (its cache is the full cache, length = fully verified tokens).

    partial: the partial cache, length = static part + `n_missing`; summary: block
    key extrema of the full cache; ready: `[B]` the partial cache was rebuilt for
    a context above the threshold; missing: `[B, M]` tokens committed since the
    last full step (root first), `n_missing [B]` of them; missing_q: `[B, M, V]`
    the partial distributions that produced each following token (exact
    sampling only, else None); draft_partial: the head's bounded cache
    (`spec.bounded_draft` only, else None), length = static part + pairs since;
    provisional_cap: `[B]` exact mode's limit on provisional tokens before a full
    step (greedy: doubled after a full step confirms all, set to twice the
    confirmed run after a rollback, to 1 after a pause; sampling: planned, see
    below); pause: `[B]` full steps a row still takes before partial verification
    again, set to `backoff` after a rollback that emitted fewer tokens than its
    full step's tree alone would have (sampling: where the plan is no partial step);
    backoff: `[B]` how long the next such pause lasts (doubling while they
    repeat, up to `MAX_BACKOFF`), so a partial cache that keeps disagreeing costs
    about what `eagle` mode does (`next_provisional_cap`).

    Exact mode only (else None): drift: `[B, 2]` the sum and count, over the
    provisional tokens full steps have checked, of how far the partial cache's
    verdict on each was from the full one's. Greedy: |partial margin - full
    margin|, with margins: `[B, M]` (greedy only) each provisional token's
    log-probability margin under the partial verification that chose it
    (`log_prob_margin`); a row whose provisional tokens include one with a margin
    below its mean drift takes a full step next (`is_shaky`, in `must_confirm`).
    Sampling: the token's chance of rejection, 1 - min(1, p/q), from which
    `planned_cap` sets the provisional cap instead of the doubling rule above.
    """

    eagle: EagleState
    partial: KVCache
    summary: BlockSummary
    ready: jax.Array
    missing: jax.Array
    n_missing: jax.Array
    missing_q: jax.Array | None
    draft_partial: KVCache | None
    provisional_cap: jax.Array
    pause: jax.Array
    backoff: jax.Array
    margins: jax.Array | None
    drift: jax.Array | None
    counters: Counters


def _live(st: SpecPVState) -> jax.Array:
    return ~st.eagle.out.done


def bounded_draft(params, dparams, d2t, run: Run, st: SpecPVState) -> tuple[Tree, SpecPVState]:
    """`draft` with the head attending to its bounded cache; the new pairs go into both of its caches."""
    s, dcfg = st.eagle, run.dcfg
    embed = eagle3.embed_table(dparams, params)
    start = s.draft_cache.length
    bounded, head_state, k, v = eagle3.advance(dparams, dcfg, embed, st.draft_partial, s.pair_feats, s.pair_tokens,
                                               s.pair_count, position=start)
    full = s.draft_cache.replace(k=write_tokens(s.draft_cache.k, 0, k, start),
                                 v=write_tokens(s.draft_cache.v, 0, v, start), length=start + s.pair_count)
    tree = eagle3.draft_tree(dparams, dcfg, run.spec, embed, d2t, bounded, head_state, s.root,
                             position=full.length)
    return tree, st.replace(eagle=s.replace(draft_cache=full), draft_partial=bounded)


def draft_step(params, dparams, d2t, run: Run, st: SpecPVState, use_partial: jax.Array) -> tuple[Tree, SpecPVState]:
    """The step's tree, drafted once before the verification branch, and the state with the head's caches
    after the pairs committed last step (finished rows keep their lengths). With `bounded_draft` the head
    attends to its bounded cache when `use_partial` (a scalar bool: this step verifies against the partial
    cache), else to its full cache."""
    def full_draft(st):
        tree, draft_cache = draft(params, dparams, d2t, run, st.eagle)
        return tree, st.replace(eagle=st.eagle.replace(draft_cache=draft_cache))

    if st.draft_partial is None:
        tree, new = full_draft(st)
    else:  # the tree starts empty; exactly one of the two drafts runs and fills it
        empty = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(full_draft, st)[0])
        tree, new = run_if(use_partial, lambda c: bounded_draft(params, dparams, d2t, run, c[1]),
                           run_if(~use_partial, lambda c: full_draft(c[1]), (empty, st)))
    draft_cache = new.eagle.draft_cache.keep_finished(_live(st), st.eagle.draft_cache)
    return tree, new.replace(eagle=new.eagle.replace(draft_cache=draft_cache))


def partial_step(params, run: Run, sampler: Sampler, eos, st: SpecPVState, tree: Tree) -> SpecPVState:
    """Verify `tree` against the partial cache; accepted tokens go to its buffer, not the full cache."""
    s, cfg = st.eagle, run.cfg
    root_pos = s.cache.length + st.n_missing
    out = M.forward(params, cfg, tree.tokens, root_pos[:, None] + tree.depth, st.partial, tree.mask,
                    capture_layers=run.dcfg.feature_layers, attention=run.attention)
    logits = M.logits(params, cfg, out.hidden)
    key, sub = jax.random.split(s.key)
    acc = verify.accept(tree, logits, sampler, sub)
    live = _live(st)
    count = acc.count + 1
    partial = commit_path(out.cache, acc.path, acc.count)
    partial = partial.keep_finished(live, st.partial)

    # Record root + accepted tokens as missing from the full cache (and, for exact sampling,
    # the partial distribution at each of them, which produced the token after it).
    slot = jnp.arange(acc.path.shape[1])[None, :]
    dest = jnp.where((slot < count[:, None]) & live[:, None], st.n_missing[:, None] + slot, st.missing.shape[1])
    rows = jnp.arange(dest.shape[0])[:, None]
    missing = st.missing.at[rows, dest].set(jnp.take_along_axis(tree.tokens, acc.path, axis=1), mode="drop")
    margins = st.margins
    if margins is not None:  # the logits at path[i] chose emitted[i]: the next node's token, or the bonus
        margin = log_prob_margin(jnp.take_along_axis(logits, acc.path[:, :, None], axis=1), acc.emitted(tree))
        margins = margins.at[rows, dest].set(margin, mode="drop")
    missing_q = st.missing_q
    if missing_q is not None:
        q = sampler.probs(jnp.take_along_axis(logits, acc.path[:, :, None], axis=1))
        missing_q = missing_q.at[rows, dest].set(q, mode="drop")

    emitted, feats = acc.emitted(tree), acc.along_path(flat_features(out.features))
    out_buf = (s.out.append(emitted, count, eos, acc.finite, tree.draft_nan) if run.mode == "specpv"
               else s.out.count_draft_nan(tree.draft_nan))
    kept = (out_buf.num_out - s.out.num_out if run.mode == "specpv"  # exact: provisional, after the others
            else s.out.kept(emitted, count, eos, ahead=st.n_missing)[0])
    c = st.counters
    return st.replace(
        eagle=s.replace(pair_feats=feats, pair_tokens=emitted, pair_count=count, root=acc.bonus, out=out_buf,
                        key=key),
        partial=partial, missing=missing, missing_q=missing_q, margins=margins,
        n_missing=jnp.where(live, st.n_missing + count, st.n_missing),
        counters=c.replace(partial=c.partial + 1, partial_rows=c.partial_rows + live.sum(),
                           partial_accepted=c.partial_accepted + kept.sum()))


def _full_inputs(tree: Tree, missing: jax.Array, n_missing: jax.Array, full_length: jax.Array):
    """Tokens, positions, mask and scoring mask for [missing tokens (M slots), tree] in one pass.

    Missing tokens are causal among themselves; tree nodes see every real missing
    token and their own ancestors; empty missing slots are seen by no one.
    """
    b, m = missing.shape
    n = tree.size
    slot = jnp.arange(m)
    real = slot[None, :] < n_missing[:, None]  # [B, M]
    positions = jnp.concatenate([full_length[:, None] + slot[None, :],
                                 (full_length + n_missing)[:, None] + tree.depth], axis=1)
    eye = jnp.eye(m, dtype=bool)[None]
    mm = (jnp.tril(jnp.ones((m, m), bool))[None] & real[:, None, :]) | eye
    mask = jnp.concatenate([
        jnp.concatenate([mm, jnp.zeros((b, m, n), bool)], axis=2),
        jnp.concatenate([jnp.broadcast_to(real[:, None, :], (b, n, m)), tree.mask], axis=2)], axis=1)
    score_mask = jnp.concatenate([jnp.zeros((b, m), bool), jnp.ones((b, n), bool)], axis=1)
    return jnp.concatenate([missing, tree.tokens], axis=1), positions, mask, score_mask


def check_provisional(sampler: Sampler, logits: jax.Array, provisional: jax.Array, n: jax.Array,
                      q: jax.Array | None, key: jax.Array):
    """Re-checks provisional tokens against full-context logits (exact mode).

    logits: `[B, M, V]`, slot j predicting `provisional[:, j]`; the first `n [B]`
    are real. Greedy: keep while they equal the argmax. Sampling: speculative
    sampling with the first M of `q [B, M', V]` (M' >= M) as the draft
    distribution (accept with min(1, p/q), else draw from norm(max(p - q, 0))),
    drawing for all M' slots: a token's draws do not depend on M. Returns
    (rejected `[B]`, index of the first rejected token `[B]`, the token to emit
    in its place `[B]`, each token's chance of rejection `[B, M]`: 1 - min(1, p/q),
    greedy 0 or 1, meaningful in the first `n` slots); the second and third mean
    something only where rejected.
    """
    real = jnp.arange(provisional.shape[1])[None, :] < n[:, None]
    if sampler.greedy:
        target = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        differs = target != provisional
        rejected, first = _first_bad(real & differs)
        correction = jnp.take_along_axis(target, first[:, None], axis=1)[:, 0]
        return rejected, first, correction, differs.astype(jnp.float32)
    m = provisional.shape[1]
    p = sampler.probs(logits)
    k_accept, k_resample = jax.random.split(key)
    uniform = jax.random.uniform(k_accept, q.shape[:2])[:, :m]
    q = q[:, :m]
    px = jnp.take_along_axis(p, provisional[..., None], axis=2)[..., 0]
    qx = jnp.take_along_axis(q, provisional[..., None], axis=2)[..., 0]
    rejected, first = _first_bad(real & ~(uniform * qx < px))
    p_first, q_first = (jnp.take_along_axis(x, first[:, None, None], axis=1)[:, 0] for x in (p, q))
    residual = jnp.maximum(p_first - q_first, 0.0)
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p_first)
    chance = 1.0 - jnp.minimum(px / jnp.maximum(qx, jnp.finfo(jnp.float32).tiny), 1.0)
    return rejected, first, sample_from(residual, k_resample), chance


def log_prob_margin(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """`[...]` float32: log p(token) - the largest log p of any other token under `logits [..., V]` (a
    difference of logits): positive where the token is the argmax, and the larger, the more the logits must
    move to change a greedy choice."""
    chosen = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    # A masked max, not a top-2 (a sort on some backends): a fused reduction on GPUs; XLA CPU materializes the
    # masked logits, which `memory.estimate` counts.
    vocab = jnp.arange(logits.shape[-1])
    other = jnp.where(vocab == tokens[..., None], -jnp.inf, logits).max(axis=-1)
    return chosen.astype(jnp.float32) - other.astype(jnp.float32)


def is_shaky(margin: jax.Array, valid: jax.Array, drift: jax.Array) -> jax.Array:
    """`[B]` whether a greedy exact row should confirm now: one of its provisional tokens (`margin [B, N]`
    where `valid`) has a margin below the row's mean drift between partial and full margins (`drift [B, 2]`:
    sum, count), or any new token when none was measured yet. The full cache disagrees where the partial
    cache's error moves the margin past zero: on the demo models at 4K with a 1024-token budget, 39% of the
    tokens with margins below 0.1 disagreed and none above 1 (BENCHMARKS.md); partial steps past such a token
    are likely wasted."""
    mean_drift = jnp.where(drift[:, 1] > 0, drift[:, 0] / jnp.maximum(drift[:, 1], 1.0), jnp.inf)
    return (valid & (margin < mean_drift[:, None])).any(axis=1)


def _first_bad(bad: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`bad [B, M]` -> (any bad `[B]`, index of the first `[B]`)."""
    return bad.any(axis=1), jnp.argmax(bad, axis=1)


def full_step(params, run: Run, sampler: Sampler, eos, st: SpecPVState, tree: Tree,
              refeed: int) -> SpecPVState:
    """Verify `tree` against the full cache, re-feeding the missing tokens in `refeed` slots (at least any live
    row's `n_missing`; 0: none are missing), then refresh."""
    s, spec = st.eagle, run.spec
    live = _live(st)
    full_len = s.cache.length
    m = refeed
    with_missing = m > 0
    missing = st.missing[:, :m]
    n_missing = st.n_missing if with_missing else jnp.zeros_like(st.n_missing)
    tokens, positions, mask, score_mask = _full_inputs(tree, missing, n_missing, full_len)
    summary_blocks = blocks_spanned(m + tree.size, spec.block_size)  # the step writes [full_len, + m + N)
    keep = offload.keeper(full_len, spec, summary_blocks, s.cache.max_len) if run.offload else None
    out = M.forward(params, run.cfg, tokens, positions, s.cache, mask, capture_layers=run.dcfg.feature_layers,
                    attention=run.attention, summary=st.summary, score_mask=score_mask,
                    committed=n_missing if with_missing else None, keep=keep)
    logits = M.logits(params, run.cfg, out.hidden)
    key, k_tree, k_check = jax.random.split(s.key, 3)
    acc = verify.accept(tree, logits[:, m:], sampler, k_tree)
    features = flat_features(out.features)
    emitted, pair_feats, count, root = acc.emitted(tree), acc.along_path(features[:, m:]), acc.count + 1, acc.bonus
    cache_len, draft_len = full_len + n_missing + count, s.draft_cache.length
    out_tokens, out_count = emitted, count
    rejected, first = jnp.zeros_like(live), jnp.zeros_like(n_missing)
    drift = st.drift

    if run.mode == "exact" and with_missing:  # the tokens after missing[0] (and the root) were partially verified
        provisional = jnp.where(jnp.arange(m)[None, :] + 1 < n_missing[:, None], jnp.roll(missing, -1, axis=1),
                                tree.tokens[:, :1])
        rejected, first, correction, chance = check_provisional(sampler, logits[:, :m], provisional, n_missing,
                                                                st.missing_q, k_check)
        rejected &= live
        checked = (jnp.arange(m)[None, :] < n_missing[:, None]) & live[:, None]
        error = (jnp.abs(st.margins[:, :m] - log_prob_margin(logits[:, :m], provisional)) if sampler.greedy
                 else chance)
        drift = st.drift + jnp.stack([jnp.where(checked, error, 0.0).sum(1), checked.sum(1).astype(jnp.float32)],
                                     axis=1)
        root = jnp.where(rejected, correction, root)
        # A rollback keeps missing[0..first] and emits the target's token after them instead of the rest.
        emitted = jnp.where(rejected[:, None], jnp.zeros_like(emitted).at[:, 0].set(correction), emitted)
        first_feats = jnp.take_along_axis(features, first[:, None, None], axis=1)
        pair_feats = jnp.where(rejected[:, None, None], jnp.zeros_like(pair_feats).at[:, :1].set(first_feats),
                               pair_feats)
        count = jnp.where(rejected, 1, count)
        cache_len = jnp.where(rejected, full_len + first + 1, cache_len)
        draft_len = jnp.where(rejected, full_len + first, draft_len)
        out_tokens, out_count = _exact_emission(provisional, jnp.where(rejected, first, n_missing), emitted, count)

    # Missing tokens already sit at full_len + [0, n_missing); the tree path follows them. (Offloaded: nothing
    # was written yet; `_refresh` writes the K/V.)
    cache = s.cache if run.offload else commit_path(out.cache, acc.path, jnp.where(rejected, -1, acc.count),
                                                    src=full_len + m, dst=full_len + n_missing)
    cache = cache.replace(length=jnp.where(live, cache_len, full_len))
    draft_cache = s.draft_cache.replace(length=draft_len)
    cache, summary, partial, draft_partial = _refresh(run, st, out, acc.path, cache, draft_cache, n_missing, m,
                                                      summary_blocks)
    cap, pause, backoff = st.provisional_cap, st.pause, st.backoff
    if run.mode == "exact" and sampler.greedy:
        cap, pause, backoff = next_provisional_cap(cap, pause, backoff, n_missing, rejected, first, acc.count + 1,
                                                   spec.max_missing)
    elif run.mode == "exact":
        cap, pause, backoff = next_planned_cap(cap, pause, backoff, n_missing, drift, _tokens_per_step(st.counters),
                                               spec.full_step_cost, spec.max_missing)
    finite = jnp.isfinite(logits).all()  # all of them: the missing tokens' logits decide exact mode's rollbacks
    out_buf = s.out.append(out_tokens, out_count, eos, finite, tree.draft_nan)
    # This step's own tokens kept: those appended after the confirmed provisional ones.
    kept = jnp.maximum(out_buf.num_out - s.out.num_out - (out_count - count), 0)
    c = st.counters
    return st.replace(
        eagle=EagleState(cache=cache, draft_cache=draft_cache, pair_feats=pair_feats, pair_tokens=emitted,
                         pair_count=count, root=root, out=out_buf, key=key),
        partial=partial, summary=summary, ready=_ready(cache, draft_cache, draft_partial, spec),
        draft_partial=draft_partial,
        n_missing=jnp.where(live, 0, st.n_missing), provisional_cap=cap, pause=pause, backoff=backoff,
        drift=drift,
        counters=c.replace(full=c.full + 1, full_rows=c.full_rows + live.sum(),
                           full_accepted=c.full_accepted + kept.sum(),
                           rollbacks=c.rollbacks + rejected.sum()))


def _ready(cache: KVCache, draft_cache: KVCache, draft_partial: KVCache | None, spec: SpecConfig) -> jax.Array:
    """`[B]` whether the partial caches just rebuilt hold a full retrieval budget: the target's past the
    threshold, and the head's bounded one too (its cache lags the target's by the tokens just committed; one
    block short, it was filled with a sink block twice)."""
    ready = cache.length > spec.partial_threshold
    return ready if draft_partial is None else ready & (draft_cache.length > spec.partial_threshold)


def _refresh(run: Run, st: SpecPVState, out: M.ForwardOut, path: jax.Array, cache: KVCache,
             draft_cache: KVCache, n_missing: jax.Array, m: int, summary_blocks: int):
    """After a full step committed (`cache`, lengths final): the `summary_blocks` block summaries from the one
    holding the old length, the partial cache rebuilt from its block scores, and the head's bounded cache.
    Offloaded, this also writes the committed K/V (the re-fed tokens, then the accepted `path`) to the host
    cache, from what the step's forward kept (`offload.keeper`)."""
    spec, full_len = run.spec, st.eagle.cache.length
    blocks = retrieval.select_blocks(out.block_scores, cache.length, spec)
    if run.offload:
        new_k, new_v = (offload.committed(x, path, n_missing, m) for x in out.new_kv)
        cache, summary, partial = offload.commit_and_refresh(cache, out.kept, new_k, new_v, full_len, st.summary,
                                                             summary_blocks, st.partial, blocks, spec)
    else:
        summary = st.summary.update(cache, full_len, summary_blocks)
        partial = retrieval.refresh(st.partial, cache, blocks, spec)
    draft_partial = st.draft_partial
    if draft_partial is not None:
        draft_partial = refresh_draft_partial(draft_partial, draft_cache, out.block_scores, spec)
    return cache, summary, partial, draft_partial


def refresh_draft_partial(draft_partial: KVCache, draft_cache: KVCache, block_scores: jax.Array,
                          spec: SpecConfig) -> KVCache:
    """The head's bounded cache rebuilt from its full cache: sink + the blocks the target's last layer scored
    best (`block_scores [L, B, Hkv, NB]`, mapped onto the head's KV heads) + the head's recent window.

    The blocks are chosen before the head's own window, which ends at its cache length: that lags the
    target's by the tokens the head has not seen yet, so the target's blocks could overlap it.
    """
    target_kv_heads, draft_kv_heads = block_scores.shape[2], draft_cache.k.shape[2]
    kv_map = jnp.arange(draft_kv_heads) * target_kv_heads // draft_kv_heads  # the head's KV heads -> the target's
    blocks = retrieval.select_blocks(block_scores[-1:, :, kv_map], draft_cache.length, spec)
    return retrieval.refresh(draft_partial, draft_cache, blocks, spec)


def next_provisional_cap(cap, pause, backoff, n_missing, rejected, first, tree_count, max_missing: int):
    """Exact mode's `(provisional_cap, pause, backoff)` `[B]` after a full step that checked `n_missing`
    provisional tokens and accepted `tree_count` of its tree's (bonus included): all confirmed, the cap doubles;
    the first `first` confirmed, twice that, unless the `first + 1` tokens emitted are fewer than `tree_count`:
    then partial steps pause for `backoff` full steps (after which one partial step is tried: cap 1), and the
    next such pause doubles. A row with nothing to check counts its pause down."""
    checked = n_missing > 0
    # A rollback that emits fewer tokens than its full step's tree would have alone: a loss whatever a partial
    # step costs (and the tree's acceptance is the best estimate at hand of what eagle mode would emit).
    wasted = checked & rejected & (first + 1 < tree_count)
    cap = jnp.where(~checked, cap, jnp.where(~rejected, jnp.minimum(2 * cap, max_missing),
                                             jnp.where(wasted, 1, jnp.maximum(2 * first, 1))))
    return (cap, *next_pause(pause, backoff, checked, wasted))


def next_pause(pause, backoff, checked, stop):
    """`(pause, backoff)` `[B]` after a full step: `stop` rows pause partial steps for `backoff` full steps and
    double the next pause (up to `MAX_BACKOFF`); other rows that checked provisional tokens reset it to 1, and a
    row with nothing to check counts its pause down."""
    pause = jnp.where(stop, backoff, jnp.maximum(pause - 1, 0))
    backoff = jnp.where(stop, jnp.minimum(2 * backoff, MAX_BACKOFF), jnp.where(checked, 1, backoff))
    return pause, backoff


def mean_chance(drift: jax.Array) -> jax.Array:
    """`[B]` sampling exact mode's estimate of a provisional token's chance of rejection: the mean over the
    tokens checked so far (`drift [B, 2]`: sum, count), pulled towards 1/4 by a prior worth 4 tokens so that a
    row's first phases are short."""
    return (drift[:, 0] + 1.0) / (drift[:, 1] + 4.0)


def next_planned_cap(cap, pause, backoff, n_missing, drift, tau, cost: float, max_missing: int):
    """Sampling exact mode's `(provisional_cap, pause, backoff)` `[B]` after a full step that checked `n_missing`
    provisional tokens: the cap `planned_cap` gives for the row's mean chance of rejection (`drift`), at least 1;
    where it gives 0, partial steps pause as after a losing rollback (`next_pause`). `tau`: a scalar, the tokens
    a step keeps."""
    checked = n_missing > 0
    best = planned_cap(mean_chance(drift), tau, cost, max_missing)
    cap = jnp.where(checked, jnp.maximum(best, 1), cap)
    return (cap, *next_pause(pause, backoff, checked, checked & (best == 0)))


def _tokens_per_step(c: Counters) -> jax.Array:
    """Tokens a verification step keeps, on average over the batch's steps so far (1 before any)."""
    steps = (c.partial_rows + c.full_rows).astype(jnp.float32)
    return jnp.maximum((c.partial_accepted + c.full_accepted) / jnp.maximum(steps, 1.0), 1.0)


def planned_cap(chance: jax.Array, tau: jax.Array, cost: float, max_missing: int) -> jax.Array:
    """`[B]` int32: the provisional tokens a phase should hold before its full step, for rows whose tokens are
    each rejected, independently, with probability `chance [B]`, where a step keeps `tau` tokens (a scalar, at
    least 1) and a full step costs `cost` partial ones; 0 where full steps alone do best.

    A phase of j partial steps holds n = j * tau tokens; the full step keeps s + s^2 + ... + s^n of them
    (s = 1 - chance), then its own tau where all survived, else its correction: j + cost for that. The cap is
    the n of the j that keeps the most tokens per unit cost.
    """
    steps = jnp.arange(max_missing + 1, dtype=jnp.float32)  # tau >= 1: more steps than this only add cost
    n = jnp.minimum(steps * tau, max_missing)[None, :]
    chance = chance[:, None]
    log_s = jnp.log1p(-chance)  # s = 1 - chance, kept exact for tiny chances
    survive = jnp.exp(n * log_s)
    kept = jnp.where(chance > 0, (1.0 - chance) * -jnp.expm1(n * log_s) / jnp.where(chance > 0, chance, 1.0), n)
    rate = (kept + survive * tau + (1.0 - survive)) / (steps + cost)
    best = jnp.argmax(rate, axis=1)
    return jnp.where(best > 0, jnp.maximum(jnp.round(n[0, best]), 1.0), 0.0).astype(jnp.int32)


def _exact_emission(provisional, n_prov, emitted, count):
    """Confirmed provisional tokens followed by this step's tokens, per row: `[B, M + D + 1]`, counts."""
    b, m = provisional.shape
    slot = jnp.arange(m + emitted.shape[1])[None, :]
    from_tree = jnp.take_along_axis(emitted, jnp.clip(slot - n_prov[:, None], 0, emitted.shape[1] - 1), axis=1)
    from_prov = jnp.take_along_axis(provisional, jnp.clip(slot, 0, m - 1), axis=1)
    return jnp.where(slot < n_prov[:, None], from_prov, from_tree), n_prov + count


def must_confirm(eos, st: SpecPVState) -> jax.Array:
    """Exact mode: rows whose provisional tokens could end generation, or reached their cap, paused rows and
    shaky ones (greedy: `is_shaky`) need a full step."""
    out = st.eagle.out
    slot = jnp.arange(st.missing.shape[1])[None, :]
    has_eos = (jnp.isin(st.missing, eos) & (slot < st.n_missing[:, None])).any(1) | jnp.isin(st.eagle.root, eos)
    at_cap = st.n_missing >= st.provisional_cap
    confirm = has_eos | (out.num_out + st.n_missing >= out.limit) | at_cap | (st.pause > 0)
    if st.margins is None:
        return confirm
    return confirm | is_shaky(st.margins, slot < st.n_missing[:, None], st.drift)


def specpv_step(params, dparams, d2t, run: Run, sampler: Sampler, eos, st: SpecPVState) -> SpecPVState:
    """Picks partial or full verification for the whole batch and runs it."""
    live = _live(st)
    room = st.n_missing + run.spec.tree_nodes + 1 <= run.spec.buffer_size
    can_partial = st.ready & room
    if run.mode == "exact":
        can_partial &= ~must_confirm(eos, st)
    use_partial = jnp.all(can_partial | ~live)
    sizes = refeed_sizes(run.spec, run.mode)
    need = jnp.where(live, st.n_missing, 0).max()  # <= spec.max_missing, the last size
    branch = jnp.where(use_partial, 0, 1 + jnp.searchsorted(jnp.asarray(sizes), need))
    # Every branch verifies the same draft: made once here, so the compiled loop holds one copy of the head.
    tree, st = draft_step(params, dparams, d2t, run, st, use_partial)
    args = (params, run, sampler, eos)
    branches = [functools.partial(partial_step, *args)] + [functools.partial(full_step, *args, refeed=k)
                                                            for k in sizes]
    for i, verify_step in enumerate(branches):  # exactly one runs; `run_if` keeps the caches in place
        st = run_if(branch == i, lambda s, verify_step=verify_step: verify_step(s, tree), st)
    return st


def refeed_sizes(spec: SpecConfig, mode: str) -> tuple[int, ...]:
    """The slot counts full steps re-feed missing tokens in, ascending, each a branch of the compiled loop: a
    full step takes the first that holds every live row's (0: none has any, the tree alone).

    `specpv` takes a full step once its buffer cannot take another tree, so it
    re-feeds about `max_missing` tokens. `exact` mode's full steps often come
    after one partial step or two (at most `tree_depth + 1` tokens each): it also
    has a branch for one step's, not to verify up to twice the rows it needs.
    """
    one_step = spec.tree_depth + 1
    if mode == "exact" and one_step < spec.max_missing:
        return (0, one_step, spec.max_missing)
    return (0, spec.max_missing)


@stage_factory
def specpv_decode_fn(run: Run):
    """The jitted decode loop: (out, counters, full cache, draft cache). With `run.offload`, `cache` is in host
    memory and a last argument, `summary` (`offload.empty_summary`, host memory), receives its block
    summaries, returned last."""
    def fn(params, dparams, d2t, cache, draft_cache, logits, last_feats, key, sampler, eos, limit, summary=None):
        params = M.for_decode_loop(params, run.cfg)
        spec = run.spec
        b = cache.length.shape[0]
        m = spec.max_missing
        exact = run.mode == "exact"
        store_q = exact and not sampler.greedy
        # Greedy exact mode confirms early after a shaky token; a sampled token's risk is not in its margin.
        by_margin = exact and sampler.greedy
        # Sampling exact mode's first cap: what the prior alone plans for a step keeping 1 token, at least 1 (a
        # cap of 0 would never measure the partial cache).
        cap = m if sampler.greedy or not exact else jnp.maximum(
            planned_cap(mean_chance(jnp.zeros((1, 2))), 1.0, spec.full_step_cost, m)[0], 1)
        st = SpecPVState(
            eagle=initial_state(run, cache, draft_cache, logits, last_feats, key, sampler, eos, limit),
            partial=retrieval.empty_partial(cache, spec),
            summary=offload.summarize(cache, summary) if run.offload else BlockSummary.of(cache, spec.block_size),
            ready=jnp.zeros((b,), bool), missing=jnp.zeros((b, m), jnp.int32), n_missing=jnp.zeros((b,), jnp.int32),
            missing_q=jnp.zeros((b, m, run.cfg.vocab_size), jnp.float32) if store_q else None,
            # The head's buffer also holds the last full step's pairs: room for one more path.
            draft_partial=retrieval.empty_partial(draft_cache, spec, extra=spec.tree_depth + 1)
            if spec.bounded_draft else None,
            provisional_cap=jnp.full((b,), cap, jnp.int32), pause=jnp.zeros((b,), jnp.int32),
            backoff=jnp.ones((b,), jnp.int32),
            margins=jnp.zeros((b, m), jnp.float32) if by_margin else None,
            drift=jnp.zeros((b, 2), jnp.float32) if exact else None,
            counters=Counters.zeros())
        step = functools.partial(specpv_step, params, dparams, d2t, run, sampler, eos)
        st = decode_loop(run, step, st, lambda s: s.eagle.out)
        if run.offload:  # returned so that the donated buffer holds it
            return st.eagle.out, st.counters, st.eagle.cache, st.eagle.draft_cache, st.summary
        return st.eagle.out, st.counters, st.eagle.cache, st.eagle.draft_cache

    return jax.jit(fn, donate_argnums=(3, 4, 11) if run.offload else (3, 4))
