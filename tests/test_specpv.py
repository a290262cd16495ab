"""SpecPV: block summaries and retrieval against numpy, the partial cache, and the specpv / exact modes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specpv_jax as sj
from sampling_stats import chi_square_pvalue, teacher_forced_pvalues
from specpv_jax import model as M
from specpv_jax import hlo, retrieval
from specpv_jax.cache import BlockSummary, KVCache
from specpv_jax.demo import demo_prompt
from specpv_jax.loop import Output
from specpv_jax.sampling import Sampler
from specpv_jax import specpv
from specpv_jax.specpv import (MAX_BACKOFF, is_shaky, log_prob_margin, next_planned_cap, next_provisional_cap,
                               planned_cap)
from test_eagle import make_head, make_target

BLOCK = 16


def small_spec(retrieval_tokens=64, window=32, sink=32, **tree) -> sj.SpecConfig:
    tree = {"tree_depth": 3, "tree_top_k": 3, "tree_nodes": 8, **tree}
    return sj.SpecConfig(sink_tokens=sink, retrieval_tokens=retrieval_tokens, window_tokens=window, **tree)


def random_cache(rng, layers=2, batch=2, heads=2, size=512, dim=8, lengths=(300, 170)) -> KVCache:
    cache = KVCache.empty(layers, batch, heads, size, dim, jnp.float32)
    k = jnp.asarray(rng.standard_normal(cache.k.shape), jnp.float32)
    v = jnp.asarray(rng.standard_normal(cache.v.shape), jnp.float32)
    return cache.replace(k=k, v=v, length=jnp.asarray(lengths, jnp.int32))


def test_block_summaries_match_numpy():
    rng = np.random.default_rng(0)
    cache = random_cache(rng)
    summary = BlockSummary.of(cache, BLOCK)
    k = np.asarray(cache.k)
    for b, n in enumerate(np.asarray(cache.length)):
        for j in range(cache.max_len // BLOCK):
            keys = k[:, b, :, j * BLOCK: min((j + 1) * BLOCK, n)]
            want_max = keys.max(2) if keys.shape[2] else 0 * k[:, b, :, 0]
            want_min = keys.min(2) if keys.shape[2] else 0 * k[:, b, :, 0]
            np.testing.assert_array_equal(np.asarray(summary.kmax[:, b, :, j]), want_max)
            np.testing.assert_array_equal(np.asarray(summary.kmin[:, b, :, j]), want_min)
    # Incremental updates after the cache grows (as commits do) equal a fresh summary.
    grown = cache.replace(length=cache.length + jnp.array([45, 3]))
    np.testing.assert_array_equal(np.asarray(summary.update(grown, cache.length, 5).kmax),
                                  np.asarray(BlockSummary.of(grown, BLOCK).kmax))


@pytest.mark.parametrize("counts", [(45, 3), (0, 40), (16, 1)])
def test_folding_new_keys_into_a_layers_summary_equals_summarizing_them(counts):
    """What a full step scores blocks with: the summary of the last full step with the re-fed tokens' keys
    folded in equals the summary of the cache holding them (blocks mid-way, empty before, or untouched)."""
    from specpv_jax.cache import fold_keys, write_all_layers

    rng = np.random.default_rng(1)
    cache = random_cache(rng, lengths=(300, 176))  # row 1 ends on a block boundary
    summary = BlockSummary.of(cache, BLOCK)
    layers, batch, heads, _, dim = cache.k.shape
    new_keys = jnp.asarray(rng.standard_normal((layers, batch, heads, 48, dim)), jnp.float32)  # the first `counts`
    starts, counts = cache.length, jnp.asarray(counts, jnp.int32)                              # are committed
    want = BlockSummary.of(cache.replace(k=write_all_layers(cache.k, new_keys, starts), length=starts + counts), BLOCK)
    for layer in range(cache.k.shape[0]):
        kmax, kmin = fold_keys(summary.kmax[layer], summary.kmin[layer], new_keys[layer], starts, counts, BLOCK)
        np.testing.assert_array_equal(np.asarray(kmax), np.asarray(want.kmax[layer]))
        np.testing.assert_array_equal(np.asarray(kmin), np.asarray(want.kmin[layer]))


def test_full_step_scores_blocks_with_the_re_fed_tokens_keys():
    """A full step's block scores count the re-fed tokens' keys (committed, not yet summarized): the scores
    equal those from summaries of the cache holding them, unlike the stale summaries' (a window shorter than
    those tokens makes their blocks candidates)."""
    target = make_target(16, layers=2)
    cfg, n, width, committed = target.cfg, 90, 10, jnp.asarray([6, 9], jnp.int32)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 16, (2, n + width)), jnp.int32)
    prefix = M.forward(target.params, cfg, ids[:, :n], jnp.broadcast_to(jnp.arange(n), (2, n)),
                       KVCache.for_model(cfg, 2, 256)).cache.replace(length=jnp.full((2,), n, jnp.int32))
    new_ids, positions, mask = ids[:, n:], n + jnp.broadcast_to(jnp.arange(width), (2, width)), None
    score_mask = jnp.ones((2, width), bool)
    out = M.forward(target.params, cfg, new_ids, positions, prefix, mask, summary=BlockSummary.of(prefix, BLOCK),
                    score_mask=score_mask, committed=committed)
    grown = out.cache.replace(length=prefix.length + committed)  # what the summaries see after the commit
    want = M.forward(target.params, cfg, new_ids, positions, prefix, mask, summary=BlockSummary.of(grown, BLOCK),
                     score_mask=score_mask)
    np.testing.assert_allclose(np.asarray(out.block_scores), np.asarray(want.block_scores), rtol=1e-6, atol=1e-6)
    stale = M.forward(target.params, cfg, new_ids, positions, prefix, mask, summary=BlockSummary.of(prefix, BLOCK),
                      score_mask=score_mask)
    assert not np.allclose(np.asarray(stale.block_scores[:, :, :, n // BLOCK]),
                           np.asarray(want.block_scores[:, :, :, n // BLOCK]))


def test_full_steps_fold_the_re_fed_tokens_keys(monkeypatch):
    """full_step passes the re-fed tokens' count to the scoring forward (the test above covers the scoring)."""
    from specpv_jax import host

    target = make_target(16)
    seen, forward = [], M.forward

    def recording(*args, summary=None, committed=None, **kwargs):
        if summary is not None:
            seen.append(committed is not None)
        return forward(*args, summary=summary, committed=committed, **kwargs)

    monkeypatch.setattr(specpv.M, "forward", recording)
    host._EXECUTABLES.clear()  # traced afresh
    spec = sj.SpecConfig(sink_tokens=16, retrieval_tokens=32, window_tokens=32, tree_depth=2, tree_top_k=2,
                         tree_nodes=3)
    out = sj.generate(target, np.arange(200) % 16, 12, draft=make_head(target), mode="specpv", spec=spec,
                      eos_token_ids=())
    host._EXECUTABLES.clear()
    assert out.stats["partial_verifications"] > 0
    assert sorted(seen) == [False, True]  # the tree-only full step has nothing to fold; the re-feeding one has


def numpy_select(q, kmax, kmin, length, spec):
    """SpecPV's quest selector in plain numpy, for one layer: [B, Hkv, n_ret] sorted block ids."""
    b, t, hq, d = q.shape
    hkv = kmax.shape[1]
    g = hq // hkv
    out = []
    for row in range(b):
        heads = []
        for h in range(hkv):
            qh = q[row, :, h * g:(h + 1) * g].reshape(-1, d)  # the group's heads x tokens
            s = np.maximum(qh @ kmax[row, h].T, qh @ kmin[row, h].T).mean(0)
            first, end = spec.sink_tokens // BLOCK, (length[row] - spec.window_tokens) // BLOCK
            cand = np.arange(first, end)
            best = cand[np.argsort(-s[cand], kind="stable")[: spec.retrieval_tokens // BLOCK]]
            heads.append(np.sort(best))
        out.append(heads)
    return np.array(out)


def test_retrieval_matches_numpy():
    rng = np.random.default_rng(1)
    spec = small_spec()
    cache = random_cache(rng, lengths=(300, 200))
    summary = BlockSummary.of(cache, BLOCK)
    q = rng.standard_normal((2, 5, 4, 8)).astype(np.float32)  # 4 query heads over 2 KV heads
    scores = jnp.stack([retrieval.block_scores(jnp.asarray(q), summary.kmax[i], summary.kmin[i],
                                               jnp.ones((2, 5), bool)) for i in range(2)])
    chosen = np.asarray(retrieval.select_blocks(scores, cache.length, spec))
    for layer in range(2):
        want = numpy_select(q, np.asarray(summary.kmax[layer]), np.asarray(summary.kmin[layer]),
                            np.asarray(cache.length), spec)
        np.testing.assert_array_equal(chosen[layer], want)
    # The rebuilt partial cache holds exactly sink + those blocks + the window, in order.
    partial = retrieval.refresh(retrieval.empty_partial(cache, spec), cache, jnp.asarray(chosen), spec)
    k = np.asarray(cache.k)
    for b, n in enumerate(np.asarray(cache.length)):
        slots = np.concatenate([np.arange(spec.sink_tokens),
                                (chosen[0, b, 1][:, None] * BLOCK + np.arange(BLOCK)).ravel(),
                                np.arange(n - spec.window_tokens, n)])
        np.testing.assert_array_equal(np.asarray(partial.k[0, b, 1, : spec.static_tokens]), k[0, b, 1, slots])
    assert (np.asarray(partial.length) == spec.static_tokens).all()


def test_partial_cache_holding_every_token_reproduces_full_attention():
    """When sink + retrieved + window is the whole context, verifying against it is exact."""
    target = make_target(16, seed=9)
    spec = small_spec()
    length = spec.static_tokens  # every block between sink and window gets retrieved
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 16, (1, length + 4)), jnp.int32)
    cache = KVCache.for_model(target.cfg, 1, 512)
    pos = jnp.arange(length)[None]
    cache = M.forward(target.params, target.cfg, ids[:, :length], pos, cache).cache.replace(
        length=jnp.array([length]))
    summary = BlockSummary.of(cache, BLOCK)
    tail, tail_pos = ids[:, length:], length + jnp.arange(4)[None]
    full = M.forward(target.params, target.cfg, tail, tail_pos, cache, summary=summary,
                     score_mask=jnp.ones((1, 4), bool))
    blocks = retrieval.select_blocks(full.block_scores, cache.length, spec)
    partial = retrieval.refresh(retrieval.empty_partial(cache, spec), cache, blocks, spec)
    part = M.forward(target.params, target.cfg, tail, tail_pos, partial)
    np.testing.assert_allclose(np.asarray(part.hidden), np.asarray(full.hidden), atol=2e-5)


def test_draft_partial_cache_holds_each_token_once():
    """`bounded_draft`: the head's cache lags the target's (here by 40 tokens), so the target's best blocks,
    just before the target's window, lie in the head's window; the head takes its blocks before that instead."""
    from specpv_jax.specpv import refresh_draft_partial

    spec = small_spec()  # sink 32 + 4 blocks of 16 + window 32
    head = KVCache.empty(1, 1, 2, 512, 4, jnp.float32)
    head = head.replace(k=head.k.at[..., 0].set(jnp.arange(512, dtype=jnp.float32)), length=jnp.array([260]))
    scores = jnp.broadcast_to(jnp.arange(32, dtype=jnp.float32), (2, 1, 4, 32))  # later blocks score higher
    assert (np.asarray(retrieval.select_blocks(scores, jnp.array([300]), spec))[-1] == [12, 13, 14, 15]).all()
    partial = refresh_draft_partial(retrieval.empty_partial(head, spec), head, scores, spec)
    positions = np.asarray(partial.k[0, 0, :, :spec.static_tokens, 0])  # [head KV heads, static]
    expected = np.concatenate([np.arange(32), np.arange(10 * 16, 14 * 16), np.arange(260 - 32, 260)])
    np.testing.assert_array_equal(positions, np.broadcast_to(expected, positions.shape))


def test_bounded_draft_partial_steps_start_once_the_heads_cache_holds_a_full_budget(models, monkeypatch):
    """The head's cache lags the target's by the tokens a full step just committed: with the target just past
    the threshold and the head not, the head's bounded cache was one block short and took sink block 0 twice
    (its keys counted twice in the partial steps' drafts)."""
    target, head = models
    spec = small_spec(bounded_draft=True, tree_nodes=7)  # a spec of its own: traced afresh with the spy below
    static = spec.static_tokens
    duplicated = []
    real = specpv.partial_step

    def spy(params, run, sampler, eos, st, tree):
        rows = st.draft_partial.k[0, 0, 0, :static]  # [static, D]: equal rows are a token held twice
        same = (rows[:, None] == rows[None]).all(-1) & ~jnp.eye(static, dtype=bool)
        jax.debug.callback(lambda d: duplicated.append(bool(d)), same.any())
        return real(params, run, sampler, eos, st, tree)

    monkeypatch.setattr(specpv, "partial_step", spy)
    for length in (119, 127):  # the head at 127 when the target passed 128
        out = sj.generate(target, np.random.default_rng(length).integers(0, 16, length), 24, draft=head,
                          mode="specpv", spec=spec, eos_token_ids=())
        assert out.stats["partial_verifications"] > 0
    assert duplicated and not any(duplicated)


@pytest.fixture(scope="module")
def models():
    target = make_target(16)
    return target, make_head(target, draft_vocab=12)


@pytest.mark.parametrize("length, spec", [
    (300, small_spec()),                                              # partial mode after a few steps
    (2000, small_spec(retrieval_tokens=256, window=64, bounded_draft=True)),
    (2000, small_spec(retrieval_tokens=32, window=16, buffer_tokens=10)),  # a tiny buffer: full steps often
    pytest.param(8000, small_spec(retrieval_tokens=1024, window=128, tree_depth=5, tree_top_k=4, tree_nodes=20),
                 marks=pytest.mark.slow),
], ids=["300", "2k-bounded-draft", "2k-tiny-buffer", "8k"])
def test_exact_greedy_equals_ar(models, length, spec):
    target, head = models
    prompt = np.random.default_rng(length).integers(0, 16, length)
    ar = sj.generate(target, prompt, 64, eos_token_ids=())
    exact = sj.generate(target, prompt, 64, draft=head, mode="exact", spec=spec, eos_token_ids=())
    np.testing.assert_array_equal(exact.tokens, ar.tokens)
    s = exact.stats
    assert s["partial_verifications"] > 0 and s["full_verifications"] > 0
    if spec.bounded_draft:  # specpv on the other budgets: test_specpv_below_threshold_is_eagle, tests/test_demo.py
        specpv = sj.generate(target, prompt, 64, draft=head, mode="specpv", spec=spec, eos_token_ids=())
        assert specpv.stats["partial_verifications"] > 0
        assert specpv.tokens.shape == ar.tokens.shape


def cache_copies(compiled_hlo: str) -> list[str]:
    """Shapes of the rank-5 arrays (KV caches, partial caches, block summaries) that a compiled program
    copies inside its loops, once per step."""
    return [f.shape for f in hlo.loop_copies(compiled_hlo) if f.kind == "copy" and len(f.dims) == 5]


@pytest.mark.parametrize("mode", ["specpv", "exact"])
def test_decode_loop_updates_caches_in_place(models, mode):
    """Choosing partial or full verification (and the bounded or full draft) must not copy a cache each step:
    with `lax.cond`/`lax.switch` XLA copied the full cache, the partial cache and the summaries every step
    (at Llama-3.1-8B shapes and 64K tokens, gigabytes per step and twice the cache's memory)."""
    target, head = models
    spec = small_spec(retrieval_tokens=256, window=64, bounded_draft=True)
    fn = sj.make_generate_fn(target.cfg, spec, mode=mode, draft_cfg=head.cfg, max_new_tokens=16, eos_token_ids=())
    ids = jnp.zeros((1, 600), jnp.int32)
    compiled = jax.jit(fn).lower(target.params, {"params": head.params, "d2t": head.d2t}, ids,
                                 jax.random.key(0)).compile().as_text()
    assert cache_copies(compiled) == []


def test_specpv_below_threshold_is_eagle(models, monkeypatch):
    """Partial verification starts past sink + retrieval + window: below it the output equals eagle's, and a
    call whose prompt and output buckets cannot get past it runs the eagle loop itself."""
    target, head = models
    prompt = np.random.default_rng(4).integers(0, 16, 500)
    eagle = sj.generate(target, prompt, 48, draft=head, mode="eagle", spec=small_spec(), eos_token_ids=())
    # 500 + 48 tokens stay within 32 + 496 + 32, the buckets (512 + 64) do not: the specpv loop runs.
    # 32 + 1024 + 32 holds the buckets: the eagle loop runs (specpv's would fail here).
    within_buckets = small_spec(retrieval_tokens=1024)
    for mode in ("specpv", "exact"):
        out = sj.generate(target, prompt, 48, draft=head, mode=mode, spec=small_spec(retrieval_tokens=496),
                          eos_token_ids=())
        np.testing.assert_array_equal(out.tokens, eagle.tokens)
        assert out.stats["partial_verifications"] == 0
    monkeypatch.setattr("specpv_jax.specpv.specpv_decode_fn", None)
    for mode in ("specpv", "exact"):
        out = sj.generate(target, prompt, 48, draft=head, mode=mode, spec=within_buckets, eos_token_ids=())
        np.testing.assert_array_equal(out.tokens, eagle.tokens)
        assert out.stats["mode"] == mode and out.stats["partial_verifications"] == 0
    with pytest.raises(TypeError):  # the specpv loop: the check above would fail without its shortcut
        sj.generate(target, prompt, 48, draft=head, mode="specpv", spec=small_spec(retrieval_tokens=496),
                    eos_token_ids=())


def test_accepted_lengths_count_the_tokens_kept():
    """Per-kind accepted lengths count the tokens the output keeps (to EOS, within max_new_tokens), as the
    overall figure does, so that it is their weighted mean (the specpv loop counted a last step's tokens past
    the end: 8 tokens, partial 4.0 where 2.0 were kept), and specpv's loop reports what the eagle loop does."""
    models = sj.demo_models()
    ids = demo_prompt(models.tokenizer, 1024)
    spec = sj.SpecConfig(sink_tokens=16, retrieval_tokens=32, window_tokens=16, tree_depth=3, tree_top_k=3,
                         tree_nodes=6)
    for n in (8, 9, 13, 32):  # (EOS ends rows where Output.kept says: the test below)
        out = sj.generate(models.target, ids, n, draft=models.eagle3, mode="specpv", spec=spec, eos_token_ids=())
        s, emitted = out.stats, int(out.lengths[0]) - 1  # the first token comes from the prefill
        assert s["partial_verifications"] > 0 and s["mean_accept_len"] > 1.5, (n, s)
        assert s["mean_accept_len"] * s["steps"] == pytest.approx(emitted)
        assert (s["mean_accept_len_full"] * s["full_verifications"] + s["mean_accept_len_partial"]
                * s["partial_verifications"]) == pytest.approx(emitted), n
    # Below the threshold specpv runs the eagle loop, offloaded its own: the same steps, the same figures.
    spec = dataclasses.replace(spec, retrieval_tokens=1024)
    for n in (2, 3, 9):
        eagle_loop, specpv_loop = (sj.generate(models.target, ids[:200], n, draft=models.eagle3, mode="specpv",
                                               spec=dataclasses.replace(spec, offload=offload),
                                               eos_token_ids=()).stats for offload in (False, True))
        for key in ("steps", "full_verifications", "mean_accept_len", "mean_accept_len_full"):
            assert eagle_loop[key] == pytest.approx(specpv_loop[key]), (n, key)


def test_output_keeps_tokens_to_eos_and_within_the_limit():
    i32 = lambda *x: jnp.asarray(x, jnp.int32)  # noqa: E731
    zero = jnp.zeros((), jnp.int32)
    out = Output(tokens=jnp.zeros((4, 10), jnp.int32), num_out=i32(1, 6, 3, 2), done=jnp.asarray([0, 0, 0, 1], bool),
                 limit=i32(10, 8, 10, 10), steps=zero, row_steps=zero, emitted=zero, finite=jnp.asarray(True),
                 draft_nan_steps=zero)
    new, count, eos = jnp.asarray([[4, 5, 6], [4, 5, 6], [4, 9, 6], [4, 5, 6]]), i32(3, 3, 3, 3), i32(9)
    kept, hit_eos = out.kept(new, count, eos)
    assert kept.tolist() == [3, 2, 2, 0] and hit_eos.tolist() == [False, False, True, False]
    assert out.kept(new, count, eos, ahead=i32(0, 1, 0, 0))[0].tolist() == [3, 1, 2, 0]
    after = out.append(new, count, eos, jnp.asarray(True))
    assert after.num_out.tolist() == [4, 8, 5, 2] and int(after.emitted) == 7
    assert after.done.tolist() == [False, True, True, True] and int(after.row_steps) == 3
    nan_rows = jnp.asarray([False, True, True, True])  # a draft's NaN in finished rows only: not counted
    assert int(after.append(new, count, eos, jnp.asarray(True), nan_rows).draft_nan_steps) == 0
    assert int(after.append(new, count, eos, jnp.asarray(True), ~nan_rows).draft_nan_steps) == 1


def test_exact_batch_with_eos_equals_ar(models):
    target, head = models
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 16, n) for n in (400, 250, 700)]
    free = sj.generate(target, prompts, 50, eos_token_ids=())
    eos = int(free.tokens[2, 30])
    ar = sj.generate(target, prompts, 50, eos_token_ids=(eos,))
    exact = sj.generate(target, prompts, 50, draft=head, mode="exact", spec=small_spec(), eos_token_ids=(eos,))
    np.testing.assert_array_equal(exact.lengths, ar.lengths)
    np.testing.assert_array_equal(exact.tokens, ar.tokens)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_provisional_check_restores_the_target_law(temperature, top_p):
    """Tokens drawn from a partial distribution q and re-checked against p come out distributed as p."""
    from specpv_jax.specpv import check_provisional

    rng = np.random.default_rng(7)
    vocab, rows = 12, 20000
    sampler = Sampler.create(temperature, top_p)
    p_logits = rng.standard_normal(vocab).astype(np.float32) * 2
    q_logits = p_logits + rng.standard_normal(vocab).astype(np.float32) * 2  # a quite different partial view
    p, q = (np.asarray(sampler.probs(jnp.asarray(x)), np.float64) for x in (p_logits, q_logits))
    drawn = rng.choice(vocab, rows, p=q / q.sum()).astype(np.int32)[:, None]
    rejected, first, token, chance = check_provisional(
        sampler, jnp.broadcast_to(jnp.asarray(p_logits), (rows, 1, vocab)), jnp.asarray(drawn),
        jnp.ones((rows,), jnp.int32), jnp.broadcast_to(jnp.asarray(q, jnp.float32), (rows, 1, vocab)),
        jax.random.key(0))
    out = np.where(np.asarray(rejected), np.asarray(token), drawn[:, 0])
    assert 0.05 < np.asarray(rejected).mean() < 0.95 and (np.asarray(first) == 0).all()
    # Each token's chance of rejection, 1 - min(1, p/q): the rejections' rate, and on average over q, the
    # total variation distance between p and q.
    chance = np.asarray(chance)[:, 0]
    np.testing.assert_allclose(chance, 1 - np.minimum(1, p[drawn[:, 0]] / q[drawn[:, 0]]), atol=1e-5)
    assert abs(chance.mean() - np.asarray(rejected).mean()) < 0.02
    assert abs(chance.mean() - 0.5 * np.abs(p - q).sum()) < 0.02
    assert chi_square_pvalue(out, p) > 1e-3
    assert chi_square_pvalue(drawn[:, 0], p) < 1e-6  # the test can tell q from p


def test_the_sampled_check_draws_alike_however_many_slots_it_checks():
    """A full step checks provisional tokens in the slots of its re-feed branch (`refeed_sizes`): the first m
    of q's M' slots, with the draws of all M', so a token's verdict and replacement are the same in any branch
    that holds it, and sampled output does not depend on the branch the batch took."""
    from specpv_jax.specpv import check_provisional

    rng = np.random.default_rng(3)
    rows, slots, vocab = 64, 6, 10
    sampler = Sampler.create(1.0, 1.0)
    logits = jnp.asarray(rng.standard_normal((rows, slots, vocab)) * 2, jnp.float32)
    q = jax.nn.softmax(logits + jnp.asarray(rng.standard_normal((rows, slots, vocab)) * 2, jnp.float32), axis=-1)
    provisional = jnp.asarray(rng.integers(0, vocab, (rows, slots)), jnp.int32)
    n = jnp.asarray(rng.integers(0, 4, rows), jnp.int32)  # at most 3 real: both calls below hold them
    key = jax.random.key(5)
    wide = check_provisional(sampler, logits, provisional, n, q, key)
    narrow = check_provisional(sampler, logits[:, :3], provisional[:, :3], n, q, key)
    assert 0 < np.asarray(wide[0]).sum() < rows
    for w, x in zip(wide[:3], narrow[:3]):
        np.testing.assert_array_equal(np.asarray(w), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(wide[3])[:, :3], np.asarray(narrow[3]))


def test_refeed_sizes():
    """Exact mode re-feeds one partial step's tokens in a branch of its own; specpv's full steps come with a
    full buffer; a buffer holding no more than one step's has no use for a smaller branch."""
    spec = small_spec()  # tree depth 3: a partial step adds up to 4 tokens
    assert specpv.refeed_sizes(spec, "exact") == (0, 4, spec.max_missing) and spec.max_missing > 4
    assert specpv.refeed_sizes(spec, "specpv") == (0, spec.max_missing)
    tiny = small_spec(buffer_tokens=11)  # 11 - 8 nodes + 3 = 6 missing at most
    assert specpv.refeed_sizes(tiny, "exact") == (0, 4, 6)
    tinier = small_spec(buffer_tokens=9)
    assert tinier.max_missing == 4 and specpv.refeed_sizes(tinier, "exact") == (0, 4)


def test_exact_full_steps_re_feed_in_the_smallest_branch_that_holds_them(models, monkeypatch):
    """Each full step runs the branch of the fewest slots that hold every live row's missing tokens (a row
    done is not waited for); the one-step branch runs, and the output is still ar's."""
    target, head = models
    seen, real = [], specpv.full_step

    def spy(params, run, sampler, eos, st, tree, refeed):
        jax.debug.callback(lambda n, done: seen.append((refeed, int(np.where(done, 0, n).max()))),
                           st.n_missing, st.eagle.out.done)
        return real(params, run, sampler, eos, st, tree, refeed=refeed)

    monkeypatch.setattr(specpv, "full_step", spy)
    prompts = np.random.default_rng(11).integers(0, 16, (2, 300))
    spec = small_spec(window=96)  # a spec of its own: traced afresh with the spy
    sizes = specpv.refeed_sizes(spec, "exact")
    exact = sj.generate(target, prompts, 64, draft=head, mode="exact", spec=spec, eos_token_ids=())
    np.testing.assert_array_equal(exact.tokens, sj.generate(target, prompts, 64, eos_token_ids=()).tokens)
    assert len(seen) == exact.stats["full_verifications"]
    for refeed, need in seen:
        assert refeed == min(k for k in sizes if k >= need), (refeed, need)
    assert sizes[1] in {refeed for refeed, _ in seen}


SEED_WITH_A_ROLLBACK = 1  # of 6 seeds tried, all take partial steps and 5 roll back
SAMPLES = 256  # generations per sampling check (each its own batch, vmapped)


def sampling_setup():
    """A target, its head, a spec whose partial cache (a 16-token window) often disagrees with the full context
    (and whose full steps, priced at 7 partial ones, make sampled exact mode hold many tokens provisional), and a
    prompt."""
    vocab = 8
    target = make_target(vocab, seed=3, layers=3, sharpen=1.0)
    head = make_head(target, draft_vocab=6, seed=4)
    spec = small_spec(retrieval_tokens=0, window=16, sink=0, tree_depth=2, tree_top_k=5, tree_nodes=10,
                      full_step_cost=7.0)
    return target, head, spec, np.random.default_rng(6).integers(0, vocab, 64).astype(np.int32)


def sampled_per_key(mode: str, samples: int, new_tokens: int):
    """`samples` generations (`sampling_setup`) at temperature 0.7, top_p 0.8, each its own batch
    (`make_generate_fn` vmapped over keys: each takes its own partial/full steps, where a batch's rows would
    share them). Returns (target, prompt, sampler, tokens [samples, new_tokens])."""
    target, head, spec, prompt = sampling_setup()
    fn = sj.make_generate_fn(target.cfg, spec, mode=mode, draft_cfg=head.cfg, max_new_tokens=new_tokens,
                             temperature=0.7, top_p=0.8, eos_token_ids=())
    keys = jax.random.split(jax.random.key(1), samples)
    tokens, lengths = jax.jit(jax.vmap(fn, in_axes=(None, None, None, 0)))(
        target.params, {"params": head.params, "d2t": head.d2t}, jnp.asarray(prompt[None]), keys)
    assert (np.asarray(lengths) == new_tokens).all()
    return target, prompt, Sampler.create(0.7, 0.8), np.asarray(tokens)[:, 0]


def test_exact_sampling_follows_the_full_context_target():
    """Sampled `exact` generation, with partial steps and rollbacks, draws each of its first 6 tokens from the
    full-context target's distribution given the tokens before it."""
    target, head, spec, prompt = sampling_setup()
    stats = sj.generate(target, prompt, 6, draft=head, mode="exact", spec=spec, temperature=0.7, top_p=0.8,
                        seed=SEED_WITH_A_ROLLBACK, eos_token_ids=()).stats
    assert stats["partial_verifications"] > 0 and stats["rollbacks"] > 0  # what the samples below go through
    target, prompt, sampler, tokens = sampled_per_key("exact", SAMPLES, 6)
    assert teacher_forced_pvalues(target, prompt, tokens, sampler).min() > 1e-3


@pytest.mark.slow
def test_the_exact_sampling_check_tells_specpv_apart():
    """The check above has the power to see a partial cache's drift: `specpv` fails it (p = 5e-28 at its 4th token;
    1e-58 with 512 samples)."""
    target, prompt, sampler, tokens = sampled_per_key("specpv", SAMPLES, 6)
    assert teacher_forced_pvalues(target, prompt, tokens, sampler).min() < 1e-6


def test_provisional_cap_pauses_partial_steps_after_a_losing_rollback():
    """Rows: all 4 confirmed; 3 of 8 confirmed (4 emitted, the tree would give 3); none of 5 confirmed while
    the tree gives 3 (a loss: pause, for 2 full steps, then cap 1); the same at the backoff limit; a pause
    counted down; its last full step."""
    i32 = lambda *x: jnp.asarray(x, jnp.int32)  # noqa: E731
    cap, pause, backoff = next_provisional_cap(
        cap=i32(4, 8, 5, 5, 1, 1), pause=i32(0, 0, 0, 0, 2, 1), backoff=i32(1, 4, 2, MAX_BACKOFF, 2, 2),
        n_missing=i32(4, 8, 5, 5, 0, 0), rejected=jnp.asarray([False, True, True, True, False, False]),
        first=i32(0, 3, 0, 0, 0, 0), tree_count=i32(3, 3, 3, 3, 3, 3), max_missing=16)
    assert cap.tolist() == [8, 6, 1, 1, 1, 1]
    assert pause.tolist() == [0, 0, 2, MAX_BACKOFF, 1, 0]
    assert backoff.tolist() == [1, 1, 4, MAX_BACKOFF, 2, 2]


def test_planned_cap_trades_rollbacks_for_full_steps():
    """Sampling exact mode's cap: the most tokens where none is rejected, none where all are; a hand-worked
    case (chance 1/4, a token a step, a full step worth 3 partial ones: 1/3, 7/16, 37/80, 0.456 tokens per
    unit cost after 0-3 partial steps); fewer tokens the likelier a rejection, more the dearer a full step."""
    cap = lambda chance, tau=1.43, cost=3.0: planned_cap(jnp.asarray(chance, jnp.float32), tau, cost, 24)  # noqa
    assert cap([0.0, 1.0], tau=1.0).tolist() == [24, 0]
    assert cap([0.25], tau=1.0).tolist() == [2]
    chances = np.linspace(0.01, 0.6, 30, dtype=np.float32)
    for cost in (1.0, 1.5, 3.0, 7.0, 20.0):
        assert (np.diff(np.asarray(cap(chances, cost=cost))) <= 0).all()
    by_cost = np.stack([np.asarray(cap(chances, cost=cost)) for cost in (1.0, 1.5, 3.0, 7.0, 20.0)])
    assert (np.diff(by_cost, axis=0) >= 0).all() and by_cost[0, 0] < by_cost[-1, 0]
    assert cap([0.07], cost=1.5)[0] < cap([0.07], cost=7.0)[0]
    # After a full step: rows that checked 100 tokens, 7 rejections expected, or every one; one that checked
    # nothing (its cap stays, its pause counts down).
    i32 = lambda *x: jnp.asarray(x, jnp.int32)  # noqa: E731
    caps, pause, backoff = next_planned_cap(
        cap=i32(5, 5, 5), pause=i32(0, 0, 2), backoff=i32(1, 4, 4), n_missing=i32(6, 6, 0),
        drift=jnp.asarray([[7.0, 100.0], [100.0, 100.0], [0.0, 0.0]]), tau=1.43, cost=3.0, max_missing=24)
    assert caps.tolist() == [int(cap([8 / 104])[0]), 1, 5] and caps[0] > 1
    assert pause.tolist() == [0, 4, 1] and backoff.tolist() == [1, 8, 4]


@pytest.mark.parametrize("cost", [0.5, float("nan"), float("inf")])
def test_a_full_step_cost_below_one_partial_step_is_refused(cost):
    with pytest.raises(sj.config.ConfigError, match="full_step_cost must be at least 1"):
        sj.SpecConfig(full_step_cost=cost)


def test_exact_sampling_plans_its_partial_steps_by_the_full_steps_cost():
    """A full step that costs no more than a partial one (`full_step_cost=1`) leaves partial steps for the
    rows to explore after a pause; one worth 50 takes many, and far fewer full steps."""
    target, head, spec, prompt = sampling_setup()
    stats = {cost: sj.generate(target, prompt, 48, draft=head, mode="exact", temperature=0.7, top_p=0.8,
                               spec=dataclasses.replace(spec, full_step_cost=cost), seed=0, eos_token_ids=()).stats
             for cost in (1.0, 50.0)}
    cheap, dear = stats[1.0], stats[50.0]
    assert cheap["partial_verifications"] < cheap["full_verifications"] / 2
    assert dear["partial_verifications"] > dear["full_verifications"]
    assert dear["full_verifications"] < cheap["full_verifications"]


def test_log_prob_margin_and_shaky_rows():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]))
    np.testing.assert_allclose(log_prob_margin(logits, jnp.asarray([0, 2])), [np.log(5 / 3), np.log(2 / 5)],
                               rtol=1e-6)
    # Rows: no drift measured yet (any token is shaky); mean drift 0.5 with margins 0.4 and 0.6; the same with
    # the 0.4 margin's slot not valid; a valid margin of exactly the mean drift.
    margin = jnp.asarray([[3.0, 3.0], [0.6, 0.4], [0.6, 0.4], [0.5, 2.0]])
    valid = jnp.asarray([[True, False], [True, True], [True, False], [True, True]])
    drift = jnp.asarray([[0.0, 0.0], [1.0, 2.0], [1.0, 2.0], [2.0, 4.0]])
    assert is_shaky(margin, valid, drift).tolist() == [True, True, False, False]


def test_a_shaky_token_makes_the_next_step_full(models, monkeypatch):
    """Greedy exact mode: a shaky row confirms at once (every partial step followed by a full one, still the
    ar tokens), and full steps feed the drift that the rule reads."""
    target, head = models
    drift_counts = []

    def always_shaky(margin, valid, drift):
        jax.debug.callback(lambda d: drift_counts.append(float(d.sum())), drift[:, 1])
        return valid.any(axis=1)  # every provisional token is shaky

    monkeypatch.setattr(specpv, "is_shaky", always_shaky)
    prompt = np.random.default_rng(300).integers(0, 16, 300)
    ar = sj.generate(target, prompt, 64, eos_token_ids=())
    spec = small_spec(window=48)  # a spec of its own: traced afresh with the spy above
    exact = sj.generate(target, prompt, 64, draft=head, mode="exact", spec=spec, eos_token_ids=())
    np.testing.assert_array_equal(exact.tokens, ar.tokens)
    s = exact.stats
    assert 0 < s["partial_verifications"] <= s["full_verifications"]  # partial steps are never consecutive
    # Before the first full step none measured; by the last partial step, each earlier one's tokens (1+ each).
    assert min(drift_counts) == 0 and max(drift_counts) >= s["partial_verifications"] - 1


def test_sampled_full_steps_count_each_checked_token_once(monkeypatch):
    """Sampling exact mode with a target whose logits ignore the context (attention outputs zeroed): p = q, so
    no provisional token can be rejected; each full step adds its checked tokens to the row's count and nothing
    to the chance, and the planned cap grows past its first value."""
    target = context_blind_target()
    seen, real = [], specpv.next_planned_cap

    def spy(cap, pause, backoff, n_missing, drift, *args):
        jax.debug.callback(lambda *x: seen.append([np.asarray(v).copy() for v in x]), n_missing, drift, cap)
        return real(cap, pause, backoff, n_missing, drift, *args)

    monkeypatch.setattr(specpv, "next_planned_cap", spy)
    prompt = np.random.default_rng(7).integers(0, 16, 300)
    spec = small_spec(window=80)  # a spec of its own: traced afresh with the spy
    out = sj.generate(target, prompt, 64, draft=make_head(target), mode="exact", spec=spec, temperature=1.0,
                      eos_token_ids=())
    n_missing, drift, caps = (np.stack(x)[:, 0] for x in zip(*seen))
    assert out.stats["rollbacks"] == 0 and n_missing.sum() > 5
    np.testing.assert_array_equal(drift[:, 1], np.cumsum(n_missing))
    assert drift[:, 0].max() < 1e-4
    first = specpv.planned_cap(specpv.mean_chance(jnp.zeros((1, 2))), 1.0, spec.full_step_cost, spec.max_missing)
    assert caps.max() > max(int(first[0]), 1)


def context_blind_target():
    """A target whose attention outputs are zeroed: its logits depend on the current token alone."""
    target = make_target(16, seed=7)
    params = jax.tree.map(lambda x: x, target.params)
    attn = params["layers"]["self_attn"]
    attn["o_proj"] = {**attn["o_proj"], "kernel": jnp.zeros_like(attn["o_proj"]["kernel"])}
    return dataclasses.replace(target, params=params)


def test_drift_is_zero_where_the_context_cannot_matter(monkeypatch):
    """With its attention outputs zeroed the target's logits depend on the current token alone: partial and
    full verification give each provisional token the same margin, and the drift full steps measure is zero
    (a margin kept one slot off, or another token's, would not be)."""
    target = context_blind_target()
    seen, real = [], specpv.is_shaky

    def spy(margin, valid, drift):
        jax.debug.callback(lambda d: seen.append(np.asarray(d).copy()), drift)
        return real(margin, valid, drift)

    monkeypatch.setattr(specpv, "is_shaky", spy)
    prompt = np.random.default_rng(7).integers(0, 16, 300)
    spec = small_spec(window=64)  # a spec of its own: traced afresh with the spy
    exact = sj.generate(target, prompt, 64, draft=make_head(target), mode="exact", spec=spec, eos_token_ids=())
    np.testing.assert_array_equal(exact.tokens, sj.generate(target, prompt, 64, eos_token_ids=()).tokens)
    total, count = max(seen, key=lambda d: d[0, 1])[0]
    assert count >= 5 and total <= 1e-4 * count, (total, count)


@pytest.mark.slow  # 43-46 s of make test's 25 min on a slow day (2 cores): `make test-slow`
def test_exact_with_a_partial_cache_that_disagrees_costs_about_eagles_full_steps():
    """With no retrieval budget the partial cache (a 16-token window) often disagrees with the full context:
    rollbacks that lose pause partial verification, so exact mode does not pay a full step per partial one.
    (A rollback's full step emits 1 token where eagle's emits its tree's: 18 full steps against eagle's 17 since
    greedy exact mode confirms after a shaky token, 698214f; 17 before.)"""
    models = sj.demo_models()
    spec = sj.SpecConfig(sink_tokens=0, retrieval_tokens=0, window_tokens=16)
    ids = demo_prompt(models.tokenizer, 2048)
    eagle = sj.generate(models.target, ids, 64, draft=models.eagle3, mode="eagle", spec=spec, eos_token_ids=())
    exact = sj.generate(models.target, ids, 64, draft=models.eagle3, mode="exact", spec=spec, eos_token_ids=())
    np.testing.assert_array_equal(exact.tokens, eagle.tokens)
    assert exact.stats["rollbacks"] > 0 and exact.stats["partial_verifications"] > 0
    assert exact.stats["full_verifications"] <= 1.2 * eagle.stats["full_verifications"]  # 35 without the pauses


def test_tuned_picks_a_timed_candidate(models):
    target, head = models
    from specpv_jax.tuning import tune

    base = small_spec(retrieval_tokens=32, window=16, sink=16)
    spec, trials = tune(target, head, 300, trees=((2, 2, 3), (3, 2, 5)), budgets=(32,), new_tokens=16, base=base,
                        min_fidelity=0.0)  # a random model's fidelity at budget 32: 0.19
    assert len(trials) == 3 and all(t.tokens_per_s > 0 for t in trials)
    assert (spec.tree_depth, spec.tree_top_k, spec.tree_nodes) in ((2, 2, 3), (3, 2, 5))
    assert all(t.fidelity is not None for t in trials[2:])  # budgets are judged on fidelity too
    assert spec in [t.spec for t in trials[2:]]


def test_tuning_skips_trees_wider_than_the_draft_vocabulary():
    """A head proposing from 6 tokens: a top-8 tree is not a candidate (it raised part-way through)."""
    from specpv_jax.tuning import tune

    target = make_target(16)
    head = make_head(target, draft_vocab=6)
    spec, trials = tune(target, head, 40, trees=((2, 8, 8), (2, 4, 4)), budgets=(), new_tokens=4)
    assert [t.spec.tree_top_k for t in trials] == [4] and spec.tree_top_k == 4
    with pytest.raises(ValueError, match="no candidate tree fits: each needs tree_top_k <= the draft's 6 tokens"):
        tune(target, head, 40, trees=((2, 8, 8),), budgets=(), new_tokens=4)
    for context in (0, -5):  # numpy's "negative dimensions are not allowed", or an empty prompt
        with pytest.raises(ValueError, match=f"context must be a positive length or token ids, got {context}"):
            tune(target, head, context)


@pytest.mark.parametrize("speeds, picked", [  # tokens/s of trees of 5 and 3 nodes, then of budgets 32 and 64
    ((102.0, 100.0, 99.0, 100.0), (3, 64)),  # near ties: the smaller tree, the larger budget
    ((110.0, 100.0, 110.0, 100.0), (5, 32)),  # clear winners
])
def test_tune_breaks_near_ties_toward_the_smaller_tree_and_larger_budget(monkeypatch, speeds, picked):
    import importlib
    import types

    from specpv_jax.tuning import tune

    generate_module = importlib.import_module("specpv_jax.generate")  # the package's `generate` is the function

    calls = []

    def timed(*args, **kwargs):  # each trial generates twice
        calls.append(kwargs["spec"])
        return types.SimpleNamespace(stats={"tokens_per_s": speeds[(len(calls) - 1) // 2], "mean_accept_len": 2.0})

    monkeypatch.setattr(generate_module, "generate", timed)
    monkeypatch.setattr(generate_module, "fidelity", lambda *a: 1.0)
    target = types.SimpleNamespace(cfg=types.SimpleNamespace(vocab_size=16))
    draft = types.SimpleNamespace(cfg=None)  # proposing from the target's vocabulary
    from specpv_jax import tuning

    bars = []

    class Bar:  # tuning ran for minutes without a word (verbose=False)
        def __init__(self, total, disable, **_):
            self.total, self.disable, self.n, self.closed = total, disable, 0, False
            bars.append(self)

        def update(self):
            self.n += 1

        def close(self):
            self.closed = True

    monkeypatch.setattr(tuning, "tqdm", Bar)
    spec, trials = tune(target, draft, 300, trees=((3, 2, 5), (2, 2, 3)), budgets=(32, 64),
                        base=small_spec(retrieval_tokens=64, window=16, sink=16))
    assert [t.tokens_per_s for t in trials] == list(speeds)
    assert (spec.tree_nodes, spec.retrieval_tokens) == picked
    assert [(b.total, b.n, b.closed, b.disable) for b in bars] == [(4, 4, True, False)]


def test_tune_warns_when_no_budget_keeps_the_fidelity(monkeypatch):
    """No budget at fidelity >= 0.99: the most faithful is returned, and said so (only `verbose` printed it)."""
    import importlib
    import types

    from specpv_jax.tuning import tune

    generate_module = importlib.import_module("specpv_jax.generate")
    fidelities = iter([0.9, 0.95])  # budgets 32 and 64
    monkeypatch.setattr(generate_module, "generate", lambda *a, **k: types.SimpleNamespace(
        stats={"tokens_per_s": 100.0, "mean_accept_len": 2.0}))
    monkeypatch.setattr(generate_module, "fidelity", lambda *a: next(fidelities))
    target = types.SimpleNamespace(cfg=types.SimpleNamespace(vocab_size=16))
    with pytest.warns(sj.SpecPVWarning, match=r"no partial budget in \[32, 64\] kept fidelity >= 0.99 at 300 "
                                              r"tokens; tuned to the most faithful, retrieval_tokens=64 "
                                              r"\(fidelity 0.950\)"):
        spec, _ = tune(target, types.SimpleNamespace(cfg=None), 300, trees=((2, 2, 3),), budgets=(32, 64),
                       base=small_spec(retrieval_tokens=64, window=16, sink=16))
    assert spec.retrieval_tokens == 64


def test_tune_judges_budgets_by_a_rows_length(monkeypatch):
    """Two rows of 200 tokens are a context of 200 (it counted 400: a budget whose threshold, 288, no row
    reaches was tried, fidelity 1.0 without a partial step, and could win)."""
    import importlib
    import types

    from specpv_jax.tuning import tune

    generate_module = importlib.import_module("specpv_jax.generate")
    tried = []

    def timed(target, prompt, *args, spec, **kwargs):
        tried.append((np.shape(prompt), spec.retrieval_tokens))
        return types.SimpleNamespace(stats={"tokens_per_s": 100.0, "mean_accept_len": 2.0})

    monkeypatch.setattr(generate_module, "generate", timed)
    monkeypatch.setattr(generate_module, "fidelity", lambda *a: 1.0)
    target = types.SimpleNamespace(cfg=types.SimpleNamespace(vocab_size=16))
    draft = types.SimpleNamespace(cfg=None)
    spec, trials = tune(target, draft, np.zeros((2, 200), np.int32), trees=((2, 2, 3),), budgets=(64, 256),
                        base=small_spec(window=16, sink=16))
    assert [t.spec.retrieval_tokens for t in trials] == [64, 64] and spec.retrieval_tokens == 64  # tree, budget
    assert {shape for shape, _ in tried} == {(2, 200)}
    with pytest.raises(ValueError, match=r"context must be a length or token ids \[T\] or \[B, T\], got an array "
                                         r"of shape \(1, 1, 4\)"):
        tune(target, draft, np.zeros((1, 1, 4), np.int32))


@pytest.mark.slow
def test_exact_greedy_equals_ar_at_20k(models):
    """The long end of the range (run with `make test-slow`)."""
    import dataclasses

    target, head = models
    target = sj.Model(dataclasses.replace(target.cfg, max_position_embeddings=32768), target.params)
    prompt = np.random.default_rng(20000).integers(0, 16, 20000)
    spec = small_spec(retrieval_tokens=4096, window=128, tree_depth=5, tree_top_k=4, tree_nodes=20)
    ar = sj.generate(target, prompt, 96, eos_token_ids=())
    exact = sj.generate(target, prompt, 96, draft=head, mode="exact", spec=spec, eos_token_ids=())
    np.testing.assert_array_equal(exact.tokens, ar.tokens)
    assert exact.stats["partial_verifications"] > 0
