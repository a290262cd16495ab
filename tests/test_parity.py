"""Converted HF models reproduce `transformers` logits and greedy generations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import specpv_jax as sj
from conftest import HF_SPECS

NAMES = list(HF_SPECS)


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def hf_greedy(model, prompt: np.ndarray, new: int, eos=None) -> list[int]:
    kw = {} if eos is None else {"eos_token_id": eos}
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt[None]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new, do_sample=False, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(hf_model, name):
    directory, hf = hf_model(name)
    target = sj.load_target(directory, progress=False)
    rng = np.random.default_rng(1)
    # Causal logits of a 300-token prompt cover every prompt length 1..300.
    for length in (1, 300):
        ids = rng.integers(3, 160, (2, length))
        ref = hf_logits(hf, ids)
        np.testing.assert_allclose(sj.forward_logits(target, ids), ref, atol=1e-4, rtol=0)
    # Several prefill chunks (prefix read block by block) give the same logits.
    np.testing.assert_allclose(sj.forward_logits(target, ids, chunk=64), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generate_matches_transformers(hf_model, name):
    directory, hf = hf_model(name)
    target = sj.load_target(directory, progress=False)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 160, n) for n in (7, 60, 131)]
    expected = [hf_greedy(hf, p, 64) for p in prompts]

    single = sj.generate(target, prompts[0], max_new_tokens=64)
    assert single.tokens[0, : single.lengths[0]].tolist() == expected[0]

    ragged = sj.generate(target, prompts, max_new_tokens=64)
    assert [ragged.tokens[b, : ragged.lengths[b]].tolist() for b in range(3)] == expected

    # The same batch given as a left-padded array with an attention mask.
    width = max(len(p) for p in prompts)
    ids = np.zeros((3, width), np.int64)
    mask = np.zeros((3, width), np.int64)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = p, 1
    left = sj.generate(target, ids, max_new_tokens=64, attention_mask=mask)
    np.testing.assert_array_equal(left.tokens, ragged.tokens)


def test_generation_stops_at_eos_like_transformers(hf_model):
    directory, hf = hf_model("llama-mha")
    target = sj.load_target(directory, progress=False)
    prompt = np.random.default_rng(3).integers(3, 160, 25)
    free = hf_greedy(hf, prompt, 40)
    eos = free[10]  # a token the model emits: generation must end right after its first occurrence
    stop = free.index(eos) + 1
    assert hf_greedy(hf, prompt, 40, eos=eos) == free[:stop]
    out = sj.generate(target, [prompt, prompt[:5]], max_new_tokens=40, eos_token_ids=(eos,))
    assert out.lengths[0] == stop
    assert out.tokens[0, :stop].tolist() == free[:stop]
    assert (out.tokens[0, stop:] == target.cfg.pad_token_id).all()


def test_bfloat16_close_to_float32(hf_model):
    directory, _ = hf_model("qwen3-gqa2-tied-yarn")
    ids = np.random.default_rng(4).integers(3, 160, (1, 50))
    f32 = sj.forward_logits(sj.load_target(directory, dtype="float32", progress=False), ids)
    bf16 = sj.load_target(directory, dtype="bfloat16", progress=False)
    assert bf16.dtype == np.dtype("bfloat16")
    got = sj.forward_logits(bf16, ids)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert np.abs(got - f32).max() < 0.1 * np.abs(f32).max()
    assert (got.argmax(-1) == f32.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("temperature, top_p, top_k", [(0.7, 1.0, 20), (0.7, 1.0, 3), (1.3, 0.8, 0), (0.6, 0.95, 20),
                                                       (1.0, 0.3, 3)])
def test_sampling_filters_match_transformers_warpers(temperature, top_p, top_k):
    """The distribution a Sampler draws from is transformers' (temperature, then top-k, then top-p warpers)."""
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    from specpv_jax.sampling import Sampler

    logits = np.random.default_rng(3).normal(0, 3, (6, 1000)).astype(np.float32)
    if top_p == 1:  # ties among the likeliest tokens: transformers keeps them all at the top-k edge (as we do),
        logits[:, 10:14] = logits[:, :1] + 1  # an arbitrary few at the top-p edge (we keep all)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] +
                                  ([TopKLogitsWarper(top_k)] if top_k else []) +
                                  ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    ref = torch.softmax(warpers(None, torch.tensor(logits)), -1).numpy()
    ours = np.asarray(Sampler.create(temperature, top_p, top_k).probs(logits))
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert ((ref == 0) == (ours == 0)).all() and (ref == 0).any(axis=-1).all() == (top_k > 0 or top_p < 1)
