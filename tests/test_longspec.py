"""LongSpec: constant-memory draft, anchor-offset training, lossless `mode="longspec"`."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampling_stats import chi_square_pvalue, three_token_cells, three_token_law
from test_eagle import make_head, make_target

import specpv_jax as sj
from convert.hf import ConversionError
from convert.longspec import export_longspec
from specpv_jax import model as M
from specpv_jax.cache import KVCache
from specpv_jax.config import ConfigError, LongSpecConfig, SpecConfig
from specpv_jax.draft import longspec as L
from specpv_jax.longspec import LONGSPEC_TREE, longspec_prefill_fn
from specpv_jax.sampling import Sampler
from specpv_jax.train import longspec as T
from specpv_jax.train.trainer import TrainConfig

TREE = SpecConfig(tree_depth=4, tree_top_k=3, tree_nodes=10)


@pytest.fixture(scope="module")
def pair():
    target = make_target(16)
    cfg = LongSpecConfig.for_target(target.cfg, window=16)
    return target, L.LongSpecDraft(cfg, L.init_params(cfg, jax.random.key(3)))


def test_anchor_offset_positions_follow_the_recipe():
    rng = np.random.default_rng(0)
    sinks, offsets = set(), []
    for _ in range(400):
        pos = T.anchor_offset_positions(rng, 1000, 32768)
        jumps = np.flatnonzero(np.diff(pos) != 1)
        sink = 0 if pos[0] != 0 else (int(jumps[0]) + 1 if jumps.size else 0)
        offset = int(pos[-1]) - 999
        assert jumps.size <= 1 and pos.dtype == np.int32
        np.testing.assert_array_equal(pos[:sink], np.arange(sink))
        np.testing.assert_array_equal(pos[sink:], np.arange(sink, 1000) + offset)
        assert 0 <= offset <= min(30000, 32768 - 1000) - 1000
        sinks.add(sink if offset else None)
        offsets.append(offset)
    assert {0, 1, 2, 3, 4} <= sinks and max(offsets) > 25000  # the whole range is drawn
    # Sequences too long for the model's range get no offset.
    assert T.anchor_offset_positions(rng, 1200, 2048)[-1] == 1199


def test_batches_carry_positions_and_lags():
    docs = [np.arange(5000) % 97]
    ids, pos, lag = next(T.batches(docs, 3, 64, 32768, seed=0))
    assert ids.shape == pos.shape == (3, 64) and lag.shape == (3,)
    assert ((1 <= lag) & (lag <= T.MAX_LAG)).all()
    _, plain, _ = next(T.batches(docs, 3, 64, 32768, seed=0, anchor_offset=False))
    np.testing.assert_array_equal(plain, np.broadcast_to(np.arange(64), (3, 64)))


def test_drafting_computes_what_training_does(pair):
    """The root's prediction at inference (ring + target cache read in place) equals the training forward
    at lag 1 over the same tokens, with a context longer than the window."""
    target, draft = pair
    cfg, tcfg = draft.cfg, target.cfg
    n = 40
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 16, (2, n)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(n), (2, n))
    out = M.forward(target.params, tcfg, ids, positions, None, collect_kv=True)
    hidden = L.train_forward(draft.params, cfg, target.params["embed_tokens"]["embedding"], ids, positions,
                             out.new_kv[0][-1], out.new_kv[1][-1], jnp.ones((2,), jnp.int32))
    expected = L.logprobs(draft.params, cfg, target.params, tcfg, hidden[:, -1])

    cache = KVCache.for_model(tcfg, 2, 256)
    cache = M.forward(target.params, tcfg, ids[:, :-1], positions[:, :-1], cache).cache.replace(
        length=jnp.full((2,), n - 1, jnp.int32))
    ring = L.start(draft.params, cfg, target.params["embed_tokens"]["embedding"], ids[:, :-1],
                   jnp.full((2,), n - 1, jnp.int32))
    got, _, _ = L.root_step(draft.params, cfg, target.params, tcfg, ring, cache, ids[:, -1])
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_ring_holds_the_last_window_tokens_at_their_positions(pair):
    target, draft = pair
    cfg, embed = draft.cfg, target.params["embed_tokens"]["embedding"]
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(0, 16, (2, 30)), jnp.int32)
    lengths = jnp.asarray([30, 9], jnp.int32)
    ring = L.start(draft.params, cfg, embed, ids, lengths)
    more = jnp.asarray(rng.integers(0, 16, (2, 5)), jnp.int32)
    ring = L.commit(draft.params, cfg, embed, ring, more, jnp.asarray([5, 2], jnp.int32))
    np.testing.assert_array_equal(ring.length, [35, 11])
    for r, (n, extra) in enumerate([(30, 5), (9, 2)]):
        seq = np.concatenate([np.asarray(ids[r, :n]), np.asarray(more[r, :extra])])
        total = seq.size
        keep = np.arange(max(total - cfg.window, 0), total)
        k, v = L.self_kv(draft.params, cfg, embed, jnp.asarray(seq[keep])[None], jnp.asarray(keep)[None])
        np.testing.assert_allclose(ring.k[0, r][:, keep % cfg.window], k[0], atol=1e-6)
        np.testing.assert_allclose(ring.v[0, r][:, keep % cfg.window], v[0], atol=1e-6)


def test_ring_slots_write_each_slot_once():
    """A step committing more tokens than the ring holds (a 9-token path, window 4) writes only the last 4: two
    writes to one index land in an unspecified order on GPU."""
    w, t = 4, 9
    lengths, counts = jnp.asarray([0, 3, 10, 5, 7], jnp.int32), jnp.asarray([9, 4, 2, 0, 6], jnp.int32)
    slots = np.asarray(L.ring_slots(lengths, counts, t, w))
    for row, n, length in zip(slots, np.asarray(counts), np.asarray(lengths)):
        written = row[row < w]
        assert sorted(written.tolist()) == sorted(set(written.tolist()))
        kept = np.arange(max(n - w, 0), n)
        np.testing.assert_array_equal(row[kept], (length + kept) % w)


@pytest.mark.parametrize("spec, length", [pytest.param(TREE, 5, marks=pytest.mark.slow), (TREE, 300),
                                          (LONGSPEC_TREE, 120)],
                         ids=["short", "ring-wraps", "paper-tree"])
def test_greedy_longspec_equals_ar(pair, spec, length):
    target, draft = pair
    prompt = np.random.default_rng(length).integers(0, 16, length)
    ar = sj.generate(target, prompt, 40, eos_token_ids=())
    ls = sj.generate(target, prompt, 40, draft=draft, mode="longspec", spec=spec, eos_token_ids=())
    np.testing.assert_array_equal(ls.tokens, ar.tokens)
    assert ls.stats["steps"] < 40 and ls.stats["mean_accept_len"] >= 1.0


def test_greedy_longspec_batch_equals_ar(pair):
    target, draft = pair
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 16, n).tolist() for n in (50, 13, 31)]
    spec = SpecConfig(tree_depth=3, tree_top_k=2, tree_nodes=5, tree_threshold=0.05)
    ar = sj.generate(target, prompts, 30, eos_token_ids=(3,))
    ls = sj.generate(target, prompts, 30, draft=draft, mode="longspec", spec=spec, eos_token_ids=(3,))
    np.testing.assert_array_equal(ls.lengths, ar.lengths)
    np.testing.assert_array_equal(ls.tokens, ar.tokens)


def test_sampling_is_lossless():
    """The joint law of the first three new tokens (temperature 0.7, top_p 0.8) under `longspec` equals the target's,
    with LongSpec's beam tree (whose nodes have up to top_k**2 children to reject in turn)."""
    vocab = 8
    target = make_target(vocab, seed=3, layers=2, sharpen=1.0)
    cfg = LongSpecConfig.for_target(target.cfg, window=4)
    draft = L.LongSpecDraft(cfg, L.init_params(cfg, jax.random.key(4)))
    prompt = [1, 5, 2, 7, 3]
    spec = SpecConfig(tree_depth=3, tree_top_k=2, tree_nodes=10, tree_beam=True)
    out = sj.generate(target, [prompt] * 4096, 3, draft=draft, mode="longspec", spec=spec, temperature=0.7,
                      top_p=0.8, seed=11, eos_token_ids=())
    assert out.stats["mean_accept_len"] > 1.2  # drafted tokens are accepted, so rejection is exercised
    law = three_token_law(target, prompt, Sampler.create(0.7, 0.8))
    assert chi_square_pvalue(three_token_cells(out.tokens, vocab), law) > 1e-3


def test_draft_memory_does_not_grow_with_context(pair):
    """The draft's whole state after prefill has the same shapes at 64 and 4096 prompt tokens."""
    from specpv_jax.generate import _plan

    target, draft = pair
    shapes = []
    for n in (64, 4096):
        run, max_len = _plan(target.cfg, TREE, "longspec", draft.cfg, 8, n, 64, "xla")
        fn = longspec_prefill_fn(run.prefill_key)
        ids = jax.ShapeDtypeStruct((2, n), jnp.int32)
        lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
        cache = jax.eval_shape(lambda: KVCache.for_model(target.cfg, 2, max_len))
        _, ring, _ = jax.eval_shape(fn, target.params, draft.params, ids, lengths, cache)
        shapes.append(jax.tree.map(lambda x: x.shape, ring))
    assert shapes[0] == shapes[1]
    assert shapes[0].k == (1, 2, draft.cfg.num_kv_heads, draft.cfg.window, draft.cfg.head_dim)


def test_make_generate_fn_runs_longspec_under_jit(pair):
    target, draft = pair
    ids = np.random.default_rng(3).integers(0, 16, (2, 40)).astype(np.int32)
    fn = jax.jit(sj.make_generate_fn(target.cfg, TREE, mode="longspec", draft_cfg=draft.cfg, max_new_tokens=12,
                                     eos_token_ids=()))
    tokens, _ = fn(target.params, {"params": draft.params}, ids, jax.random.key(0))  # no d2t: not an EAGLE-3 head
    ar = sj.generate(target, ids, 12, eos_token_ids=())
    np.testing.assert_array_equal(np.asarray(tokens), ar.tokens)


def test_export_and_orbax_round_trips(tmp_path, pair):
    target, draft = pair
    export_longspec(tmp_path / "hf", draft.cfg, draft.params)
    loaded = sj.load_draft(tmp_path / "hf", target)
    assert loaded.kind == "longspec" and loaded.cfg == draft.cfg
    jax.tree.map(np.testing.assert_array_equal, loaded.params, draft.params)
    sj.save_draft(loaded, tmp_path / "orbax")
    again = sj.load_draft(tmp_path / "orbax", target)
    assert again.cfg == draft.cfg
    jax.tree.map(np.testing.assert_array_equal, again.params, draft.params)


def test_loading_names_what_does_not_fit(tmp_path, pair):
    target, draft = pair
    export_longspec(tmp_path / "d", draft.cfg, draft.params)
    with pytest.raises(ConversionError, match="vocab_size 16 != the target's 32"):
        sj.load_draft(tmp_path / "d", make_target(32))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / "d" / "model.safetensors")
    del tensors["cross_attn.q_proj.weight"]
    save_file(tensors, tmp_path / "d" / "model.safetensors")
    with pytest.raises(ConversionError, match="missing tensors: cross_attn.q_proj.weight"):
        sj.load_draft(tmp_path / "d", target)


def test_modes_and_config_errors(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="mode 'longspec' needs a LongSpec draft, got Eagle3"):
        sj.generate(target, [1, 2, 3], 4, draft=make_head(target), mode="longspec")
    with pytest.raises(ValueError, match="mode 'eagle' needs an EAGLE-3 head, got LongSpecDraft .modes for it: "
                                         "longspec"):
        sj.generate(target, [1, 2, 3], 4, draft=draft, mode="eagle")
    with pytest.raises(ConfigError, match="cross_heads .3. must be a multiple"):
        LongSpecConfig(hidden_size=64, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                       cross_heads=3, target_kv_heads=2, target_head_dim=16, vocab_size=16)
    with pytest.raises(ValueError, match="<= 1200 tokens"):
        T.train_longspec(target.params, target.cfg, [np.arange(3000) % 16], TrainConfig(1, 1, 2048))
    wide = SpecConfig(tree_depth=2, tree_top_k=5, tree_nodes=6)  # 5 children per node, 25 in a beam tree
    assert sj.generate(target, [1, 2, 3], 4, draft=draft, mode="longspec", spec=wide).tokens.shape == (1, 4)
    with pytest.raises(ValueError, match=r"a beam tree's tree_top_k\*\*2=25 \(tree_top_k=5\) exceeds the draft's "
                                         "vocabulary of 16 tokens"):
        sj.generate(target, [1, 2, 3], 4, draft=draft, mode="longspec", spec=dataclasses.replace(wide, tree_beam=True))


def test_training_steps_lower_the_loss(pair):
    """A few steps on a repetitive corpus: the loss falls (the gradient reaches every part of the layer)."""
    target, _ = pair
    docs = [np.tile(np.arange(16), 200)]
    draft, history = T.train_longspec(target.params, target.cfg, docs, TrainConfig(12, 2, 48, lr=3e-3, warmup=2),
                                      window=8, progress=False)
    assert history[-1]["loss"] < history[0]["loss"]
    assert draft.cfg.window == 8


def test_training_resumes_only_its_own_run(pair, tmp_path):
    """A work directory holds one run: the same call resumes it; other data or another window is refused."""
    target, _ = pair
    docs = [np.tile(np.arange(16), 40)]
    tc = TrainConfig(2, 1, 32, save_every=2)
    T.train_longspec(target.params, target.cfg, docs, tc, window=8, work=tmp_path, progress=False)
    _, history = T.train_longspec(target.params, target.cfg, docs, dataclasses.replace(tc, steps=3), window=8,
                                  work=tmp_path, progress=False)
    assert len(history) == 1  # steps 0 and 1 restored
    for other in ({"token_docs": [np.full(640, 5)]}, {"window": 16}):
        with pytest.raises(ValueError, match="another training run"):
            T.train_longspec(target.params, target.cfg, **{"token_docs": docs, "window": 8, **other},
                             tc=dataclasses.replace(tc, steps=4), work=tmp_path, progress=False)


# --------------------------------------------------------------------------- released checkpoints


def _rope(x, positions, theta):
    """numpy RoPE, HF rotate_half layout: x [T, H, D] at positions [T]."""
    d = x.shape[-1]
    angles = positions[:, None] * theta ** (-np.arange(0, d, 2) / d)[None, :]
    cos, sin = (np.concatenate([f(angles)] * 2, axis=-1)[:, None, :] for f in (np.cos, np.sin))
    return x * cos + np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1) * sin


def _glide_reference(sd, target, tokens, positions, target_k, target_v, lag, window=512):
    """The released LongSpec layer (their GlideDecoderLayer) on one sequence, in float64 numpy.

    target_k, target_v: `[Hkv, T, D]`; query i cross-attends to target keys j <= i - lag.
    Returns log-probabilities `[T, V]` through the target's LM head, with no final norm.
    """
    cfg = target.cfg
    w = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    embed = np.asarray(target.params["embed_tokens"]["embedding"], np.float64)
    lm_head = np.asarray(target.params["lm_head"]["kernel"], np.float64)
    heads, kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    t = len(tokens)

    def rms(x, name):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_norm_eps) * w[name + ".weight"]

    def lin(x, name):
        return x @ w[name + ".weight"].T + w.get(name + ".bias", 0.0)

    def attention(q, k, v, mask):  # q [T, Hq, D], k, v [Hkv, S, D], mask [T, S]
        k, v = (np.repeat(a, heads // kv_heads, axis=0) for a in (k, v))
        s = np.einsum("thd,hsd->hts", q, k) / np.sqrt(d)
        s = np.where(mask[None], s, -1e30)  # rows with no key (before `lag`) come out uniform, then ignored
        p = np.exp(s - s.max(-1, keepdims=True))
        return np.einsum("hts,hsd->thd", p / p.sum(-1, keepdims=True), v).reshape(t, heads * d)

    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    x = embed[tokens]
    h = rms(x, "input_layernorm")
    q = _rope(lin(h, "self_attn.q_proj").reshape(t, heads, d), positions, cfg.rope.theta)
    k = _rope(lin(h, "self_attn.k_proj").reshape(t, kv_heads, d), positions, cfg.rope.theta).transpose(1, 0, 2)
    v = lin(h, "self_attn.v_proj").reshape(t, kv_heads, d).transpose(1, 0, 2)
    x = x + lin(attention(q, k, v, (j <= i) & (j >= i - window)), "self_attn.o_proj")
    h = rms(x, "post_self_attention_layernorm")
    qc = _rope(lin(h, "cross_attn.q_proj").reshape(t, heads, d), positions, cfg.rope.theta)
    x = x + lin(attention(qc, target_k, target_v, j <= i - lag), "cross_attn.o_proj")
    h = rms(x, "post_cross_attention_layernorm")
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
    x = x + lin(silu(lin(h, "mlp.gate_proj")) * lin(h, "mlp.up_proj"), "mlp.down_proj")
    logits = x @ lm_head
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)


def _released_checkpoint(path, target, seed=5):
    """A random draft saved as their `LlamaGlideDecoderLayer.save_pretrained` would: (dir, state dict)."""
    import json

    from safetensors.numpy import save_file

    cfg = target.cfg
    h, q, kv, i = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "cross_attn.q_proj": (q, h), "cross_attn.k_proj": (kv, h), "cross_attn.v_proj": (kv, h)}
    rng = np.random.default_rng(seed)
    sd = {}
    for name, shape in shapes.items():
        sd[f"{name}.weight"] = rng.normal(0, shape[1] ** -0.5, shape).astype(np.float32)
        sd[f"{name}.bias"] = rng.normal(0, 0.1, shape[:1]).astype(np.float32)
    for name, shape in {"self_attn.o_proj": (h, q), "cross_attn.o_proj": (h, q), "mlp.gate_proj": (i, h),
                        "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}.items():
        sd[f"{name}.weight"] = rng.normal(0, shape[1] ** -0.5, shape).astype(np.float32)
    for name in ("input_layernorm", "post_self_attention_layernorm", "post_cross_attention_layernorm"):
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, (h,)).astype(np.float32)
    path.mkdir()
    save_file(sd, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaGlideDecoderLayer"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": i, "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "num_hidden_layers": cfg.num_layers, "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope.theta}))
    return path, sd


def test_released_checkpoint_loads_and_computes_their_layer(tmp_path, pair):
    """A draft in the released layout (q/k/v biases, their norm names, no final norm) loads, computes what
    their layer computes (an independent float64 re-implementation), round-trips through our layouts,
    and drafts losslessly."""
    target, _ = pair
    path, sd = _released_checkpoint(tmp_path / "released", target)
    draft = sj.load_draft(path, target)
    assert draft.kind == "longspec" and draft.cfg.window == 512
    assert draft.cfg.attention_bias and not draft.cfg.final_norm and "norm" not in draft.params

    rng = np.random.default_rng(0)
    t, lag = 24, 2
    tokens, positions = rng.integers(0, 16, t), np.arange(t) + 100
    kv_shape = (target.cfg.num_kv_heads, t, target.cfg.head_dim)
    target_k, target_v = rng.normal(size=kv_shape), rng.normal(size=kv_shape)
    hidden = L.train_forward(draft.params, draft.cfg, target.params["embed_tokens"]["embedding"],
                             jnp.asarray(tokens[None], jnp.int32), jnp.asarray(positions[None], jnp.int32),
                             jnp.asarray(target_k[None], jnp.float32), jnp.asarray(target_v[None], jnp.float32),
                             jnp.array([lag], jnp.int32))
    ours = np.asarray(L.logprobs(draft.params, draft.cfg, target.params, target.cfg, hidden))[0]
    theirs = _glide_reference(sd, target, tokens, positions, target_k, target_v, lag)
    np.testing.assert_allclose(ours[lag:], theirs[lag:], atol=2e-4)  # rows before `lag` see no target key

    export_longspec(tmp_path / "ours", draft.cfg, draft.params)
    again = sj.load_draft(tmp_path / "ours", target)
    assert again.cfg == draft.cfg
    jax.tree.map(np.testing.assert_array_equal, again.params, draft.params)

    ids = rng.integers(0, 16, 40)
    out = sj.generate(target, ids, 10, draft=draft, mode="longspec", spec=TREE, eos_token_ids=())
    np.testing.assert_array_equal(out.tokens, sj.generate(target, ids, 10, eos_token_ids=()).tokens)


def test_released_checkpoint_errors_name_the_problem(tmp_path, pair):
    target, _ = pair
    path, sd = _released_checkpoint(tmp_path / "released", target)
    with pytest.raises(ConversionError, match="vocab_size 16 != the target's 32"):
        sj.load_draft(path, make_target(32))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "rope_theta": 2 * config["rope_theta"]}))
    with pytest.raises(ConversionError, match=r"rope RopeConfig\(theta=20000.0, .* != the target's RopeConfig\(theta="):
        sj.load_draft(path, target)
    (path / "config.json").write_text(json.dumps(config))
    from safetensors.numpy import save_file

    del sd["self_attn.k_proj.bias"]
    sd["glide.extra"] = np.zeros(2, np.float32)
    save_file(sd, path / "model.safetensors")
    with pytest.raises(ConversionError, match=r"missing tensors: self_attn.k_proj.bias(.|\n)*unexpected tensors"
                                              r".*glide.extra"):
        sj.load_draft(path, target)
