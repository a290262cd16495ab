"""SpecPV with the full cache in host memory (`SpecConfig(offload=True)`): the pieces against their device
versions, and generation against the same run with the cache on the device."""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from test_eagle import make_head, make_target
from test_memory import compiled_peak
from test_specpv import cache_copies, random_cache, small_spec

import specpv_jax as sj
from specpv_jax import host, memory, offload, prompts, retrieval, specpv, speculative
from specpv_jax.cache import BlockSummary, KVCache, commit_path, write_all_layers
from specpv_jax.config import DraftConfig, ModelConfig
from specpv_jax.draft import eagle3
from specpv_jax.generate import _eos_ids, _plan
from specpv_jax.host import timed_call
from specpv_jax.model import init_params
from specpv_jax.sampling import Sampler

SPEC = small_spec()  # partial threshold 128 tokens: partial steps at once, full steps every ~20 tokens
NEW_TOKENS, CHUNK = 48, 128


def in_host_memory(tree):
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding.with_memory_kind(offload.HOST)), tree)


def on_device(x):
    return jnp.asarray(np.asarray(x))


def test_write_rows_matches_the_device_write():
    rng = np.random.default_rng(0)
    buf = jnp.asarray(rng.standard_normal((3, 2, 2, 64, 4)), jnp.float32)
    new = jnp.asarray(rng.standard_normal((3, 2, 2, 16, 4)), jnp.float32)
    write = jax.jit(offload.write_rows)
    for start in (jnp.int32(32), jnp.array([0, 48], jnp.int32)):
        got = write(in_host_memory(buf), new, start)
        assert got.sharding.memory_kind == offload.HOST
        want = write_all_layers(buf, new, jnp.broadcast_to(start, (2,)))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # One layer at a time (as the full step's refresh writes back), rows at their own slots.
    got = write(in_host_memory(buf), new[1:2], jnp.array([5, 17], jnp.int32), 2)
    want = buf.at[2].set(write_all_layers(buf[2:3], new[1:2], jnp.array([5, 17]))[0])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="cannot write"):
        offload.write_rows(in_host_memory(buf), jnp.zeros((3, 2, 2, 65, 4)), 0)


@pytest.mark.parametrize("lengths, n_missing, seed, retrieved", [
    ((300, 505), (3, 0), 2, 64), ((127, 250), (5, 5), 3, 64), ((465, 140), (0, 4), 4, 64),
    ((300, 200), (2, 1), 5, 0)])  # no retrieval: sink and window only
def test_commit_and_refresh_matches_the_device_path(lengths, n_missing, seed, retrieved):
    """Commit, summary update and partial refresh of a full step, against `commit_path` + `update` + `refresh`.
    Row 1 of the first case sits so close to the end that its tail span is clamped (a finished row's scratch);
    a row just below the partial threshold crosses it; a row whose step made a block a retrieval candidate
    retrieves it (inside the tail span, not among the blocks the forward kept)."""
    rng = np.random.default_rng(seed)
    m, n_tree = 5, 6
    cache = random_cache(rng, size=512, lengths=lengths)
    full_len = cache.length
    new_k, new_v = (jnp.asarray(rng.standard_normal((2, 2, 2, m + n_tree, 8)), jnp.float32) for _ in range(2))
    path, count, n_missing = jnp.array([[0, 2, 4], [0, 1, 3]]), jnp.array([2, 1]), jnp.array(n_missing)
    spec, blocks_to_update = small_spec(retrieval_tokens=retrieved), (m + n_tree) // 16 + 2
    scores = jnp.asarray(rng.standard_normal((2, 2, 2, 32)), jnp.float32)
    end = full_len + n_missing + count + 1
    newly = (end - spec.window_tokens) // spec.block_size - 1  # the last candidate under `end`
    assert np.any(newly >= (full_len - spec.window_tokens) // spec.block_size) or not retrieved  # new under `end`
    assert spec.partial_threshold < np.min(np.asarray(end))
    scores = scores.at[:, jnp.arange(2), :, newly].set(10.0)
    partial = retrieval.empty_partial(cache, spec)

    @jax.jit
    def device_path(cache):  # what `specpv.full_step` does with the cache on the device
        written = cache.replace(k=write_all_layers(cache.k, new_k, full_len),
                                v=write_all_layers(cache.v, new_v, full_len))
        want = commit_path(written, path, count, src=full_len + m, dst=full_len + n_missing)
        summary = BlockSummary.of(cache, spec.block_size)
        blocks = retrieval.select_blocks(scores, want.length, spec)
        return (want, summary, summary.update(want, full_len, blocks_to_update), blocks,
                retrieval.refresh(partial, want, blocks, spec))

    want, summary, want_summary, blocks, want_partial = device_path(cache)

    # What the step's forward keeps as each layer streams past (from the cache before the step).
    kept = jax.jit(jax.vmap(offload.keeper(full_len, spec, blocks_to_update, cache.max_len)))(cache.k, cache.v,
                                                                                            scores)

    @jax.jit
    def host_path(host_cache, host_summary):
        k, v = (offload.committed(x, path, n_missing, m) for x in (new_k, new_v))
        return offload.commit_and_refresh(host_cache.replace(length=want.length), kept, k, v, full_len,
                                          host_summary, blocks_to_update, partial, blocks, spec)

    got, got_summary, got_partial = host_path(in_host_memory(cache), in_host_memory(summary))
    assert got.k.sharding.memory_kind == got_summary.kmax.sharding.memory_kind == offload.HOST
    # Written back in one update per buffer: a loop that read one layer while writing another made XLA copy
    # the whole host cache every layer.
    compiled = host_path.lower(in_host_memory(cache), in_host_memory(summary)).compile().as_text()
    assert f"f32[{','.join(map(str, cache.k.shape))}]" not in cache_copies(compiled)
    for b, n in enumerate(np.asarray(want.length)):
        for name in ("k", "v"):
            np.testing.assert_array_equal(np.asarray(getattr(got, name))[:, b, :, :n],
                                          np.asarray(getattr(want, name))[:, b, :, :n])
    np.testing.assert_array_equal(np.asarray(got_summary.kmax), np.asarray(want_summary.kmax))
    np.testing.assert_array_equal(np.asarray(got_summary.kmin), np.asarray(want_summary.kmin))
    np.testing.assert_array_equal(np.asarray(got_partial.k), np.asarray(want_partial.k))
    np.testing.assert_array_equal(np.asarray(got_partial.length), np.asarray(want_partial.length))


@pytest.fixture(scope="module")
def models():
    target = make_target(16, layers=2)
    return target, make_head(target, draft_vocab=12)


def decode(target, head, rows, mode, spec):
    """What `generate` runs, returning the decode loop's outputs (with the caches); shares its compiled code."""
    batch = prompts.prepare(rows, target.cfg, NEW_TOKENS, CHUNK)
    eos = _eos_ids(target.cfg, ())
    run, max_len = _plan(target.cfg, spec, mode, head.cfg, NEW_TOKENS, batch.ids.shape[1],
                         min(CHUNK, batch.ids.shape[1]), "xla")
    b = batch.batch
    cache = (offload.empty_cache(target.cfg, b, max_len, jnp.float32) if run.offload
             else KVCache.for_model(target.cfg, b, max_len))
    (cache, draft_cache, logits, feats), _ = timed_call(
        speculative.eagle_prefill_fn(run.prefill_key), target.params, head.params, jnp.asarray(batch.ids),
        jnp.asarray(batch.lengths), cache, eagle3.empty_cache(head.cfg, b, max_len, head.params))
    args = (target.params, head.params, head.d2t, cache, draft_cache, logits, feats, jax.random.key(0),
            Sampler.create(), jnp.asarray(eos), jnp.asarray(NEW_TOKENS, jnp.int32))
    if run.offload:
        args += (offload.empty_summary(cache, spec.block_size),)
    return timed_call(specpv.specpv_decode_fn(run), *args)[0]


def prefill(target, head, batch, spec, chunk):
    """`generate`'s EAGLE-3 prefill of `batch`: (target cache, head cache, logits, last features)."""
    run, max_len = _plan(target.cfg, spec, "exact", head.cfg, NEW_TOKENS, batch.ids.shape[1], chunk, "xla")
    b = batch.batch
    cache = (offload.empty_cache(target.cfg, b, max_len, jnp.float32) if run.offload
             else KVCache.for_model(target.cfg, b, max_len))
    return speculative.eagle_prefill_fn(run.prefill_key)(target.params, head.params, jnp.asarray(batch.ids),
                                                         jnp.asarray(batch.lengths), cache,
                                                         eagle3.empty_cache(head.cfg, b, max_len, head.params))


@pytest.mark.parametrize("chunk, chunks", [(CHUNK, 3), (512, 1)])
def test_offloaded_prefill_runs_a_layer_at_a_time_with_the_same_results(models, chunk, chunks):
    """Into host memory the target prefills a layer at a time (each layer's K/V written once, never read
    back): the caches, logits and features equal the chunk-at-a-time prefill's on the device. With several
    chunks each layer's later chunks read its earlier ones; a prompt of one chunk was NaN once (XLA CPU)."""
    target, head = models
    rng = np.random.default_rng(0)
    batch = prompts.prepare([list(rng.integers(1, 16, 300)), list(rng.integers(1, 16, 230))], target.cfg,
                            NEW_TOKENS, chunk)
    assert batch.ids.shape[1] // chunk == chunks
    with jax.default_matmul_precision("default"):  # as users run it (this suite's default is "highest")
        want = prefill(target, head, batch, SPEC, chunk)
        got = prefill(target, head, batch, dataclasses.replace(SPEC, offload=True), chunk)
    assert got[0].k.sharding.memory_kind == offload.HOST
    for b, n in enumerate(batch.lengths):
        for name in ("k", "v"):
            np.testing.assert_allclose(np.asarray(getattr(got[0], name))[:, b, :, :n],
                                       np.asarray(getattr(want[0], name))[:, b, :, :n], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(np.asarray(getattr(got[1], name))[:, b, :, :n - 1],
                                       np.asarray(getattr(want[1], name))[:, b, :, :n - 1], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got[0].length), batch.lengths)
    np.testing.assert_array_equal(np.asarray(got[1].length), np.asarray(want[1].length))
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(want[2]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got[3]), np.asarray(want[3]), rtol=1e-6, atol=1e-6)


def test_the_estimate_covers_the_offloaded_prefill():
    """Prefilled a layer at a time, the prompt's hidden states and features stay on the device: at a width where
    they dominate, the compiled prefill's device memory (the host cache aside) fits the estimate's."""
    cfg = ModelConfig(arch="llama", vocab_size=16, hidden_size=512, intermediate_size=512, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=16384)
    dcfg = DraftConfig.for_target(cfg, 16)
    spec, rows, context, chunk = dataclasses.replace(SPEC, offload=True), 2, 8192, 128
    run, max_len = _plan(cfg, spec, "exact", dcfg, NEW_TOKENS, context, chunk, "xla")
    cache = offload.empty_cache(cfg, rows, max_len, jnp.float32)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    dparams = jax.eval_shape(lambda: eagle3.init_params(dcfg, jax.random.key(1)))
    ids = jax.ShapeDtypeStruct((rows, context), jnp.int32)
    compiled = speculative.eagle_prefill_fn(run.prefill_key).lower(
        params, dparams, ids, jax.ShapeDtypeStruct((rows,), jnp.int32), cache,
        jax.eval_shape(lambda: eagle3.empty_cache(dcfg, rows, max_len, dparams))).compile()
    est = memory.estimate(cfg, context, NEW_TOKENS, rows, "exact", spec=spec, dtype="float32",
                          prefill_chunk=chunk, draft_cfg=dcfg)
    hidden_states = rows * context * cfg.hidden_size * 4
    assert est.parts["activations"] > 4 * hidden_states  # they dominate the transient
    assert compiled_peak(compiled) - (cache.k.nbytes + cache.v.nbytes) <= est.device, est.parts


def test_offloaded_prefill_fills_the_progress_bar(models, monkeypatch):
    """Each layer's pass over a chunk ticks: every `num_layers` of them advance the bar by a chunk, so it ends
    at the prompt's chunks."""
    target, head = models
    ticks = []
    monkeypatch.setattr(host, "tick", lambda _, chunks=1: ticks.append(int(chunks)))
    monkeypatch.setattr(host, "_EXECUTABLES", collections.OrderedDict())  # traced anew, with the tick above
    jax.clear_caches()
    rows = [[1] * 300]
    sj.generate(target, rows, 4, draft=head, mode="exact", spec=dataclasses.replace(SPEC, offload=True),
                eos_token_ids=(), prefill_chunk=CHUNK, progress=True)
    chunks = prompts.prepare(rows, target.cfg, 4, CHUNK).ids.shape[1] // CHUNK
    assert len(ticks) == chunks * target.cfg.num_layers and sum(ticks) == chunks  # whole chunks: no float drift


def test_offloaded_steps_run_the_pallas_kernel_with_the_same_tokens(monkeypatch):
    """Offloaded, prefill and full steps attend to device copies of the cache, so `attention="pallas"` runs the
    kernel there too (interpret mode on the CPU; head dim 64, its contract) and gives the device run's tokens."""
    import pallas_kernels

    target = make_target(64, layers=2, head_dim=64, sharpen=8.0, seed=5)
    head = make_head(target, draft_vocab=40)
    kernel, caches = pallas_kernels.tree_attention, []
    monkeypatch.setattr(pallas_kernels, "tree_attention", lambda q, k, *a, **kw: caches.append(k.ndim) or kernel(
        q, k, *a, **kw))
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(1, 64, 300)), list(rng.integers(1, 64, 230))]
    tokens = {}
    for offloaded in (False, True):
        caches.clear()
        monkeypatch.setattr(host, "_EXECUTABLES", collections.OrderedDict())  # traced anew, through the spy
        jax.clear_caches()
        tokens[offloaded] = sj.generate(target, rows, 24, draft=head, mode="exact", prefill_chunk=CHUNK,
                                        spec=dataclasses.replace(SPEC, offload=offloaded), eos_token_ids=(),
                                        attention="pallas", progress=False).tokens
        # Offloaded: one layer's copy ([B, Hkv, S, D]) in full steps, a one-layer stack in prefill.
        assert caches and (4 in caches) == offloaded, caches
    np.testing.assert_array_equal(tokens[True], tokens[False])


@pytest.mark.parametrize("mode", ["exact", "specpv"])
def test_offloaded_generation_equals_the_device_cache(models, mode):
    target, head = models
    rng = np.random.default_rng(3)
    rows = [rng.integers(0, 16, n) for n in (300, 230)]  # ragged, above the partial threshold
    offloaded = dataclasses.replace(SPEC, offload=True)
    streamed = [[], []]

    def stream(new_per_row):  # with offload the callback is unordered (an ordered one did not compile)
        for acc, new in zip(streamed, new_per_row):
            acc.extend(new.tolist())

    out = sj.generate(target, rows, NEW_TOKENS, draft=head, mode=mode, spec=offloaded, eos_token_ids=(),
                      prefill_chunk=CHUNK, stream=stream)
    assert streamed == [out.tokens[b, : out.lengths[b]].tolist() for b in range(2)]
    ref, _, ref_cache, _ = decode(target, head, rows, mode, SPEC)
    np.testing.assert_array_equal(out.tokens, np.asarray(ref.tokens)[:, : out.tokens.shape[1]])
    np.testing.assert_array_equal(out.lengths, np.asarray(ref.num_out))
    # Partial steps, and full steps after them (re-feeding the missing tokens).
    assert out.stats["partial_verifications"] > 0 and out.stats["full_verifications"] >= 2

    _, counters, cache, _, summary = decode(target, head, rows, mode, offloaded)
    assert int(counters.partial) == out.stats["partial_verifications"]
    for x in (cache.k, cache.v, summary.kmax, summary.kmin):
        assert x.sharding.memory_kind == offload.HOST
    lengths = np.asarray(cache.length)
    np.testing.assert_array_equal(lengths, np.asarray(ref_cache.length))
    for b, n in enumerate(lengths):
        for name in ("k", "v"):
            np.testing.assert_allclose(np.asarray(getattr(cache, name))[:, b, :, :n],
                                       np.asarray(getattr(ref_cache, name))[:, b, :, :n], rtol=1e-5, atol=1e-5)
    # The summaries kept up to date step by step equal those of the final cache.
    fresh = jax.jit(BlockSummary.of, static_argnums=1)(
        KVCache(k=on_device(cache.k), v=on_device(cache.v), length=cache.length), SPEC.block_size)
    np.testing.assert_array_equal(np.asarray(summary.kmax), np.asarray(fresh.kmax))
    np.testing.assert_array_equal(np.asarray(summary.kmin), np.asarray(fresh.kmin))


HOST_OPS = {"dynamic_slice", "dynamic_update_slice", "device_put"}  # XLA host offloading's primitives
CONTROL_FLOW = {"jit", "pjit", "closed_call", "scan", "while", "cond"}


def host_primitives(jaxpr, found=None) -> set[str]:
    """Names of the primitives that take or make a host-memory value anywhere in `jaxpr` (sub-jaxprs too)."""
    found = set() if found is None else found

    def on_host(var):
        return getattr(getattr(var, "aval", None), "memory_space", None) == jax.memory.Space.Host

    for eqn in jaxpr.eqns:
        if any(map(on_host, eqn.invars)) or any(map(on_host, eqn.outvars)):
            found.add(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
                    host_primitives(getattr(sub, "jaxpr", sub), found)
    return found


@pytest.fixture(scope="module")
def traced(models):
    """The offloaded prefill and exact-mode decode programs (jaxprs), and for each the shapes it moved from
    host memory to the device while it was traced; how many full-step variants decode traced; the cache."""
    target, head = models
    batch = prompts.prepare([[1] * 300, [2] * 230], target.cfg, NEW_TOKENS, CHUNK)
    eos = _eos_ids(target.cfg, ())
    spec = dataclasses.replace(SPEC, offload=True)
    run, max_len = _plan(target.cfg, spec, "exact", head.cfg, NEW_TOKENS, batch.ids.shape[1], CHUNK, "xla")
    cache = offload.empty_cache(target.cfg, 2, max_len, jnp.float32)
    draft_cache = eagle3.empty_cache(head.cfg, 2, max_len, head.params)
    n_feats = len(head.cfg.feature_layers)
    moved, full_steps = {"prefill": [], "decode": []}, []
    jax.clear_caches()  # a program traced before (same shapes) would be reused without tracing
    with pytest.MonkeyPatch.context() as patch:
        to_device, keeper = offload.to_device, offload.keeper
        patch.setattr(offload, "keeper", lambda *a: full_steps.append(a) or keeper(*a))
        patch.setattr(offload, "to_device", lambda x: moved["prefill"].append(x.shape) or to_device(x))
        prefill = jax.make_jaxpr(speculative.eagle_prefill_fn(run.prefill_key))(
            target.params, head.params, jnp.asarray(batch.ids), jnp.asarray(batch.lengths), cache, draft_cache)
        patch.setattr(offload, "to_device", lambda x: moved["decode"].append(x.shape) or to_device(x))
        decode = jax.make_jaxpr(specpv.specpv_decode_fn(run))(
            target.params, head.params, head.d2t, cache, draft_cache, jnp.zeros((2, target.cfg.vocab_size)),
            jnp.zeros((n_feats, 2, target.cfg.hidden_size)), jax.random.key(0), Sampler.create(),
            jnp.asarray(eos), jnp.asarray(NEW_TOKENS, jnp.int32), offload.empty_summary(cache, spec.block_size))
    return {"prefill": prefill.jaxpr, "decode": decode.jaxpr}, moved, len(full_steps), cache


def test_offloaded_code_only_slices_updates_and_moves_host_arrays(traced):
    """Nothing is computed on host arrays in jit: they are sliced, updated in place or moved (traced only)."""
    used = {name: host_primitives(jaxpr) for name, jaxpr in traced[0].items()}
    assert all(found <= HOST_OPS | CONTROL_FLOW for found in used.values()), used
    assert used["decode"] >= HOST_OPS and "dynamic_update_slice" in used["prefill"], used


def test_host_cache_traffic(traced):
    """Prefill only writes the host cache (a layer at a time: a chunk at a time read it whole per chunk).
    Decode moves it to the device only a whole layer at a time: a full step moves each layer's K and V once
    (before its layer loop and inside it: two moves each as traced), the loop's start its keys once more to
    build the summaries. (A refresh that went back to the host cache moved everything twice.)"""
    _, moved, full_steps, cache = traced
    assert moved["prefill"] == []
    layer = (1,) + cache.k.shape[1:]
    cache_moves = [shape for shape in moved["decode"] if shape[1:3] == layer[1:3] and shape[-1] == layer[-1]
                   and shape[3] != cache.k.shape[3] // SPEC.block_size]  # not the block summaries
    assert full_steps >= 2  # with and without re-fed tokens (and exact mode's rollback variants)
    assert cache_moves == [layer] * len(cache_moves) and len(cache_moves) == 2 + 4 * full_steps, cache_moves


def test_offload_refuses_other_modes_and_counts_device_memory_only(models):
    target, head = models
    offloaded = dataclasses.replace(SPEC, offload=True)
    with pytest.raises(ValueError, match="offload=True.*not 'eagle'"):
        sj.generate(target, [1, 2, 3], 4, draft=head, mode="eagle", spec=offloaded)
    with pytest.raises(ValueError, match="not 'ar'"):
        sj.generate(target, [1, 2, 3], 4, spec=offloaded)
    with pytest.raises(NotImplementedError, match="make_generate_fn"):
        sj.make_generate_fn(target.cfg, offloaded, mode="exact", draft_cfg=head.cfg)
    est = memory.estimate(target.cfg, 4096, 64, mode="exact", spec=offloaded, dtype="float32")
    assert est.device == est.total - est.parts["full cache"] - est.parts["block summaries"]
    assert est.parts["offload staging"] * target.cfg.num_layers == 2 * est.parts["full cache"]
    memory.check_fits(est, est.device, offload=True)
    with pytest.raises(MemoryError):
        memory.check_fits(est, est.device)


def test_an_offloaded_run_the_host_cannot_hold_is_refused_before_allocating(models, monkeypatch):
    """Pinned host memory is bounded (the host's RAM; on a GPU XLA's pool, 64 GiB by default): a run whose
    full cache and summaries exceed it is refused naming them and the limit, before the cache is allocated."""
    target, head = models
    pool = memory.HostLimit(1 << 10, "XLA's pinned host memory pool (XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=64)",
                            "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB")
    monkeypatch.setattr(memory, "host_bytes_limit", lambda: pool)

    def allocate(*args):
        raise AssertionError("allocated")

    monkeypatch.setattr(offload, "empty_cache", allocate)
    with pytest.raises(MemoryError, match=r"mode 'exact' with offload keeps about .* GiB in host memory \(full "
                                          r"cache .* GiB, block summaries .* GiB\), more than XLA's pinned host "
                                          r"memory pool .*: 0.00 GiB; .* raise XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"):
        sj.generate(target, np.arange(1, 400) % 16, 8, draft=head, mode="exact",
                    spec=dataclasses.replace(SPEC, offload=True))


def test_a_context_below_the_partial_threshold_keeps_its_cache_on_the_device(models):
    """Every step there would be a full verification reading host memory; the eagle loop with the cache on
    the device gives the same tokens and needs less device memory than offload's partial cache and staging."""
    target, head = models
    offloaded = dataclasses.replace(SPEC, offload=True)
    prompt = np.arange(1, 40) % 16
    assert memory.loop_mode(offloaded, "exact", prompt.size, 8) == "eagle"
    out = sj.generate(target, prompt, 8, draft=head, mode="exact", spec=offloaded, eos_token_ids=())
    np.testing.assert_array_equal(out.tokens, sj.generate(target, prompt, 8, eos_token_ids=()).tokens)
    assert out.stats["partial_verifications"] == 0
    est = memory.estimate(target.cfg, prompt.size, 8, mode="exact", spec=offloaded, dtype="float32")
    assert est.host == 0 and "offload staging" not in est.parts

