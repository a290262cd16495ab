"""Token selection: greedy, or temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampler:
    """temperature 0 means greedy (argmax); otherwise sample from `probs(logits)`."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: jax.Array) -> jax.Array:
        """The distribution tokens are drawn from, `[..., V]` float32 (one-hot at argmax when greedy)."""
        logits = logits.astype(jnp.float32)
        if self.greedy:
            return jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.float32)
        # Shift by the max, then divide by at least float32's smallest normal number: a tiny temperature then
        # samples the argmax instead of overflowing (or, flushed to zero, dividing by zero) into NaN.
        temperature = max(self.temperature, float(jnp.finfo(jnp.float32).tiny))
        p = jax.nn.softmax((logits - logits.max(-1, keepdims=True)) / temperature, axis=-1)
        if self.top_p < 1:
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
    keep_sorted = mass_before < top_p  # the first token always stays
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    p = jnp.where(keep, p, 0.0)
    return p / p.sum(-1, keepdims=True)
