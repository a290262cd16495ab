"""Token selection: greedy, or temperature sampling with optional top-k and nucleus (top-p) filters."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

NO_TOP_K = np.iinfo(np.int32).max  # `top_k` of a Sampler that keeps every token


@functools.partial(jax.tree_util.register_dataclass, data_fields=["temperature", "top_p", "top_k"],
                   meta_fields=["greedy", "uses_top_p", "uses_top_k"])
@dataclasses.dataclass(frozen=True)
class Sampler:
    """How tokens are chosen: the argmax when `greedy`, else a draw at `temperature` from the `top_k` most
    likely tokens (when `uses_top_k`) and, of those, the smallest set whose mass reaches `top_p` (when
    `uses_top_p`), as transformers' top-k then top-p warpers.

    A pytree: temperature, top_p and top_k are leaves, so a jitted loop taking a Sampler compiles once for
    every value; greedy and which filters apply are static. Build one with `Sampler.create`.
    """

    temperature: Any
    top_p: Any
    top_k: Any
    greedy: bool
    uses_top_p: bool
    uses_top_k: bool

    @property
    def filtered(self) -> bool:
        """Whether a top-p or top-k filter applies (the tokens are sorted)."""
        return self.uses_top_p or self.uses_top_k

    @classmethod
    def create(cls, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> "Sampler":
        """Checks the settings; temperature 0 means greedy, top_k 0 keeps every token."""
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if np.ndim(value) != 0 or np.asarray(value).dtype.kind not in "iuf":  # not str, bool, None
                raise TypeError(f"{name} must be a number, got {value!r}")
        if np.ndim(top_k) != 0 or np.asarray(top_k).dtype.kind not in "iu":
            raise TypeError(f"top_k must be an integer (0: no top-k filter), got {top_k!r}")
        temperature, top_p, top_k = float(temperature), float(top_p), int(top_k)
        if not 0 <= temperature <= float(np.finfo(np.float32).max):  # float32 is what the loop computes in
            raise ValueError(f"temperature must be finite in float32 (at most 3.4e38) and >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if not 0 <= top_k <= NO_TOP_K:
            raise ValueError(f"top_k must be >= 0 (0: no top-k filter) and fit int32, got {top_k}")
        top_p = np.float32(top_p)  # a top_p that rounds to 1 keeps every token: no nucleus filter
        # At least float32's smallest normal number: a tiny temperature then samples the argmax instead of
        # overflowing (or, flushed to zero, dividing by zero) into NaN.
        return cls(np.float32(max(temperature, float(np.finfo(np.float32).tiny))), top_p,
                   np.int32(top_k or NO_TOP_K), greedy=temperature == 0,
                   uses_top_p=bool(top_p < 1) and temperature > 0, uses_top_k=top_k > 0 and temperature > 0)

    def probs(self, logits: jax.Array) -> jax.Array:
        """The distribution tokens are drawn from, `[..., V]` float32 (one-hot at argmax when greedy)."""
        logits = logits.astype(jnp.float32)
        if self.greedy:
            return jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.float32)
        p = jax.nn.softmax((logits - logits.max(-1, keepdims=True)) / self.temperature, axis=-1)
        if self.filtered:
            p = _filter(p, self.top_p if self.uses_top_p else None, self.top_k if self.uses_top_k else None)
        return p

    def sample(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """Token ids `[...]` int32 from logits `[..., V]`."""
        if self.greedy:
            return jnp.argmax(logits, -1).astype(jnp.int32)
        return sample_from(self.probs(logits), key)


def sample_from(probs: jax.Array, key: jax.Array) -> jax.Array:
    """Draws from a (possibly unnormalised, non-negative) distribution `[..., V]`."""
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


def _filter(p: jax.Array, top_p: jax.Array | None, top_k: jax.Array | None) -> jax.Array:
    """Keeps the tokens at least as likely as the `top_k`-th, then of those the smallest set of most likely
    ones whose mass within them reaches `top_p` (transformers' top-k warper, then its top-p); renormalises.

    One sort and a threshold: tokens as likely as the last one kept stay too (transformers keeps such ties
    at the top-k edge, and an arbitrary few of them at the top-p edge).
    """
    v = p.shape[-1]
    ascending = jnp.sort(p, axis=-1)
    kept = ascending > 0  # a suffix of the sorted tokens, as every step below keeps
    if top_k is not None:
        kept &= ascending >= jnp.take(ascending, jnp.maximum(v - top_k, 0), axis=-1)[..., None]
    if top_p is not None:
        within = jnp.where(kept, ascending, 0.0)
        mass_above = lax.cumsum(within, axis=within.ndim - 1, reverse=True) - within  # of the likelier tokens
        if top_k is not None:
            mass_above = mass_above / within.sum(-1, keepdims=True)
        kept &= (mass_above < top_p).at[..., -1].set(True)  # the likeliest stays (a tiny top_p is 0 in float32)
    least = jnp.minimum(v - kept.sum(-1, keepdims=True), v - 1)  # the position of the least likely kept
    p = jnp.where(p >= jnp.take_along_axis(ascending, least, axis=-1), p, 0.0)
    return p / p.sum(-1, keepdims=True)
