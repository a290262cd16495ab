"""Token selection: greedy, or temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.tree_util.register_dataclass, data_fields=["temperature", "top_p"],
                   meta_fields=["greedy", "nucleus"])
@dataclasses.dataclass(frozen=True)
class Sampler:
    """How tokens are chosen: the argmax when `greedy`, else a draw at `temperature` from the smallest set of
    most likely tokens whose mass reaches `top_p` (only when `nucleus`).

    A pytree: temperature and top_p are float32 leaves, so a jitted loop taking a Sampler compiles once for
    every value; greedy and nucleus are static. Build one with `Sampler.create`.
    """

    temperature: Any
    top_p: Any
    greedy: bool
    nucleus: bool

    @classmethod
    def create(cls, temperature: float = 0.0, top_p: float = 1.0) -> "Sampler":
        """Checks the settings; temperature 0 means greedy."""
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if np.ndim(value) != 0 or np.asarray(value).dtype.kind not in "iuf":  # not str, bool, None
                raise TypeError(f"{name} must be a number, got {value!r}")
        temperature, top_p = float(temperature), float(top_p)
        if not 0 <= temperature <= float(np.finfo(np.float32).max):  # float32 is what the loop computes in
            raise ValueError(f"temperature must be finite in float32 (at most 3.4e38) and >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        top_p = np.float32(top_p)  # a top_p that rounds to 1 keeps every token: no nucleus filter
        # At least float32's smallest normal number: a tiny temperature then samples the argmax instead of
        # overflowing (or, flushed to zero, dividing by zero) into NaN.
        return cls(np.float32(max(temperature, float(np.finfo(np.float32).tiny))), top_p,
                   greedy=temperature == 0, nucleus=bool(top_p < 1) and temperature > 0)

    def probs(self, logits: jax.Array) -> jax.Array:
        """The distribution tokens are drawn from, `[..., V]` float32 (one-hot at argmax when greedy)."""
        logits = logits.astype(jnp.float32)
        if self.greedy:
            return jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.float32)
        p = jax.nn.softmax((logits - logits.max(-1, keepdims=True)) / self.temperature, axis=-1)
        if self.nucleus:
            p = _top_p_filter(p, self.top_p)
        return p

    def sample(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """Token ids `[...]` int32 from logits `[..., V]`."""
        if self.greedy:
            return jnp.argmax(logits, -1).astype(jnp.int32)
        return sample_from(self.probs(logits), key)


def sample_from(probs: jax.Array, key: jax.Array) -> jax.Array:
    """Draws from a (possibly unnormalised, non-negative) distribution `[..., V]`."""
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


def _top_p_filter(p: jax.Array, top_p: float) -> jax.Array:
    """Keeps the smallest set of most likely tokens whose mass reaches top_p; renormalises."""
    order = jnp.argsort(-p, axis=-1)
    sorted_p = jnp.take_along_axis(p, order, axis=-1)
    mass_before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
    keep_sorted = (mass_before < top_p).at[..., 0].set(True)  # the likeliest stays (a tiny top_p is 0 in float32)
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    p = jnp.where(keep, p, 0.0)
    return p / p.sum(-1, keepdims=True)
