"""SpecExtend: small draft models, Cross-model Retrieval, lossless `mode="specextend"`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampling_stats import chi_square_pvalue, three_token_cells, three_token_law
from test_eagle import make_head, make_target

import specpv_jax as sj
from specpv_jax import rope
from specpv_jax.cache import KVCache
from specpv_jax.config import RopeConfig
from specpv_jax.draft import small
from specpv_jax.draft.small import SmallDraft
from specpv_jax.sampling import Sampler

TREE = dict(tree_depth=4, tree_top_k=3, tree_nodes=10)


def numpy_chunks(q, keys, length, chunk, k):
    """Cross-model Retrieval in plain numpy: per-head softmax, mean over heads, chunk means, top-k whole chunks."""
    b, hq, d = q.shape
    hkv = keys.shape[1]
    chosen = []
    for r in range(b):
        n = length[r]
        probs = []
        for h in range(hq):
            s = keys[r, h // (hq // hkv), :n] @ q[r, h] / np.sqrt(d)
            e = np.exp(s - s.max())
            probs.append(e / e.sum())
        row = np.mean(probs, axis=0)
        whole = n // chunk
        means = [row[c * chunk:(c + 1) * chunk].mean() for c in range(whole)]
        chosen.append(sorted(np.argsort(means)[::-1][:k].tolist()))
    return chosen


@pytest.mark.parametrize("seed", range(3))
def test_chunk_selection_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    b, hq, hkv, d, s, chunk, k = 3, 8, 2, 16, 600, 32, 5
    q = rng.normal(size=(b, hq, d)).astype(np.float32) * 2
    keys = rng.normal(size=(b, hkv, s, d)).astype(np.float32)
    length = np.array([600, 217, 100])  # the last row has fewer whole chunks (3) than k
    scores = small.chunk_means(small.attention_row(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(length)), chunk)
    ids, count = small.select_chunks(scores, jnp.asarray(length) // chunk, k)
    expected = numpy_chunks(q, keys, length, chunk, k)
    for r in range(b):
        assert np.asarray(ids[r, : int(count[r])]).tolist() == expected[r]
    assert np.asarray(count).tolist() == [5, 5, 3]


@pytest.mark.parametrize("rope_cfg", [RopeConfig(theta=10000.0),
                                      RopeConfig(theta=500000.0, kind="yarn", factor=8.0,
                                                 original_max_position_embeddings=64)], ids=["default", "yarn"])
def test_keys_stored_without_rope_rotate_to_any_position(rope_cfg):
    cfg = dataclasses.replace(make_target(16, layers=1).cfg, rope=rope_cfg)
    rng = np.random.default_rng(0)
    raw = jnp.asarray(rng.normal(size=(1, 2, cfg.num_kv_heads, 5, cfg.head_dim)).astype(np.float32))
    pos = jnp.asarray([[3, 900, 17, 4000, 0], [1, 2, 3, 4, 5]])
    cos, sin = rope.cos_sin(pos, rope.inverse_frequencies(cfg.rope, cfg.head_dim), rope.attention_scaling(cfg.rope),
                            jnp.float32)
    as_model = rope.apply_rope(raw[0].transpose(0, 2, 1, 3), cos, sin).transpose(0, 2, 1, 3)[None]
    np.testing.assert_allclose(small.rotate_keys(cfg, raw, pos), as_model, atol=1e-5)
    np.testing.assert_allclose(small.rotate_keys(cfg, as_model, pos, inverse=True), raw, atol=1e-4)


def test_rebuild_lays_out_chunks_then_tail():
    """Working slots hold the chosen chunks in order, then the tail from the chunk in progress on."""
    cfg = make_target(16, layers=1).cfg
    chunk, size = 4, 24
    s = 40
    pos = np.arange(s, dtype=np.float32)
    # Values carry each slot's original position, so the layout can be read back.
    v = jnp.broadcast_to(jnp.asarray(pos)[None, None, None, :, None], (1, 2, cfg.num_kv_heads, s, cfg.head_dim))
    store = KVCache(k=jnp.zeros_like(v), v=v, length=jnp.asarray([30, 9]))
    work = small.rebuild(cfg, store, jnp.asarray([[1, 5, 0], [0, 1, 0]]), jnp.asarray([2, 2]), chunk, size)
    got = np.asarray(work.v[0, :, 0, :, 0])
    np.testing.assert_array_equal(got[0, :10], [4, 5, 6, 7, 20, 21, 22, 23, 28, 29])
    assert int(work.length[0]) == 10
    np.testing.assert_array_equal(got[1, :9], np.arange(9))  # short context: every token, in order
    assert int(work.length[1]) == 9


@pytest.fixture(scope="module")
def pair():
    target = make_target(16)
    other = make_target(16, seed=5, layers=2)
    return target, SmallDraft(other.cfg, other.params, "random")


@pytest.mark.parametrize("spec", [
    sj.SpecConfig(**TREE, chunk_tokens=16, draft_chunks=4, retrieve_every=2),  # retrieval over a 1.5K context
    sj.SpecConfig(**TREE, draft_chunks=0),                                    # classic: the draft sees everything
    sj.SpecConfig(**TREE, chunk_tokens=16, draft_chunks=4, tree_beam=True),   # a beam tree
], ids=["retrieval", "full-draft-cache", "beam-tree"])
def test_greedy_specextend_equals_ar(pair, spec, monkeypatch):
    from specpv_jax import specextend

    target, draft = pair
    prompt = np.random.default_rng(1).integers(0, 16, 1500)
    ar = sj.generate(target, prompt, 40, eos_token_ids=())
    prefill_specs = []
    original = specextend.specextend_prefill_fn
    monkeypatch.setattr(specextend, "specextend_prefill_fn",
                        lambda run, s: prefill_specs.append(s) or original(run, s))
    out = sj.generate(target, prompt, 40, draft=draft, mode="specextend", spec=spec, eos_token_ids=())
    np.testing.assert_array_equal(out.tokens, ar.tokens)
    assert out.stats["steps"] < 40
    assert prefill_specs == [specextend.prefill_spec(spec)]


def test_greedy_specextend_batch_equals_ar(pair):
    """Ragged rows that stop at EOS at different times; a dynamic tree."""
    target, draft = pair
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 16, n).tolist() for n in (700, 90, 333)]
    spec = sj.SpecConfig(**TREE, chunk_tokens=16, draft_chunks=4, retrieve_every=2, tree_threshold=0.3)
    ar = sj.generate(target, prompts, 30, eos_token_ids=(3,))
    out = sj.generate(target, prompts, 30, draft=draft, mode="specextend", spec=spec, eos_token_ids=(3,))
    np.testing.assert_array_equal(out.lengths, ar.lengths)
    for r in range(3):
        np.testing.assert_array_equal(out.tokens[r, : ar.lengths[r]], ar.tokens[r, : ar.lengths[r]])


def test_prefill_spec_keeps_what_prefill_reads(pair):
    """Prefill was compiled again for each SpecConfig, though it reads only the retrieval settings and the tree's
    depth (a sweep over trees or budgets recompiled it each time): generate keys it on `prefill_spec`'s (checked
    in `test_greedy_specextend_equals_ar`), which starts the draft as the whole SpecConfig does."""
    from specpv_jax import specextend

    target, draft = pair
    spec = sj.SpecConfig(**TREE, chunk_tokens=16, draft_chunks=4, retrieve_every=2)
    others = [dataclasses.replace(spec, tree_nodes=5, tree_top_k=2, tree_threshold=0.3, tree_beam=True,
                                  retrieval_tokens=512, window_tokens=64, sink_tokens=0, bounded_draft=True)]
    assert {specextend.prefill_spec(s) for s in [spec, *others]} == {specextend.prefill_spec(spec)}
    assert specextend.prefill_spec(dataclasses.replace(spec, retrieve_every=3)) != specextend.prefill_spec(spec)
    cache = KVCache.for_model(draft.cfg, 1, 600)
    cache = cache.replace(k=jax.random.normal(jax.random.key(0), cache.k.shape), length=jnp.asarray([500]))
    start = jax.jit(small.start, static_argnums=(0, 1))
    started, reduced = (start(draft.cfg, s, cache) for s in (spec, specextend.prefill_spec(spec)))
    for a, b in zip(jax.tree.leaves(started), jax.tree.leaves(reduced)):
        np.testing.assert_array_equal(a, b)


def test_target_as_its_own_draft_accepts_every_token(pair):
    """The draft's tree mechanics (positions, masks, earlier levels' K/V, working cache) are exact:
    drafting with the target itself and a working cache that holds the whole context, every drafted
    token of the best path is accepted."""
    target, _ = pair
    draft = SmallDraft(target.cfg, target.params)
    prompt = np.random.default_rng(3).integers(0, 16, 400)
    spec = sj.SpecConfig(**TREE, chunk_tokens=16, draft_chunks=64, retrieve_every=2)
    out = sj.generate(target, prompt, 41, draft=draft, mode="specextend", spec=spec, eos_token_ids=())
    assert out.stats["steps"] == 8  # 40 tokens after the first, 5 per verification
    np.testing.assert_array_equal(out.tokens, sj.generate(target, prompt, 41, eos_token_ids=()).tokens)


def test_sampling_is_lossless():
    """The joint law of the first three new tokens under `specextend` (temperature 0.7, top_p 0.8) is the
    target's."""
    vocab = 8
    target = make_target(vocab, seed=3, layers=2, sharpen=1.0)
    d = make_target(vocab, seed=4, layers=2, sharpen=1.0)
    draft = SmallDraft(d.cfg, d.params)
    prompt = [1, 5, 2, 7, 3]
    # A working cache of a few 4-token chunks, re-chosen every step: retrieval runs, and stays cheap at 4096 rows.
    spec = sj.SpecConfig(tree_depth=2, tree_top_k=5, tree_nodes=10, chunk_tokens=4, draft_chunks=2, retrieve_every=1)
    out = sj.generate(target, [prompt] * 4096, 3, draft=draft, mode="specextend", spec=spec, temperature=0.7,
                      top_p=0.8, seed=11, eos_token_ids=())
    assert out.stats["mean_accept_len"] > 1.2  # drafted tokens are accepted, so rejection is exercised
    law = three_token_law(target, prompt, Sampler.create(0.7, 0.8))
    assert chi_square_pvalue(three_token_cells(out.tokens, vocab), law) > 1e-3


def test_load_draft_reads_a_plain_model_dir_and_checks_the_vocabulary(tmp_path, pair):
    from convert.hf import export_hf

    target, draft = pair
    export_hf(tmp_path / "small", draft.cfg, draft.params)
    loaded = sj.load_draft(tmp_path / "small", target)
    assert loaded.kind == "small" and loaded.cfg == draft.cfg
    sj.save_draft(loaded, tmp_path / "orbax")
    again = sj.load_draft(tmp_path / "orbax", target)
    assert again.kind == "small"
    np.testing.assert_array_equal(again.params["embed_tokens"]["embedding"], draft.params["embed_tokens"]["embedding"])

    wide = make_target(32, layers=1)
    export_hf(tmp_path / "wide", wide.cfg, wide.params)
    with pytest.raises(ValueError, match=r"wide.*32 tokens, the target's 16"):
        sj.load_draft(tmp_path / "wide", target)


def test_modes_name_the_draft_they_need(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="needs an EAGLE-3 head.*modes for it: specextend"):
        sj.generate(target, [1, 2, 3], 4, draft=draft, mode="eagle")
    with pytest.raises(ValueError, match="needs a small draft model"):
        sj.generate(target, [1, 2, 3], 4, draft=make_head(target), mode="specextend")


def test_config_rejects_bad_retrieval_settings():
    for bad in (dict(chunk_tokens=0), dict(draft_chunks=-1), dict(retrieve_every=0), dict(tree_threshold=1.0)):
        with pytest.raises(sj.config.ConfigError, match=next(iter(bad))):
            sj.SpecConfig(**bad)


def test_draft_memory_does_not_grow_with_context(pair):
    """The working cache the draft attends to has the same size at any prompt length."""
    target, draft = pair
    spec = sj.SpecConfig(**TREE, chunk_tokens=16, draft_chunks=4)
    sizes = []
    for n in (300, 3000):
        cache = KVCache.for_model(draft.cfg, 1, n + 64)
        state = small.start(draft.cfg, spec, cache.replace(length=jnp.asarray([n])))
        sizes.append(state.work.k.shape)
        assert int(state.work.length[0]) < state.work.max_len == spec.draft_working_slots(n + 64)
    assert sizes[0] == sizes[1]
    # ...and never more than the whole sequence's: hardly ever retrieving (retrieve_every=10**6) sized it
    # for 5M slots, and the process was killed for memory at a 300-token prompt
    rare = dataclasses.replace(spec, retrieve_every=10**6)
    cache = KVCache.for_model(draft.cfg, 1, 300 + 64)
    assert small.start(draft.cfg, rare, cache.replace(length=jnp.asarray([300]))).work.max_len == cache.max_len
    jax.clear_caches()


def test_make_generate_fn_runs_specextend_under_jit(pair):
    target, draft = pair
    spec = sj.SpecConfig(**TREE, chunk_tokens=16, draft_chunks=4, retrieve_every=2)
    prompt = np.random.default_rng(1).integers(0, 16, 1500)
    fn = jax.jit(sj.make_generate_fn(target.cfg, spec, mode="specextend", draft_cfg=draft.cfg, max_new_tokens=40,
                                     eos_token_ids=()))
    tokens, lengths = fn(target.params, {"params": draft.params, "d2t": None}, prompt[None], jax.random.key(0))
    expected = sj.generate(target, prompt, 40, draft=draft, mode="specextend", spec=spec, eos_token_ids=())
    np.testing.assert_array_equal(np.asarray(tokens), expected.tokens)


@pytest.mark.parametrize("qwen", [False, True], ids=["llama", "qwen3-like"])
def test_layer_queries_match_the_attention_module(qwen):
    """Retrieval recomputes the target's last-layer queries from its captured inputs."""
    from specpv_jax import model as M
    from specpv_jax.attention import causal_mask

    cfg = dataclasses.replace(make_target(16, layers=3).cfg, qkv_bias=qwen, qk_norm=qwen)
    params = M.init_params(cfg, jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (2, 5, cfg.hidden_size))
    pos = jnp.asarray([[0, 1, 2, 3, 4], [70, 71, 72, 73, 74]])
    layer = jax.tree.map(lambda a: a[2], params["layers"])
    h = M.RMSNorm(cfg.rms_norm_eps).apply({"params": layer["input_layernorm"]}, x)
    cos, sin = rope.cos_sin(pos, rope.inverse_frequencies(cfg.rope, cfg.head_dim), 1.0, jnp.float32)
    attention = M.Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, cfg.qkv_bias,
                            cfg.o_bias, cfg.qk_norm, cfg.rms_norm_eps)
    _, q, *_ = attention.apply({"params": layer["self_attn"]}, h, cos, sin, None, None, None, causal_mask(2, 5))
    np.testing.assert_allclose(M.layer_queries(params, cfg, 2, x, pos), q, atol=1e-5)


@pytest.mark.parametrize("threshold", [0.0, 0.25, 0.3])
def test_dynamic_tree_stops_drafting_below_the_threshold(threshold):
    """OPT-tree's rule. Level-1 paths have probability .5/.3/.2 (expected length 1) and each node's three
    children .28/.24/.24 of it: level 2 adds .76 and level 3 (the children of the best three, .14/.12/.12)
    adds .289, so level 4 is drafted under threshold 0.25 but not 0.3."""
    from specpv_jax.tree import grow_tree

    vocab, k, depth = 16, 3, 4
    first = np.full(vocab, 1e-9)
    first[[5, 6, 7]] = [0.5, 0.3, 0.2]

    def expand(level, slot, tokens, parent, mask, carry):
        p = np.full(vocab, 1e-9)
        p[[4, 8, 9]] = 0.24
        p[10 + level] = 0.28  # each level's favourite
        return jnp.log(jnp.broadcast_to(jnp.asarray(p, jnp.float32), (1, k, vocab))), carry

    tree = grow_tree(jnp.asarray([3]), jnp.log(jnp.asarray(first, jnp.float32))[None], expand, None, k, depth,
                     k + (depth - 1) * k * k, threshold)
    deepest = np.asarray(tree.tokens[0])[np.asarray(tree.depth[0]) == depth]
    assert (13 in deepest) == (threshold < 0.289)
    assert 12 in np.asarray(tree.tokens[0])  # level 2 was drafted either way


def test_windowed_prefill_sees_the_latest_window_positions_only():
    """`prefill(window=)` chunk by chunk over a cache (SpecExtend's draft prefill) computes what one pass over the
    whole prompt computes under a band mask: each token sees itself and the window - 1 positions before it."""
    from specpv_jax import model as M
    from specpv_jax.loop import Run, prefill

    target = make_target(16, seed=1)
    cfg, window, t = target.cfg, 20, 96
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, t)), jnp.int32)
    lengths = jnp.asarray([t, 70], jnp.int32)
    gap = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
    band = jnp.broadcast_to((gap >= 0) & (gap < window), (2, t, t))
    whole = M.forward(target.params, cfg, ids, jnp.broadcast_to(jnp.arange(t), (2, t)), None, band).hidden
    cache = KVCache.for_model(cfg, 2, t, jnp.float32)
    _, last, _, _ = prefill(target.params, Run(cfg=cfg, out_slots=0, chunk=32), ids, lengths, cache, window=window)
    np.testing.assert_allclose(last, whole[jnp.arange(2), lengths - 1], atol=1e-5)
    _, unbounded, _, _ = prefill(target.params, Run(cfg=cfg, out_slots=0, chunk=32), ids, lengths, cache)
    assert np.abs(unbounded - last).max() > 1e-3  # the window is what made the difference
