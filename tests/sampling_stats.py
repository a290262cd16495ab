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
    probs = probs / probs.sum()
    counts = np.bincount(np.asarray(samples).ravel(), minlength=probs.size).astype(np.float64)
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs * counts.sum()
    big = expected >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(stats.chisquare(obs[keep], exp[keep]).pvalue)
