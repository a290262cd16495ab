"""Rotary position embeddings: default, llama3 and yarn frequency tables.

Tables follow the Hugging Face definitions (float32, `rotate_half` layout) so
converted checkpoints reproduce `transformers` logits.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from specpv_jax.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Per-pair inverse frequencies, float32 `[head_dim // 2]`."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = np.float32(1.0) / _powers(rope.theta, exponents)
    if rope.kind == "llama3":
        return _llama3(inv_freq, rope)
    if rope.kind == "yarn":
        return _yarn(exponents, head_dim, rope)
    return inv_freq


def _powers(base: float, exponents: np.ndarray) -> np.ndarray:
    """`base ** exponents` (float32), computed in float64: numpy's float32 power is off by an ulp for a sixth of
    a 128-wide head's pairs, where torch's is not; that moved float32 logits 0.03 from `transformers`' at 32K
    tokens, 0.1 at 128K."""
    return (np.float64(base) ** exponents.astype(np.float64)).astype(np.float32)


def attention_scaling(rope: RopeConfig) -> float:
    """Factor applied to cos/sin (YaRN's attention temperature; 1 otherwise)."""
    if rope.kind != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return float(rope.attention_factor)

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.mscale and rope.mscale_all_dim:
        return mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim)
    return mscale(rope.factor)


def _llama3(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(exponents: np.ndarray, head_dim: int, rope: RopeConfig) -> np.ndarray:
    base, dim = rope.theta, head_dim

    def correction_dim(rotations):
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = (1 - ramp).astype(np.float32)
    pos_freqs = _powers(base, exponents)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (np.float32(rope.factor) * pos_freqs)
    return (interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight).astype(np.float32)


def cos_sin(positions: jax.Array, inv_freq: np.ndarray, scaling: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables `[B, T, D]` for integer positions `[B, T]`, cast to `dtype`."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * scaling).astype(dtype), (jnp.sin(emb) * scaling).astype(dtype)


def tables(config: RopeConfig, head_dim: int, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables `[B, T, head_dim]` of the RoPE `config` at integer positions `[B, T]`, cast to `dtype`."""
    return cos_sin(positions, inverse_frequencies(config, head_dim), attention_scaling(config), dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """`x [..., D]`'s halves swapped, the second negated (HF `rotate_half`): `x * cos + rotate_half(x) * sin`
    rotates each pair (i, i + D/2) by its angle."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates `x [B, T, H, D]` with tables `[B, T, D]` (HF `rotate_half` layout)."""
    return x * cos[:, :, None, :] + rotate_half(x) * sin[:, :, None, :]
