"""The JAX settings the library runs under, whatever a caller sets for its whole process.

Models, caches and loops are written for JAX's defaults: 32-bit integers (with `jax_enable_x64` a layer
index or a literal would trace as int64 beside int32 positions and fail), standard dtype promotion and
implicit rank promotion. Each public entry point runs under `defaults()`; the caller's settings hold
again when it returns, and the outputs (int32 tokens, float32 logits) are the same as without them.
A caller's `jax.transfer_guard` stays in force: `generate` and `forward_logits` move their inputs and
results with explicit `jax.device_put` / `jax.device_get`, and `make_generate_fn`'s function is jitted whole.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import jax


@contextlib.contextmanager
def defaults() -> Iterator[None]:
    """JAX's default integer width and promotion rules, for this thread, inside the block."""
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


def under_defaults(fn: Callable) -> Callable:
    """`fn` run under `defaults()`."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with defaults():
            return fn(*args, **kwargs)
    return wrapped
