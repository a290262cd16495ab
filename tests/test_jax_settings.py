"""A caller's process-wide JAX settings (64-bit types, strict promotion, no jit, a transfer guard) change
nothing: the library runs under JAX's defaults (`specpv_jax.jax_settings`), moves arrays explicitly, and its
compiled programs and cached stages are bounded."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import weakref

import jax
import numpy as np
import pytest
from test_eagle import make_head, make_target

import specpv_jax as sj
from specpv_jax import host

SPEC = sj.SpecConfig(tree_depth=3, tree_top_k=3, tree_nodes=8, sink_tokens=16, retrieval_tokens=32,
                     window_tokens=16)


@contextlib.contextmanager
def unusual_settings():
    with jax.enable_x64(True), jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture(scope="module")
def models():
    target = make_target(16)
    return target, make_head(target)


@pytest.mark.parametrize("mode, temperature", [("ar", 0.0), ("specpv", 0.0), ("exact", 0.8)])
def test_generate_is_the_same_under_x64_and_strict_promotion(models, mode, temperature):
    """These settings made every mode fail while tracing (int64 layer indices beside int32 positions, bool +
    int32 counters, RMSNorm's broadcast scale); they compile nothing new either."""
    target, head = models
    prompt = np.arange(200) % 16
    kw = dict(draft=None if mode == "ar" else head, mode=mode, spec=SPEC, temperature=temperature, seed=3,
              eos_token_ids=(), progress=False)
    expected = sj.generate(target, prompt, 24, **kw)
    compiled = set(host._EXECUTABLES)
    with unusual_settings():
        out = sj.generate(target, prompt, 24, **kw)
    np.testing.assert_array_equal(out.tokens, expected.tokens)
    assert out.stats["partial_verifications"] == expected.stats["partial_verifications"]
    assert set(host._EXECUTABLES) == compiled


def test_forward_logits_and_a_jitted_generate_fn_under_x64(models):
    target, head = models
    prompt = (np.arange(100) % 16)[None]
    fn = sj.make_generate_fn(target.cfg, SPEC, mode="specpv", draft_cfg=head.cfg, max_new_tokens=16)
    draft_params = {"params": head.params, "d2t": head.d2t}
    expected = jax.jit(fn)(target.params, draft_params, prompt, jax.random.key(0))
    logits = sj.forward_logits(target, prompt)
    with unusual_settings():
        tokens, lengths = jax.jit(fn)(target.params, draft_params, prompt, jax.random.key(0))
        np.testing.assert_array_equal(sj.forward_logits(target, prompt), logits)
    np.testing.assert_array_equal(tokens, expected[0])
    assert tokens.dtype == lengths.dtype == np.int32


def test_checkpoints_round_trip_under_x64(models, tmp_path):
    target, head = models
    with jax.enable_x64(True):
        sj.save_target(target, tmp_path / "target")
        sj.save_draft(head, tmp_path / "head")
        loaded = sj.load_target(tmp_path / "target", progress=False)
        draft = sj.load_draft(tmp_path / "head", loaded)  # traced the head's init with int64 indices: failed
    assert jax.tree.map(lambda x: x.dtype, loaded.params) == jax.tree.map(lambda x: x.dtype, target.params)
    np.testing.assert_array_equal(draft.d2t, head.d2t)


def test_generate_and_forward_logits_under_a_transfer_guard(models):
    """Research code that forbids implicit transfers (`jax.transfer_guard("disallow")`) can call generate and
    forward_logits: they place their inputs and read their results explicitly. Same output as unguarded."""
    from specpv_jax.draft.small import SmallDraft

    target, head = models
    prompts = [np.arange(200) % 16, np.arange(41) % 13]
    streamed = []
    cases = {"ar": {}, "specextend": dict(draft=SmallDraft(target.cfg, target.params)),
             "specpv": dict(draft=head, temperature=0.8, seed=2 ** 33 + 1, stream=streamed.append),
             "exact": dict(draft=head, spec=dataclasses.replace(SPEC, offload=True))}
    for mode, kwargs in cases.items():
        kwargs = dict(dict(spec=SPEC, eos_token_ids=(), progress=False), **kwargs)
        expected = sj.generate(target, prompts, 12, mode=mode, **kwargs)
        streamed.clear()
        given = jax.device_put(prompts) if mode == "ar" else prompts  # rows as JAX arrays: read explicitly
        with jax.transfer_guard("disallow"):  # refused generate's prompts, seeds, empty caches, result...
            out = sj.generate(target, given, 12, mode=mode, **kwargs)
        np.testing.assert_array_equal(out.tokens, expected.tokens, err_msg=mode)
        if "stream" in kwargs:  # ... and JAX's token for ordered callbacks
            for r, n in enumerate(out.lengths):
                np.testing.assert_array_equal(np.concatenate([s[r] for s in streamed]), out.tokens[r, :n])
    expected = sj.forward_logits(target, prompts[1])
    with jax.transfer_guard("disallow"):
        np.testing.assert_array_equal(sj.forward_logits(target, prompts[1]), expected)
    # make_generate_fn's function called outside a jit, its arguments on the device (checked by value too)
    fn = sj.make_generate_fn(target.cfg, SPEC, mode="eagle", draft_cfg=head.cfg, max_new_tokens=6, eos_token_ids=())
    ids, key, draft = jax.device_put((prompts[1][None], jax.random.key(0), {"params": head.params, "d2t": head.d2t}))
    expected, outside = jax.device_get(fn(target.params, draft, ids, key)), ids + target.cfg.vocab_size
    with jax.transfer_guard("disallow"):
        got = jax.device_get(fn(target.params, draft, ids, key))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            fn(target.params, draft, outside, key)
    np.testing.assert_array_equal(got[0], expected[0])


@pytest.mark.slow  # 43-46 s of make test's 25 min on a slow day (2 cores): `make test-slow`
def test_generate_runs_without_jit(models):
    """jax.disable_jit (for debugging) ran nothing: generate compiles ahead of time, which it cannot do."""
    target, head = models
    prompt = np.arange(40) % 16
    expected = sj.generate(target, prompt, 3, draft=head, mode="eagle", spec=SPEC, eos_token_ids=())
    with jax.disable_jit():
        out = sj.generate(target, prompt, 3, draft=head, mode="eagle", spec=SPEC, eos_token_ids=())
    np.testing.assert_array_equal(out.tokens, expected.tokens)


def test_stage_factories_keep_as_many_stages_as_timed_call_keeps_executables(models):
    """Each jitted stage holds its traces: kept for every setting a process tried, memory grew without bound."""
    from specpv_jax import speculative
    from specpv_jax.loop import Run

    target, _ = models
    runs = [Run(cfg=target.cfg, out_slots=16, chunk=chunk, attention="xla")
            for chunk in range(1, 2 + host.MAX_EXECUTABLES)]
    first = weakref.ref(speculative.eagle_prefill_fn(runs[0]))
    for run in runs[1:-1]:
        speculative.eagle_prefill_fn(run)
    gc.collect()
    assert first() is not None  # still among the last MAX_EXECUTABLES
    speculative.eagle_prefill_fn(runs[-1])
    gc.collect()
    assert first() is None


def test_the_demo_models_cache_can_still_be_cleared():
    assert sj.demo_models.cache_info().maxsize == 4  # the settings wrapper sits inside the cache
    sj.demo_models.cache_clear()


def test_the_cli_runs_under_jax_defaults(monkeypatch):
    from specpv_jax import cli

    seen = []
    monkeypatch.setattr(cli, "_cmd_plan", lambda args: seen.append(jax.numpy.asarray(1).dtype) or 0)
    with unusual_settings():
        assert cli.main(["plan", "--model", "llama-3.1-8b", "--context", "9"]) == 0
    assert seen == [np.dtype("int32")]  # int64 under the caller's x64
