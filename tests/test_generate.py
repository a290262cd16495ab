"""AR generation: input validation, sampling, stats."""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specpv_jax as sj
from sampling_stats import chi_square_pvalue
from specpv_jax.prompts import PromptError, bucket_length
from specpv_jax.sampling import Sampler


@pytest.fixture(scope="module")
def target(hf_model):
    return sj.load_target(hf_model("llama-mha")[0], progress=False)


@pytest.mark.parametrize("ids, kwargs, message", [
    (np.arange(3, 2000) % 150 + 3, {"max_new_tokens": 100},
     "prompt 0 has 1997 tokens; with max_new_tokens=100 that is 2097 positions, over the model's "
     "max_position_embeddings=2048"),
    ([[5, 6], [7, 160]], {}, r"prompt 1 has token id 160 outside the vocabulary \[0, 160\)"),
    ([5, -1, 6], {}, "token id -1 outside the vocabulary"),
    ([], {}, "prompt 0 is empty"),
    (np.zeros((0, 4), np.int32), {}, "input_ids is empty"),
    ([[5, 6], []], {}, "prompt 1 is empty"),
    (np.array([5.0, 6.0]), {}, "input_ids must be integer token ids, got dtype float64"),
    ([5, [6, 7]], {}, r"input_ids must be token ids \[T\], rows of them, or \[B, T\]: setting an array"),  # numpy's
    ([5, 2 ** 70], {}, "input_ids holds ids too large for any vocabulary"),  # was: "got dtype object"
    ("def add(a, b):", {}, "input_ids is text: encode it into token ids first"),
    (["def", "add"], {}, "input_ids is text"),
    ([["def"], ["add", "(a)"]], {}, "input_ids is text"),
    (np.array([b"def", b"add"]), {}, "input_ids is text"),
    ({"input_ids": [[5, 6]], "attention_mask": [[1, 1]]}, {}, r"a tokenizer's output\?\): pass its \['input_ids'\]"),
    (np.zeros((1, 2, 3), np.int32), {}, r"input_ids must have shape \[T\] or \[B, T\], got \(1, 2, 3\)"),
    (np.array([[5, 6, 7]]), {"attention_mask": np.array([[1, 0, 1]])}, "not one contiguous run of ones"),
    (np.array([[5, 6, 7]]), {"attention_mask": np.array([[1, 1]])}, r"attention_mask shape \(1, 2\) does not match"),
    ([[5, 6, 7], [5, 6]], {"attention_mask": [[1, 1, 1], [1, 1]]}, r"padded rows of one length, got rows of \[3, 2\]"),
    ([5, 6], {"max_new_tokens": 0}, "max_new_tokens must be a positive integer, got 0"),
    ([5, 6], {"max_new_tokens": 2.5}, "max_new_tokens must be a positive integer"),
    ([5, 6], {"max_new_tokens": True}, "max_new_tokens must be a positive integer"),
    ([5, 6], {"prefill_chunk": 0}, "prefill_chunk must be a positive integer"),
    (np.array([[5, 6, 7]]), {"attention_mask": np.array([[1, 0.5, 1]])}, "attention_mask must hold only 0 and 1"),
    (np.array([[5, 6, 7]]), {"attention_mask": np.array([[np.nan, 1, 1]])}, "attention_mask must hold only 0 and 1"),
])
def test_bad_prompts_are_clear_errors(target, ids, kwargs, message):
    with pytest.raises(PromptError, match=message):
        sj.generate(target, ids, **kwargs)


def test_params_that_do_not_fit_the_config_are_named(target):
    """Before: a LoRA-style extra leaf was ignored in silence, a flax {"params": ...} wrapper gave KeyError
    'embed_tokens', a too-small embedding was read past its end (NaN, blamed on overflowing weights), and generate
    under the caller's jit failed converting a tracer."""
    params = target.params
    lora = {**params, "layers": {**params["layers"], "lora_a": np.zeros((target.cfg.num_layers, 4), np.float32)}}
    small = {**params, "embed_tokens": {"embedding": params["embed_tokens"]["embedding"][:100]}}
    for bad, message in [(lora, r"unexpected layers/lora_a \(2, 4\)"),
                         (small, r"embed_tokens/embedding has shape \(100, 64\), the configuration implies \(160, "),
                         ({"params": params}, r"the target's params are flax's variables"),
                         (jax.tree.map(lambda x: x.astype(jnp.int32), params),  # a deep jax error, was
                          r"the target's params must be floating-point arrays; not so: embed_tokens/embedding, "),
                         ({**params, "norm": {"scale": [1.0] * 64}},
                          r"must be floating-point arrays; not so: norm/scale/0, norm/scale/1, .* and 59 more")]:
        with pytest.raises(ValueError, match=message):
            sj.generate(sj.Model(target.cfg, bad), [5, 6], 4)
        with pytest.raises(ValueError, match=message):
            sj.forward_logits(sj.Model(target.cfg, bad), [5, 6])
    with pytest.raises(TypeError, match="not values traced by jit, vmap or grad: sj.make_generate_fn"):
        jax.jit(lambda ids: sj.generate(target, ids, 4).tokens)(np.array([[5, 6]]))
    with pytest.raises(TypeError, match="forward_logits runs its own compiled programs"):
        jax.grad(lambda p: sj.forward_logits(sj.Model(target.cfg, p), [5, 6]).sum())(params)


def test_draft_params_that_do_not_fit_the_draft_config_are_named():
    """A draft's weights are checked as the target's (they were not: an extra leaf was ignored in silence)."""
    from test_eagle import make_head, make_target

    from specpv_jax.config import LongSpecConfig
    from specpv_jax.draft import eagle3, longspec
    from specpv_jax.draft.eagle3 import Eagle3
    from specpv_jax.draft.small import SmallDraft

    target = make_target(16)
    head = make_head(target, seed=2)
    ls_cfg = LongSpecConfig.for_target(target.cfg, window=16)
    ls = longspec.LongSpecDraft(ls_cfg, longspec.init_params(ls_cfg, jax.random.key(3)))
    spec = sj.SpecConfig(tree_depth=2, tree_top_k=2, tree_nodes=3)
    extra, no_mlp = np.zeros(2, np.float32), {k: v for k, v in head.params["midlayer"].items() if k != "mlp"}
    narrow = dataclasses.replace(head.cfg, hidden_size=32, head_dim=8)
    cases = [
        ("eagle", dataclasses.replace(head, params={**head.params, "lora_a": extra}),
         r"the draft's params do not match its config: unexpected lora_a \(2,\)"),
        ("eagle", dataclasses.replace(head, d2t=head.d2t[:-1]),
         r"the draft's d2t has shape \(\d+,\), its config implies"),
        ("eagle", dataclasses.replace(head, params={"params": head.params}), "the draft's params are flax's variables"),
        # d2t's values (a NaN-draft warning blamed the head's dtype; a float table, a deep indexing error)
        ("eagle", dataclasses.replace(head, d2t=jnp.full_like(head.d2t, 15)),
         r"the draft's d2t maps draft ids outside the target vocabulary \[0, 16\)"),
        ("eagle", dataclasses.replace(head, d2t=head.d2t.astype(jnp.float32)), "d2t must hold integer offsets"),
        ("eagle", dataclasses.replace(head, d2t=jnp.zeros_like(head.d2t).at[1].set(-1)),
         "d2t maps two draft ids to one target id"),
        ("eagle", Eagle3(narrow, eagle3.init_params(narrow, jax.random.key(4)), head.d2t),  # a deep flax error, was
         "this EAGLE-3 head has hidden size 32, the target 64, and its params hold no embed_tokens of its own"),
        ("eagle", dataclasses.replace(head, params={**head.params, "midlayer": no_mlp}),
         "the draft's params do not match its config: missing midlayer/mlp/"),
        ("longspec", dataclasses.replace(ls, params={**ls.params, "extra": extra}), r"unexpected extra \(2,\)"),
        ("specextend", SmallDraft(target.cfg, {**target.params, "extra": extra}), r"unexpected extra \(2,\)")]
    for mode, draft, message in cases:
        with pytest.raises(ValueError, match=message):
            sj.generate(target, [5, 6, 7], 4, draft=draft, mode=mode, spec=spec)
    fn = sj.make_generate_fn(target.cfg, spec, mode="longspec", draft_cfg=ls_cfg, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"unexpected extra \(2,\)"):
        fn(target.params, {"params": {**ls.params, "extra": extra}}, np.array([[5, 6, 7]]), jax.random.key(0))
    own_embedding = {**head.params, "embed_tokens": {"embedding": target.params["embed_tokens"]["embedding"]}}
    out = sj.generate(target, [5, 6, 7], 4, draft=dataclasses.replace(head, params=own_embedding), mode="eagle",
                      spec=spec)
    assert out.tokens.shape == (1, 4)  # an EAGLE-3 head may carry its own embedding


def test_bad_modes_and_sampling_parameters(target):
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        sj.generate(target, [5, 6], mode="fast")
    with pytest.raises(TypeError, match="progress must be True, False or None .*, got 'no'"):  # it showed the bar
        sj.generate(target, [5, 6], 2, progress="no")
    for bad in (-1.0, 1e39):  # 1e39 is finite in Python, not in float32, where the loop computes
        with pytest.raises(ValueError, match=r"temperature must be finite in float32 \(at most 3.4e38\) and >= 0"):
            sj.generate(target, [5, 6], temperature=bad)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        sj.generate(target, [5, 6], temperature=1.0, top_p=0.0)
    for bad in ("0.5", True, None):
        with pytest.raises(TypeError, match="temperature must be a number"):
            sj.generate(target, [5, 6], temperature=bad)
    with pytest.raises(TypeError, match="top_p must be a number"):
        sj.generate(target, [5, 6], temperature=1.0, top_p="0.9")
    for bad in (2.0, True, "5", None):
        with pytest.raises(TypeError, match=r"top_k must be an integer \(0: no top-k filter\)"):
            sj.generate(target, [5, 6], temperature=1.0, top_k=bad)
    for bad in (-1, 2 ** 31):
        with pytest.raises(ValueError, match="top_k must be >= 0"):
            sj.generate(target, [5, 6], temperature=1.0, top_k=bad)
    with pytest.warns(UserWarning, match=r"top_k=5 has no effect with temperature=0 \(greedy decoding\)"):
        sj.generate(target, [5, 6], 2, top_k=5)


@pytest.mark.parametrize("eos", ["</s>", 2 ** 40, -5, 160, True, 5.0, [3, "4"]])
def test_bad_eos_ids_are_named(target, eos):
    with pytest.raises(ValueError, match=r"eos_token_ids must be a token id or a sequence of them, each in \[0, 160\)"):
        sj.generate(target, [5, 6], eos_token_ids=eos)


def test_other_bad_arguments_are_named(target):
    for call in (lambda: sj.generate("path/to/model", [5, 6]), lambda: sj.forward_logits("path/to/model", [5, 6]),
                 lambda: sj.load_draft("path/to/draft", "path/to/model")):  # an AttributeError each
        with pytest.raises(TypeError, match="target must be a model from sj.load_target, got str"):
            call()
    with pytest.raises(TypeError, match="model must be a model from sj.load_target, got str"):
        sj.save_target("path/to/model", "out")
    with pytest.raises(TypeError, match="draft must be a draft from sj.load_draft, got str"):
        sj.save_draft("path/to/draft", "out")
    with pytest.raises(TypeError, match="stream must be a function"):
        sj.generate(target, [5, 6], stream=[])
    with pytest.raises(ValueError, match="seed must be a 64-bit signed integer, got 1.5"):
        sj.generate(target, [5, 6], seed=1.5)
    with pytest.raises(TypeError, match="spec must be a SpecConfig, got dict"):
        sj.generate(target, [5, 6], spec={"tree_nodes": 4})
    with pytest.raises(ValueError, match="temperature must be finite"):
        sj.generate(target, [5, 6], temperature=float("inf"))
    with pytest.raises(ValueError, match=r"draft is a path \(heads/eagle3\); load it first"):
        sj.generate(target, [5, 6], mode="eagle", draft="heads/eagle3")
    with pytest.raises(PromptError, match="prompt 0 has 2049 tokens, over the model's max_position_embeddings=2048"):
        sj.forward_logits(target, np.arange(2049) % 150)
    out = sj.generate(target, [[5, 6]], 4, eos_token_ids=np.int64(7))
    with pytest.raises(PromptError, match="1 prompts for an output of 2 rows"):
        sj.fidelity(target, [[5, 6]], sj.generate(target, [[5, 6], [5, 6]], 4))
    assert out.tokens.shape[0] == 1


def test_ragged_rows_of_any_array_type(target):
    import jax.numpy as jnp

    rows = [[5, 9, 11, 3], [7, 8]]
    ref = sj.generate(target, rows, 6, eos_token_ids=())
    for convert in (np.asarray, jnp.asarray, tuple):
        np.testing.assert_array_equal(sj.generate(target, [convert(r) for r in rows], 6, eos_token_ids=()).tokens,
                                      ref.tokens)


def test_top_p_without_sampling_is_a_warning_and_greedy(target):
    greedy = sj.generate(target, [5, 6, 7], 6, eos_token_ids=())
    with pytest.warns(sj.SpecPVWarning, match="top_p=0.5 has no effect with temperature=0") as seen:
        out = sj.generate(target, [5, 6, 7], 6, top_p=0.5, eos_token_ids=())
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    assert seen[0].filename == __file__  # the user's line, not the library's


def test_models_print_without_their_weights(target):
    models = sj.demo_models()
    for model in (target, models.eagle3, models.small_draft, models.longspec):
        text = repr(model)
        assert "Config(" in text and "Array" not in text and len(text) < 2000, text[:200]


def test_a_tiny_temperature_samples_the_argmax(target):
    greedy = sj.generate(target, [5, 6, 7], 8, eos_token_ids=())
    for temperature in (1e-40, 5e-324):  # logits / temperature overflowed float32: NaN probabilities, token 0
        out = sj.generate(target, [5, 6, 7], 8, temperature=temperature, eos_token_ids=())
        np.testing.assert_array_equal(out.tokens, greedy.tokens)


def test_a_top_p_below_float32s_range_keeps_the_likeliest_token(target):
    """1e-46 is 0.0 as the sampler's float32: the nucleus once kept nothing (0/0 probabilities, token 0)."""
    greedy = sj.generate(target, [5, 6, 7], 8, eos_token_ids=())
    out = sj.generate(target, [5, 6, 7], 8, temperature=1.0, top_p=1e-46, eos_token_ids=())
    np.testing.assert_array_equal(out.tokens, greedy.tokens)


def test_nan_logits_raise_instead_of_returning_token_0(target):
    """A target whose activations overflow (float16) gives NaN logits, whose argmax is token 0: every mode
    raises, whether the NaN shows in prefill or first in a decode step, and so does forward_logits."""
    from specpv_jax.demo import random_head
    from specpv_jax.loading import Model

    prompt = np.arange(100) % 40 + 3  # tokens 3..42
    free = sj.generate(target, prompt, 8, eos_token_ids=())
    fresh = [t for t in free.tokens[0, 1:] if not 3 <= t <= 42]
    assert fresh, free.tokens  # a token the prompt lacks, emitted after the first: its step meets the NaN
    params = jax.tree.map(lambda x: x, target.params)
    params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"].at[fresh[0]].set(np.nan)
    broken = Model(target.cfg, params, source="test")
    spec = sj.SpecConfig(tree_depth=3, tree_top_k=3, tree_nodes=6, sink_tokens=16, retrieval_tokens=32,
                         window_tokens=16)  # partial steps start above 64 tokens
    head = random_head(target)
    for mode in ("ar", "eagle", "specpv", "exact"):  # greedy: each emits fresh[0], then meets the NaN
        with pytest.raises(FloatingPointError, match=r"the target's logits are NaN or infinite \(llama in float32"):
            sj.generate(broken, prompt, 8, draft=head if mode != "ar" else None, mode=mode, spec=spec,
                        eos_token_ids=())
    for mode in ("ar", "eagle"):  # in prefill, sampling
        with pytest.raises(FloatingPointError, match="NaN or infinite"):
            sj.generate(broken, np.append(prompt, fresh[0]), 4, draft=head if mode != "ar" else None, mode=mode,
                        temperature=1.0)
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        sj.forward_logits(broken, np.append(prompt, fresh[0]))
    np.testing.assert_array_equal(sj.generate(broken, prompt, 1).tokens, free.tokens[:, :1])  # no NaN met yet


def test_forward_logits_checks_its_chunk(target):
    for chunk in (0, -1, 2.5):
        with pytest.raises(PromptError, match="chunk must be a positive integer"):
            sj.forward_logits(target, [5, 6, 7], chunk=chunk)
    with pytest.raises(PromptError, match="chunk must be a positive integer"):
        sj.fidelity(target, [5, 6, 7], sj.generate(target, [5, 6, 7], 2), chunk=0)


def test_right_padding_mask_equals_ragged(target):
    prompts = [[5, 9, 11, 3], [7, 8]]
    ids = np.array([[5, 9, 11, 3], [7, 8, 0, 0]])
    mask = (np.arange(4)[None] < np.array([[4], [2]])).astype(np.int32)
    a = sj.generate(target, prompts, max_new_tokens=12, eos_token_ids=())
    b = sj.generate(target, ids, max_new_tokens=12, eos_token_ids=(), attention_mask=mask)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.tokens.shape == (2, 12) and (a.lengths == 12).all()
    # A tokenizer's padding=True without return_tensors gives the same as lists of lists.
    c = sj.generate(target, ids.tolist(), max_new_tokens=12, eos_token_ids=(), attention_mask=mask.tolist())
    np.testing.assert_array_equal(c.tokens, a.tokens)


def test_stats(target):
    out = sj.generate(target, [5, 6, 7], max_new_tokens=10, eos_token_ids=())
    s = out.stats
    assert s["new_tokens"] == 10 and s["steps"] == 9 and s["mean_accept_len"] == 1.0
    assert s["time_s"] > 0 and s["prefill_s"] > 0 and s["tokens_per_s"] > 0
    assert {"full_verifications", "partial_verifications", "rollbacks"} <= set(s)


def test_sampling_is_seeded(target):
    a = sj.generate(target, [5, 6, 7], max_new_tokens=16, temperature=1.0, seed=1, eos_token_ids=())
    b = sj.generate(target, [5, 6, 7], max_new_tokens=16, temperature=1.0, seed=1, eos_token_ids=())
    c = sj.generate(target, [5, 6, 7], max_new_tokens=16, temperature=1.0, seed=2, eos_token_ids=())
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()


def test_every_64_bit_seed_samples_its_own_tokens(target):
    """jax.random.key keeps 32 bits of a seed: 2**32 + 5 sampled as 5, -1 as 2**32 - 1."""
    seeds = (5, 2 ** 32 + 5, 2 ** 62 + 5, 2 ** 32 - 1, -1, -2 ** 63)
    rows = {s: tuple(sj.generate(target, [5, 6, 7], 24, temperature=1.0, seed=s, eos_token_ids=()).tokens[0])
            for s in seeds}
    assert len(set(rows.values())) == len(seeds)
    import importlib

    g = importlib.import_module("specpv_jax.generate")  # the package's `generate` is the function
    assert (jax.random.key_data(g._prng_key(5)) == jax.random.key_data(jax.random.key(5))).all()  # as before


def test_eos_ids_may_be_arrays(target):
    import jax.numpy as jnp

    ref = sj.generate(target, [5, 6, 7], 12, eos_token_ids=(48,))
    for eos in (jnp.array([48]), jnp.array(48), np.array([48, 48]), np.int64(48)):
        np.testing.assert_array_equal(sj.generate(target, [5, 6, 7], 12, eos_token_ids=eos).tokens, ref.tokens)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_first_token_follows_the_model(target, temperature, top_p):
    """2048 rows of one prompt: the first sampled token's histogram matches the sampler's distribution."""
    prompt = [5, 9, 11, 3, 17]
    n = 2048
    out = sj.generate(target, [prompt] * n, max_new_tokens=1, temperature=temperature, top_p=top_p, seed=3)
    probs = np.asarray(Sampler.create(temperature, top_p).probs(sj.forward_logits(target, [prompt])[0, -1]))
    assert chi_square_pvalue(out.tokens[:, 0], probs) > 1e-3


def test_new_sampling_values_and_eos_ids_compile_nothing(target):
    """Temperature, top_p, top_k and the EOS ids are arguments of the compiled loop, not part of its key: a
    research sweep over them compiles once (at 8B, a compile takes minutes). Only greedy vs sampling, top_p < 1
    vs 1 and top_k > 0 vs 0 are static."""
    from specpv_jax import host

    rows = [[5, 9, 11, 3, 17]] * 64

    def first_tokens(temperature, top_p=0.9, eos=(3,), top_k=0):
        return sj.generate(target, rows, 4, temperature=temperature, top_p=top_p, top_k=top_k, seed=0,
                           eos_token_ids=eos).tokens

    first_tokens(0.7), first_tokens(0.7, 1.0, top_k=5)
    compiled = set(host._EXECUTABLES)
    cold, hot = first_tokens(1e-3, 0.8, (4, 9)), first_tokens(50.0, 0.99, (2, 9, 11, 12, 13, 14, 15))
    top2, top1 = first_tokens(50.0, 1.0, top_k=2), first_tokens(50.0, 1.0, top_k=1)
    assert set(host._EXECUTABLES) == compiled
    # The values are used, not frozen at the first call's: near 0 every row takes the argmax, at 50 they spread,
    # over two tokens with top_k 2, none with top_k 1.
    assert len(set(cold[:, 0])) == 1 and len(set(hot[:, 0])) > 10
    assert len(set(top2[:, 0])) == 2 and set(top1[:, 0]) == set(cold[:, 0])


def test_the_progress_bar_recompiles_prefill_only(target):
    from specpv_jax import host

    sj.generate(target, [5, 9, 11], 4, progress=False)
    before = set(host._EXECUTABLES)
    sj.generate(target, [5, 9, 11], 4, progress=True)
    assert len(set(host._EXECUTABLES) - before) == 1  # the prefill that ticks the bar; the decode loop is shared


def test_top_p_keeps_smallest_nucleus():
    p = Sampler.create(1.0, 0.6).probs(np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32)))
    np.testing.assert_allclose(np.asarray(p), [0.625, 0.375, 0, 0], atol=1e-6)


def test_top_k_and_top_p_keep_ties_at_their_edge_and_top_p_applies_within_the_top_k():
    logits = np.log(np.array([0.4, 0.2, 0.2, 0.1, 0.06, 0.04], np.float32))
    np.testing.assert_allclose(np.asarray(Sampler.create(1.0, top_k=2).probs(logits)), [0.5, 0.25, 0.25, 0, 0, 0],
                               atol=1e-6)  # the 2nd and 3rd tie: both stay, as in transformers
    np.testing.assert_allclose(np.asarray(Sampler.create(1.0, 0.5).probs(logits)), [0.5, 0.25, 0.25, 0, 0, 0],
                               atol=1e-6)  # top-p reaches 0.5 at the 2nd, and the 3rd ties with it
    # top-p's mass is taken within the top-k tokens: the likeliest holds 0.4 of all, 0.4 / 0.9 of the top 4
    np.testing.assert_allclose(np.asarray(Sampler.create(1.0, 0.42).probs(logits)), [0.5, 0.25, 0.25, 0, 0, 0],
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(Sampler.create(1.0, 0.42, top_k=4).probs(logits)), [1, 0, 0, 0, 0, 0],
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(Sampler.create(1.0, top_k=6).probs(logits)), np.exp(logits), atol=1e-6)
    np.testing.assert_allclose(np.asarray(Sampler.create(1.0, top_k=1).probs(np.stack([logits, logits[::-1]]))),
                               [[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]], atol=1e-6)
    assert not Sampler.create(0.0, top_k=3).filtered and Sampler.create(1.0, top_k=10 ** 6).filtered
    assert not Sampler.create(1.0, top_k=3).uses_top_p and not Sampler.create(1.0, 0.9).uses_top_k


def test_top_p_that_rounds_to_one_filters_nothing():
    """float32 holds no number between 1 - 6e-8 and 1: such a top_p keeps every token, without the nucleus's sort
    (and its own compiled loop)."""
    assert not Sampler.create(1.0, 1 - 1e-9).filtered and Sampler.create(1.0, 1 - 1e-7).filtered


def test_bucket_lengths():
    assert [bucket_length(n, 512) for n in (1, 16, 17, 300, 512, 513, 1100)] == [16, 16, 32, 512, 512, 1024, 1536]
    assert bucket_length(300, 100) == 300 and bucket_length(90, 100) == 100


def test_fidelity(target):
    prompts = [[5, 9, 11, 3], [7, 8]]
    out = sj.generate(target, prompts, max_new_tokens=12, eos_token_ids=())
    assert sj.fidelity(target, prompts, out) == 1.0  # greedy AR agrees with itself
    wrong = out.tokens.copy()
    wrong[0, 4] = (wrong[0, 4] + 1) % 160  # one token of 24 off; its successors still judged on its prefix
    assert sj.fidelity(target, prompts, sj.GenerateOutput(wrong, out.lengths, out.stats)) < 1.0
    wrong = out.tokens.copy()
    wrong[1, 11] = (wrong[1, 11] + 1) % 160  # the last token: exactly one mismatch
    assert sj.fidelity(target, prompts, sj.GenerateOutput(wrong, out.lengths, out.stats)) == 23 / 24


def test_forward_logits_of_ragged_and_padded_prompts_are_each_prompts_own(target):
    """Ragged rows come back right-padded with zeros, padded rows (a mask) in their own layout with zeros
    where the mask is 0; each row's logits are those of the prompt alone."""
    short, long = [5, 9, 11], [7, 8, 3, 4, 12, 6]
    alone = [sj.forward_logits(target, p)[0] for p in (short, long)]
    ragged = sj.forward_logits(target, [short, long])
    assert ragged.shape == (2, 6, 160)
    np.testing.assert_allclose(ragged[0, :3], alone[0], atol=1e-5)
    np.testing.assert_allclose(ragged[1], alone[1], atol=1e-5)
    assert not ragged[0, 3:].any()
    ids = np.array([[0, 0, 0] + short, long])  # the short row left-padded
    mask = (np.arange(6) >= np.array([[3], [0]])).astype(np.int32)
    padded = sj.forward_logits(target, ids, attention_mask=mask)
    assert padded.shape == (2, 6, 160)
    np.testing.assert_allclose(padded[0, 3:], alone[0], atol=1e-5)
    np.testing.assert_allclose(padded[1], alone[1], atol=1e-5)
    assert not padded[0, :3].any()
    np.testing.assert_array_equal(sj.forward_logits(target, ids[0], attention_mask=mask[0])[0, 3:], padded[0, 3:])


def test_nearby_lengths_share_compiled_loops(target):
    """Prompt lengths and max_new_tokens are bucketed: a new value inside the buckets compiles nothing."""
    from specpv_jax import host

    sj.generate(target, [5, 6, 7], max_new_tokens=20, eos_token_ids=())
    compiled = set(host._EXECUTABLES)
    out = sj.generate(target, [5, 6, 8, 9, 10], max_new_tokens=27, eos_token_ids=())
    assert set(host._EXECUTABLES) == compiled
    assert out.tokens.shape == (1, 27) and out.stats["new_tokens"] == 27


def test_long_prefill_shows_a_progress_bar_per_chunk(monkeypatch):
    import specpv_jax.host as host
    from test_eagle import make_target

    target = make_target(16, layers=2)
    counts = []
    close = host.prefill_progress.__exit__
    monkeypatch.setattr(host.prefill_progress, "__exit__",
                        lambda self, *e: (counts.append(self.bar.n), close(self, *e)))
    prompt = np.arange(300) % 16
    sj.generate(target, prompt, 4, prefill_chunk=64, progress=True)
    sj.generate(target, prompt, 4, prefill_chunk=64)  # 5 chunks: below the default threshold, no bar
    assert counts == [5]


def test_concurrent_prefills_share_one_progress_bar(monkeypatch):
    """A prefill's ticks arrive with nothing naming its call: calls in several threads count into one bar
    (before, a call's chunks advanced whichever bar was entered last)."""
    import threading

    import specpv_jax.host as host
    from test_eagle import make_target

    gen = importlib.import_module("specpv_jax.generate")
    target = make_target(16, layers=2)
    in_bar, other_entered = threading.Event(), threading.Event()
    original = gen._prefill_and_decode

    def after_the_other_enters(*args, **kwargs):  # this call's bar is open; its prefill waits for the other's
        in_bar.set()
        assert other_entered.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setattr(gen, "_prefill_and_decode", after_the_other_enters)
    closes = []
    close = host.prefill_progress.__exit__
    monkeypatch.setattr(host.prefill_progress, "__exit__",
                        lambda self, *e: (closes.append((self.bar, self.bar.n, self.bar.total)), close(self, *e)))
    worker = threading.Thread(target=sj.generate, args=(target, np.arange(300) % 16, 4),
                              kwargs=dict(prefill_chunk=64, progress=True))
    worker.start()
    assert in_bar.wait(60)
    with host.prefill_progress(3):  # entered second; its 3 chunks tick after the worker's 5
        other_entered.set()
        worker.join()
        for c in range(3):
            host.tick(c)
    assert closes[-1][1:] == (8, 8) and len({id(bar) for bar, _, _ in closes}) == 1


def test_a_notebook_prefill_bar_grows_with_the_calls_that_join_it(monkeypatch):
    """In Jupyter the shared bar is a widget whose length was set when it was drawn: a call joining it
    lengthens the widget too."""
    import types

    import tqdm
    import tqdm.auto

    from specpv_jax import host

    class WidgetBar(tqdm.tqdm):  # tqdm.notebook's layout: (label, bar, text) widgets in `container`
        def __init__(self, *args, total, **kwargs):
            super().__init__(*args, total=total, disable=True, **kwargs)
            self.container = types.SimpleNamespace(children=[None, types.SimpleNamespace(max=total), None])

    monkeypatch.setattr(tqdm.auto, "tqdm", WidgetBar)
    with host.prefill_progress(5) as bar, host.prefill_progress(3):
        assert (bar.total, bar.container.children[1].max) == (8, 8)


def test_compiled_code_follows_the_trace_context(target, monkeypatch):
    """A call under another matmul precision compiles again instead of reusing the suite's executable;
    at most `host.MAX_EXECUTABLES` are kept, the most recently used."""
    import jax

    from specpv_jax import host

    sj.generate(target, [5, 6, 7], 4, eos_token_ids=())
    compiled = set(host._EXECUTABLES)
    with jax.default_matmul_precision("bfloat16"):  # the suite runs at "highest" (conftest)
        sj.generate(target, [5, 6, 7], 4, eos_token_ids=())
    assert set(host._EXECUTABLES) > compiled
    monkeypatch.setattr(host, "MAX_EXECUTABLES", 3)
    sj.generate(target, [5, 6, 7], 40, eos_token_ids=())  # another output bucket: a new loop
    assert len(host._EXECUTABLES) == 3
    kept = set(host._EXECUTABLES)
    sj.generate(target, [5, 6, 7], 40, eos_token_ids=())
    assert set(host._EXECUTABLES) == kept


def test_a_tied_models_decode_loop_multiplies_by_a_kernel_made_before_it():
    """On XLA:CPU a loop's product with a tied embedding's transpose runs slower than with a [H, V] kernel
    (BENCHMARKS.md): `for_decode_loop` gives a tied model's decode loop one, with the same logits, and
    the compiled AR program uses it (without, every logits product contracts the embedding's dimension 1)."""
    from specpv_jax import model as M
    from test_eagle import make_target

    untied = make_target(96, layers=2)
    cfg = dataclasses.replace(untied.cfg, tie_word_embeddings=True)
    params = {name: p for name, p in untied.params.items() if name != "lm_head"}
    prepared = M.for_decode_loop(params, cfg)
    assert prepared["lm_head"]["kernel"].shape == (cfg.hidden_size, cfg.vocab_size)
    hidden = jax.random.normal(jax.random.key(0), (3, cfg.hidden_size))
    np.testing.assert_allclose(M.logits(prepared, cfg, hidden), M.logits(params, cfg, hidden), rtol=1e-5, atol=1e-5)
    assert M.for_decode_loop(untied.params, untied.cfg) is untied.params
    fn = sj.make_generate_fn(cfg, mode="ar", max_new_tokens=8, eos_token_ids=())
    text = jax.jit(fn).lower(params, None, jnp.zeros((2, 16), jnp.int32), jax.random.key(0)).compile().as_text()
    logits_products = [line for line in text.splitlines() if f",{cfg.vocab_size}]" in line and " dot(" in line]
    assert any("rhs_contracting_dims={0}" in line for line in logits_products), logits_products
