"""`hlo.loop_copies` finds what XLA copies inside loops, and `loop.run_if` keeps a buffer in place."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from specpv_jax import hlo
from specpv_jax.loop import run_if

BIG = (64, 256, 32)  # 2 MiB of f32


def compiled_text(fn, *args) -> str:
    return jax.jit(fn, donate_argnums=0).lower(*args).compile().as_text()


def steps(choose):
    """A loop of 10 steps, each adding 1 to row `count` of `big` on odd counts and 2 on even ones, the two
    updates chosen by `choose(pred, on_true, on_false, big)`."""
    def fn(big, count):
        def step(carry):
            big, count = carry
            odd = lambda b: b.at[count % BIG[0]].add(1.0)  # noqa: E731
            even = lambda b: b.at[count % BIG[0]].add(2.0)  # noqa: E731
            return choose(count % 2 == 1, odd, even, big), count + 1

        return lax.while_loop(lambda c: c[1] < 10, step, (big, count))

    return fn


def test_loop_copies_finds_the_copies_of_a_loop_that_swaps_its_buffers():
    def swapped(a, b):
        def step(carry):
            a, b, i = carry
            return b.at[i % BIG[0]].add(1.0), a, i + 1

        return lax.while_loop(lambda c: c[2] < 10, step, (a, b, jnp.int32(0)))

    text = jax.jit(swapped, donate_argnums=(0, 1)).lower(jnp.zeros(BIG), jnp.ones(BIG)).compile().as_text()
    copies = [f for f in hlo.loop_copies(text) if f.kind == "copy" and f.nbytes == 2 ** 21]
    assert copies and {f.shape for f in copies} == {"f32[64,256,32]"}


def test_run_if_updates_in_place_where_a_cond_may_copy():
    """A lax.cond around an in-place update makes JAX 0.10.2's XLA copy the whole buffer every step (0.11's
    elides that copy in this small case); run_if's while loops update it in place on both."""
    big, count = jnp.zeros(BIG), jnp.int32(0)
    with_cond = steps(lax.cond)
    with_run_if = steps(lambda pred, on_true, on_false, b: run_if(pred, on_true, run_if(~pred, on_false, b)))
    assert hlo.loop_copies(compiled_text(with_run_if, big, count), min_bytes=2 ** 20) == []
    for fn in (with_cond, with_run_if):  # same values either way
        out, _ = jax.jit(fn)(big, count)
        np.testing.assert_array_equal(np.asarray(out[:10, 0, 0]), [2, 1] * 5)


def test_a_layer_loop_over_stacked_weights_materializes_each_layer_on_cpu():
    """The CPU compiles a scan over `[L, H, H]` weights into a copy of each layer's slice (what the audit
    reports as "weights"); the GPU's answer is `benchmarks/hlo_audit.py`'s to give."""
    cpu = jax.devices("cpu")[0]
    weights, x = jax.device_put(jnp.ones((4, 512, 512)), cpu), jax.device_put(jnp.ones((3, 512)), cpu)

    @jax.jit
    def layers(weights, x):
        return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, weights)[0]

    found = hlo.loop_copies(layers.lower(weights, x).compile().as_text(), min_bytes=2 ** 20)
    assert [(f.kind, f.dims) for f in found] == [("slice", (512, 512))]
