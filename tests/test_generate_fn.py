"""Generation for users: `make_generate_fn` under the user's own jit and vmap, and streaming."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specpv_jax as sj
from test_eagle import make_head, make_target

SPEC = sj.SpecConfig(tree_depth=3, tree_top_k=3, tree_nodes=8, sink_tokens=16, retrieval_tokens=64,
                     window_tokens=32)


@pytest.mark.parametrize("mode", ["ar", pytest.param("eagle", marks=pytest.mark.slow), "exact"])
def test_jitted_generate_fn_equals_generate(mode):
    target = make_target(96, seed=2, layers=4)
    head = make_head(target, seed=3)
    ids = np.random.default_rng(0).integers(0, 96, (2, 150)).astype(np.int32)
    draft = None if mode == "ar" else head
    fn = sj.make_generate_fn(target.cfg, SPEC, mode=mode, draft_cfg=getattr(draft, "cfg", None), max_new_tokens=20,
                             eos_token_ids=())
    user_fn = jax.jit(lambda p, d, x, k: fn(p, d, x, k))  # the user's own outer jit
    tokens, lengths = user_fn(target.params, {"params": head.params, "d2t": head.d2t}, ids, jax.random.key(0))
    ref = sj.generate(target, ids, max_new_tokens=20, mode=mode, draft=draft, spec=SPEC, eos_token_ids=())
    assert tokens.shape == (2, 20)
    np.testing.assert_array_equal(np.asarray(lengths), ref.lengths)
    np.testing.assert_array_equal(np.asarray(tokens), ref.tokens)


@pytest.mark.parametrize("mode", ["ar", "exact"])
def test_vmap_over_keys_draws_independent_samples(mode):
    """Each vmapped sample equals its own call; in exact mode the verification branches (`run_if`) then run
    for every sample that needs them, with a batched condition (ar: from the 16 likeliest tokens)."""
    target = make_target(64, seed=4, layers=2, sharpen=0.5)
    head = make_head(target, seed=3)
    ids = np.random.default_rng(0).integers(0, 64, (1, 300 if mode == "exact" else 10)).astype(np.int32)
    spec = dataclasses.replace(SPEC, bounded_draft=mode != "ar")
    fn = sj.make_generate_fn(target.cfg, spec, mode=mode, draft_cfg=None if mode == "ar" else head.cfg,
                             max_new_tokens=16, temperature=1.0,
                             top_k=16 if mode == "ar" else 0, eos_token_ids=())
    draft = {"params": head.params, "d2t": head.d2t}
    keys = jax.random.split(jax.random.key(1), 3)
    tokens, _ = jax.jit(jax.vmap(fn, in_axes=(None, None, None, 0)))(target.params, draft, ids, keys)
    for i in range(3):
        single, _ = jax.jit(fn)(target.params, draft, ids, keys[i])
        np.testing.assert_array_equal(np.asarray(tokens[i]), np.asarray(single))
    assert len({tuple(np.asarray(t[0])) for t in tokens}) > 1
    if mode == "exact":  # the run takes both kinds of step
        stats = sj.generate(target, ids, 16, draft=head, mode=mode, spec=spec, temperature=1.0, eos_token_ids=()).stats
        assert stats["partial_verifications"] > 0 and stats["full_verifications"] > 0


def test_make_generate_fn_checks_its_settings():
    target = make_target(64, layers=2)
    misfit = dataclasses.replace(make_head(target, seed=3).cfg, feature_layers=(0, 1, 5))
    with pytest.raises(ValueError, match="draft_cfg"):
        sj.make_generate_fn(target.cfg, mode="eagle")
    with pytest.raises(ValueError, match="modes"):
        sj.make_generate_fn(target.cfg, mode="medusa")
    for setting, message in [({"max_new_tokens": 0}, "max_new_tokens"), ({"prefill_chunk": 0}, "prefill_chunk"),
                             ({"temperature": -1.0}, "temperature"), ({"top_k": -1}, "top_k"),
                             ({"attention": "bogus"}, "bogus"),
                             ({"eos_token_ids": 64}, "eos_token_ids"),
                             ({"mode": "eagle", "draft_cfg": target.cfg}, "needs the config of an EAGLE-3 head"),
                             ({"mode": "eagle", "draft_cfg": misfit},
                              r"feature layers \[5\] are outside the target's 2 layers")]:
        with pytest.raises(ValueError, match=message):  # when the function is made, not when it first runs
            sj.make_generate_fn(target.cfg, **setting)
    with pytest.raises(TypeError, match=r"target_cfg must be the target's ModelConfig \(target.cfg\), got Model"):
        sj.make_generate_fn(target)  # (was "'Model' object has no attribute 'eos_token_ids'")


def test_make_generate_fn_checks_its_arguments():
    target = make_target(64, layers=2)
    head = make_head(target, seed=3)
    fn = sj.make_generate_fn(target.cfg, SPEC, mode="eagle", draft_cfg=head.cfg, max_new_tokens=8)
    draft, key, ids = {"params": head.params, "d2t": head.d2t}, jax.random.key(0), np.full((1, 6), 5, np.int32)
    for bad, message in [(ids.astype(np.float32), "integer array"), (ids[0], r"\[B, T\]"), (ids[:, :0], "non-empty"),
                         (ids[:0], r"non-empty integer array \[B, T\], got shape \(0, 6\)"),  # was: modulo by zero
                         (ids + 64, "outside the vocabulary"),
                         (np.full((1, target.cfg.max_position_embeddings - 7), 5), "max_position_embeddings")]:
        with pytest.raises(ValueError, match=message):
            fn(target.params, draft, bad, key)
    for missing in (None, {"params": head.params}):
        with pytest.raises(ValueError, match=r'needs draft_params=\{"params": draft.params, "d2t": draft.d2t\}'):
            fn(target.params, missing, ids, key)
    with pytest.raises(ValueError, match="key must be a PRNG key"):
        fn(target.params, draft, ids, 0)
    with pytest.raises(ValueError, match=r"key must be one PRNG key, got a batch of shape \(2,\): vmap"):
        fn(target.params, draft, ids, jax.random.split(key))  # (failed inside the loop: "split accepts a single key")
    resized = {**target.params, "embed_tokens": {"embedding": jnp.zeros((80, 64))}}  # tokens added, config not
    with pytest.raises(ValueError, match=r"embed_tokens/embedding has shape \(80, 64\), the configuration implies "
                                         r"\(64, 64\)"):  # (it emitted ids past the vocabulary, silently)
        jax.jit(fn)(resized, draft, ids, key)
    with pytest.raises(TypeError, match=r"the target's params must be a parameter tree \(target.params\), got Model"):
        fn(target, draft, ids, key)


def _collect():
    got: list[list[int]] = []

    def stream(rows):
        while len(got) < len(rows):
            got.append([])
        for acc, new in zip(got, rows):
            acc.extend(int(t) for t in new)

    return got, stream


@pytest.mark.parametrize("mode", ["ar", "eagle"])
def test_stream_delivers_exactly_the_output(mode):
    target = make_target(96, seed=2, layers=4)
    head = make_head(target, seed=3)
    got, stream = _collect()
    prompts = [list(range(5, 30)), list(range(40, 52))]
    out = sj.generate(target, prompts, 17, mode=mode, draft=None if mode == "ar" else head, spec=SPEC,
                      eos_token_ids=(), stream=stream)
    assert got == [out.tokens[b, : out.lengths[b]].tolist() for b in range(2)]


def test_reports_arriving_out_of_order_deliver_each_token_once_in_order():
    """Unordered callbacks (several devices, offload) may run a step's report before the previous step's: the
    later report delivers both steps' tokens, the late one nothing, and a step that emitted nothing for a row
    gives it an empty array."""
    from specpv_jax import host

    got, stream = _collect()
    buffer = np.array([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    calls = []
    with host.streaming_to(lambda rows: (calls.append([r.tolist() for r in rows]), stream(rows))):
        for count in ([1, 1], [3, 2], [2, 2], [5, 2], [4, 4]):  # the third and fifth arrive late
            host.deliver(buffer, np.array(count))
    assert got == [[10, 11, 12, 13, 14], [20, 21, 22, 23]]
    assert calls == [[[10], [20]], [[11, 12], [21]], [[], []], [[13, 14], []], [[], [22, 23]]]


def test_exact_mode_streams_only_confirmed_tokens():
    """With rollbacks of provisional tokens, the stream still equals the final output token for token."""
    target = make_target(8, seed=3, layers=7, sharpen=1.0)
    head = make_head(target, draft_vocab=6, seed=4)
    spec = sj.SpecConfig(sink_tokens=16, retrieval_tokens=16, window_tokens=16, tree_depth=2, tree_top_k=5,
                         tree_nodes=10)
    prompt = list(np.random.default_rng(6).integers(0, 8, 64))
    got, stream = _collect()
    out = sj.generate(target, [prompt] * 4, 40, draft=head, mode="exact", spec=spec, temperature=1.0, seed=1,
                      eos_token_ids=(), stream=stream)
    assert out.stats["rollbacks"] > 0
    assert got == [out.tokens[b, : out.lengths[b]].tolist() for b in range(4)]
    # One row: tokens emitted (confirmed) per verification, not provisional tokens later rolled back.
    one = sj.generate(target, [prompt], 40, draft=head, mode="exact", spec=spec, temperature=1.0, seed=1,
                      eos_token_ids=()).stats
    assert one["rollbacks"] > 0
    assert one["mean_accept_len"] == pytest.approx((one["new_tokens"] - 1) / one["steps"])


def test_a_new_stream_function_reuses_the_compiled_loop():
    """A server passes a new callback per request; one compiled loop serves them all."""
    from specpv_jax import host

    target = make_target(96, seed=2, layers=2)
    outputs = []
    for _ in range(2):
        got, stream = _collect()
        out = sj.generate(target, [[5, 6, 7]], 9, eos_token_ids=(), stream=stream)
        outputs.append(got)
        compiled = set(host._EXECUTABLES)
    assert outputs[0] == outputs[1] == [out.tokens[0].tolist()]
    got, stream = _collect()
    sj.generate(target, [[5, 6, 7]], 9, eos_token_ids=(), stream=stream)
    assert set(host._EXECUTABLES) == compiled
