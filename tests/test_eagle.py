"""EAGLE-3 tree speculation: lossless greedy and sampling, checkpoints, the head's semantics."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specpv_jax as sj
from sampling_stats import chi_square_pvalue, three_token_cells, three_token_law
from specpv_jax.config import DraftConfig, ModelConfig, SpecConfig
from specpv_jax.draft import eagle3
from specpv_jax.model import init_params
from specpv_jax.sampling import Sampler
from specpv_jax.tree import candidate_layout, select_tree


def make_target(vocab: int, seed: int = 0, layers: int = 8, sharpen: float = 4.0, heads: int = 4,
                head_dim: int = 16) -> sj.Model:
    cfg = ModelConfig(arch="llama", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=layers,
                      num_heads=heads, num_kv_heads=heads // 2, head_dim=head_dim, max_position_embeddings=8192)
    params = init_params(cfg, jax.random.key(seed))
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * sharpen  # clear argmax margins
    return sj.Model(cfg, params)


def make_head(target: sj.Model, draft_vocab: int | None = None, seed: int = 1) -> eagle3.Eagle3:
    cfg = target.cfg
    dcfg = DraftConfig(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
                       vocab_size=cfg.vocab_size, draft_vocab_size=draft_vocab or cfg.vocab_size,
                       target_hidden_size=cfg.hidden_size,
                       feature_layers=DraftConfig.default_feature_layers(cfg.num_layers))
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(cfg.vocab_size, dcfg.draft_vocab_size, replace=False))
    return eagle3.Eagle3(dcfg, eagle3.init_params(dcfg, jax.random.key(seed)),
                         jnp.asarray(eagle3.d2t_from_token_ids(ids)))


@pytest.fixture(scope="module")
def small_vocab():
    """A 16-token target, where even a random head's guesses are often accepted."""
    target = make_target(16)
    return target, make_head(target, draft_vocab=12)


SHAPES = [SpecConfig(tree_depth=1, tree_top_k=1, tree_nodes=1),
          SpecConfig(tree_depth=4, tree_top_k=3, tree_nodes=12),
          SpecConfig(tree_depth=6, tree_top_k=4, tree_nodes=30),
          SpecConfig(tree_depth=4, tree_top_k=3, tree_nodes=14, tree_beam=True),
          SpecConfig(tree_depth=4, tree_top_k=3, tree_nodes=30, tree_beam=True, tree_threshold=0.3)]


@pytest.mark.parametrize("spec, length", list(zip(SHAPES, (1, 37, 2000, 300, 50))),
                         ids=["chain1-len1", "d4k3n12-len37", "d6k4n30-len2000", "beam-d4k3n14-len300",
                              "beam-threshold-len50"])
def test_greedy_eagle_equals_ar(small_vocab, spec, length):
    target, head = small_vocab
    prompt = np.random.default_rng(length).integers(0, 16, length)
    ar = sj.generate(target, prompt, 48, eos_token_ids=())
    eg = sj.generate(target, prompt, 48, draft=head, mode="eagle", spec=spec, eos_token_ids=())
    np.testing.assert_array_equal(eg.tokens, ar.tokens)
    assert eg.stats["steps"] < 47 or spec.tree_top_k == 1  # wider trees get some random guesses accepted
    assert eg.stats["full_verifications"] == eg.stats["steps"]


def test_greedy_eagle_batch_equals_ar(small_vocab):
    target, head = small_vocab
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 16, n) for n in (5, 130, 61)]
    free = sj.generate(target, prompts, 40, eos_token_ids=())
    eos = int(free.tokens[1, 12])  # ends row 1 early
    ar = sj.generate(target, prompts, 40, eos_token_ids=(eos,))
    eg = sj.generate(target, prompts, 40, draft=head, mode="eagle", spec=SHAPES[1], eos_token_ids=(eos,))
    assert ar.lengths[1] <= 13
    np.testing.assert_array_equal(eg.lengths, ar.lengths)
    np.testing.assert_array_equal(eg.tokens, ar.tokens)


def oracle_tree(sequences: jax.Array):
    """A stand-in for `eagle3.draft_tree` whose best chain is the true greedy continuation."""
    def draft_tree(params, cfg, spec, embed, d2t, cache, last_hidden, root):
        k, depth = spec.tree_top_k, spec.tree_depth
        b = root.shape[0]
        vocab = cfg.vocab_size
        _, starts = candidate_layout(k, depth)
        tokens, scores, parents = [], [], []
        for level in range(depth):
            true = jnp.take_along_axis(sequences, (cache.length + 1 + level)[:, None], axis=1)[:, 0]
            wrong = (true[:, None] + 1 + jnp.arange(k)[None]) % vocab
            row = jnp.concatenate([true[:, None], wrong[:, 1:]], axis=1)  # [B, k]
            row_scores = -jnp.arange(k, dtype=jnp.float32)[None].repeat(b, 0)
            if level == 0:
                tokens.append(row), scores.append(row_scores), parents.append(jnp.full((b, k), -1))
            else:  # children of frontier node 0 (the true chain) get the best scores
                tok = jnp.concatenate([row, jnp.zeros((b, k * k - k), jnp.int32)], 1)
                sc = jnp.concatenate([row_scores, jnp.full((b, k * k - k), -100.0)], 1)
                tokens.append(tok), scores.append(sc)
                parents.append(jnp.broadcast_to(jnp.repeat(starts[level - 1] + jnp.arange(k), k), (b, k * k)))
        tree = select_tree(root, jnp.concatenate(tokens, 1), jnp.concatenate(scores, 1),
                           jnp.concatenate(parents, 1), spec.tree_nodes, k, depth)
        return tree
    return draft_tree


def test_long_accepted_paths_commit_correctly(small_vocab, monkeypatch):
    """With a draft that knows the answer, whole chains are accepted; the output is still exactly AR."""
    target, head = small_vocab
    prompt = np.random.default_rng(2).integers(0, 16, 50)
    ar = sj.generate(target, prompt, 60, eos_token_ids=())
    sequences = np.zeros((1, 512), np.int32)
    sequences[0, :110] = np.concatenate([prompt, ar.tokens[0]])
    monkeypatch.setattr(eagle3, "draft_tree", oracle_tree(jnp.asarray(sequences)))
    spec = SpecConfig(tree_depth=5, tree_top_k=3, tree_nodes=11)  # a shape no other test compiles
    eg = sj.generate(target, prompt, 60, draft=head, mode="eagle", spec=spec, eos_token_ids=())
    np.testing.assert_array_equal(eg.tokens, ar.tokens)
    assert eg.stats["mean_accept_len"] > 5.5  # depth 5 + the bonus token, but for the last step


@pytest.mark.parametrize("temperature, top_p, top_k", [pytest.param(1.0, 1.0, 0, marks=pytest.mark.slow),
                                                       (0.7, 0.9, 5)])
def test_sampling_is_lossless(temperature, top_p, top_k):
    """The joint law of the first three new tokens under `eagle` equals the target's, exactly (top-k and top-p
    filtered: the target's filtered law)."""
    vocab = 8
    target = make_target(vocab, seed=3, layers=3, sharpen=1.0)  # 3 layers: the head reads three distinct ones
    head = make_head(target, draft_vocab=6, seed=4)
    prompt = [1, 5, 2, 7, 3]
    rows = 4096
    spec = SpecConfig(tree_depth=2, tree_top_k=5, tree_nodes=10)
    out = sj.generate(target, [prompt] * rows, 3, draft=head, mode="eagle", spec=spec, temperature=temperature,
                      top_p=top_p, top_k=top_k, seed=11, eos_token_ids=())
    assert out.stats["mean_accept_len"] > 1.3  # drafted tokens are being accepted, so rejection is exercised
    cells = three_token_cells(out.tokens, vocab)
    law = three_token_law(target, prompt, Sampler.create(temperature, top_p, top_k))
    assert chi_square_pvalue(cells, law) > 1e-3
    # The same test has power: the law at another temperature is rejected, and so is the unfiltered one.
    assert chi_square_pvalue(cells, three_token_law(target, prompt, Sampler.create(temperature * 1.5, top_p, top_k))) \
        < 1e-3
    if top_k:
        assert chi_square_pvalue(cells, three_token_law(target, prompt, Sampler.create(temperature, top_p))) < 1e-3
        assert (law == 0).any()  # the filters leave tokens out


@pytest.mark.parametrize("mode", ["eagle", "specpv", "exact"])
def test_a_draft_whose_log_probabilities_are_nan_is_reported(mode):
    """A draft overflowing its dtype (here an infinite LM-head weight) proposes arbitrary tokens from NaN
    log-probabilities: verification keeps the target's tokens, the steps are counted, and generate warns
    naming the dtype and the remedy; a sound head counts none."""
    from test_specpv import small_spec

    target = make_target(16, seed=5)
    head = make_head(target, seed=6)
    broken = eagle3.Eagle3(head.cfg, {**head.params, "lm_head": {"kernel": head.params["lm_head"]["kernel"]
                                                                 .at[:, 0].set(jnp.inf)}}, head.d2t)
    spec, prompt = small_spec(), np.arange(200) % 16
    ar = sj.generate(target, prompt, 24, eos_token_ids=())
    sound = sj.generate(target, prompt, 24, draft=head, mode=mode, spec=spec, eos_token_ids=())
    with pytest.warns(sj.SpecPVWarning, match=r"the draft's log-probabilities were NaN in \d+ of \d+ steps "
                                              r"\(its weights in float32\).*dtype=\"float32\""):
        out = sj.generate(target, prompt, 24, draft=broken, mode=mode, spec=spec, eos_token_ids=())
    assert sound.stats["draft_nan_steps"] == 0 and out.stats["draft_nan_steps"] > 0
    if mode != "specpv":  # lossless
        np.testing.assert_array_equal(out.tokens, ar.tokens)
    assert out.stats["draft_nan_steps"] == out.stats["steps"]  # every step drafts from NaN (exact: partial too)


def test_settings_without_effect_are_said():
    """A draft given to mode="ar" and a bounded draft cache outside the partial modes change nothing: both warn."""
    target = make_target(16, seed=5)
    head = make_head(target, seed=6)
    with pytest.warns(sj.SpecPVWarning, match=r"mode='ar' decodes with the target alone: the draft has no effect "
                                              r"\(the modes that use it: eagle, specpv, exact\)"):
        out = sj.generate(target, [5, 6, 7], 4, draft=head, eos_token_ids=())
    np.testing.assert_array_equal(out.tokens, sj.generate(target, [5, 6, 7], 4, eos_token_ids=()).tokens)
    with pytest.warns(sj.SpecPVWarning, match=r"bounded_draft=True\) has no effect in mode 'eagle'"):
        sj.make_generate_fn(target.cfg, sj.SpecConfig(bounded_draft=True), mode="eagle", draft_cfg=head.cfg)
