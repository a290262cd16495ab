"""Goodness-of-fit check for sampled tokens against a distribution."""

from __future__ import annotations

import numpy as np
from scipy import stats


def chi_square_pvalue(samples: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
    """p-value of a chi-square test that `samples` (token ids) were drawn from `probs [V]`.

    Tokens with fewer than `min_expected` expected draws are pooled into one bin.
    Draws of a zero-probability token give p = 0.
    """
    probs = np.asarray(probs, np.float64)
    counts = np.bincount(np.asarray(samples).ravel(), minlength=probs.size).astype(np.float64)
    return _chi_square(counts, probs / probs.sum() * counts.sum(), min_expected)


def teacher_forced_pvalues(target, prompt, tokens: np.ndarray, sampler) -> np.ndarray:
    """p-values `[k]` of chi-square tests that each position j of the rows `tokens [N, k]` sampled after
    `prompt` was drawn from the full-context target's `sampler` distribution given that row's tokens before j
    (expected counts: the sum of those distributions over the rows)."""
    import specpv_jax as sj

    n, k = tokens.shape
    seqs = np.concatenate([np.tile(np.asarray(prompt, np.int32), (n, 1)), tokens.astype(np.int32)], 1)
    logits = sj.forward_logits(target, seqs)[:, len(prompt) - 1: len(prompt) - 1 + k]
    probs = np.asarray(sampler.probs(logits), np.float64)
    probs /= probs.sum(-1, keepdims=True)
    vocab = probs.shape[-1]
    return np.array([_chi_square(np.bincount(tokens[:, j], minlength=vocab).astype(np.float64), probs[:, j].sum(0))
                     for j in range(k)])


def _chi_square(counts: np.ndarray, expected: np.ndarray, min_expected: float = 5.0) -> float:
    if counts[expected == 0].sum() > 0:
        return 0.0
    big = expected >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(stats.chisquare(obs[keep], exp[keep]).pvalue)


def three_token_law(target, prompt, sampler) -> np.ndarray:
    """The target's joint law `[V**3]` of the first three tokens sampled after `prompt` (full context)."""
    import specpv_jax as sj

    vocab = target.cfg.vocab_size
    pairs = np.array([[a, b] for a in range(vocab) for b in range(vocab)])
    logits = sj.forward_logits(target, np.concatenate([np.tile(prompt, (len(pairs), 1)), pairs], 1))
    probs = np.asarray(sampler.probs(logits), np.float64)
    p1 = probs[0, -3]
    p2 = probs[:, -2].reshape(vocab, vocab, vocab)[:, 0]  # p(t2 | t1), from rows with that t1
    p3 = probs[:, -1].reshape(vocab, vocab, vocab)        # p(t3 | t1, t2)
    return (p1[:, None, None] * p2[:, :, None] * p3).reshape(-1)


def three_token_cells(tokens: np.ndarray, vocab: int) -> np.ndarray:
    """Each row's first three tokens as one cell id of the joint law."""
    return tokens[:, 0] * vocab * vocab + tokens[:, 1] * vocab + tokens[:, 2]
