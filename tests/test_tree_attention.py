"""Pallas tree attention (interpret mode on CPU) against its dense jnp reference.

All three kernels run here, selected with `platform=`: the GPU (Triton) one in
Pallas interpret mode, the TPU (Mosaic) one in the TPU interpreter, and the
Hopper (Mosaic GPU) one in JAX's Mosaic GPU interpreter (see
mosaic_gpu_interpret.py). Each is also lowered for its chip; `pytest -m gpu`
runs the GPU kernels compiled.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pallas_kernels import merge_attention, tree_attention, tree_attention_reference
from pallas_kernels.tree_attention import cuda_capability, device_problem

BLOCK_K = 128  # tests use one block size; prefix lengths avoid its multiples
# Interpret mode copies the whole K/V arrays once per grid program; this caps that traffic per example.
COPY_BUDGET_BYTES = 1.5e9


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    T: int
    Hq: int
    Hkv: int
    D: int
    lens: tuple[int, ...]
    S: int
    num_splits: int | None
    seed: int


def ancestor_masks(rng, B, T):
    """Random trees from parent pointers (node i's parent is earlier, -1 = hangs off the prefix)."""
    masks = np.zeros((B, T, T), bool)
    for b in range(B):
        for i in range(T):
            parent = rng.integers(-1, i) if i else -1
            if parent >= 0:
                masks[b, i] = masks[b, parent]
            masks[b, i, i] = True
    return masks


def make_inputs(case: Case, dtype, garbage=1e4):
    """Random inputs; cache positions at or past cache_len hold `garbage`-scaled noise."""
    rng = np.random.default_rng(case.seed)
    B, T, Hq, Hkv, D, S = case.B, case.T, case.Hq, case.Hkv, case.D, case.S

    def normal(*shape, scale=1.0):
        return rng.standard_normal(shape).astype(np.float32) * scale

    valid = (np.arange(S)[None, :] < np.array(case.lens)[:, None])[:, None, :, None]
    k_cache = np.where(valid, normal(B, Hkv, S, D), normal(B, Hkv, S, D, scale=garbage))
    v_cache = np.where(valid, normal(B, Hkv, S, D), normal(B, Hkv, S, D, scale=garbage))
    q = normal(B, T, Hq, D, scale=rng.uniform(0.5, 3.0))  # sharper or flatter softmaxes
    arrays = dict(q=q, k_cache=k_cache, v_cache=v_cache, k_tree=normal(B, Hkv, T, D), v_tree=normal(B, Hkv, T, D))
    args = {k: jnp.asarray(v, dtype) for k, v in arrays.items()}
    args["cache_len"] = jnp.asarray(case.lens, jnp.int32)
    args["tree_mask"] = jnp.asarray(ancestor_masks(rng, B, T))
    return args


def call(fn, args, **kw):
    return fn(args["q"], args["k_cache"], args["v_cache"], args["cache_len"], args["k_tree"], args["v_tree"],
              args["tree_mask"], **kw)


def off_block(n):
    """Nudges a positive multiple of the block size off it."""
    return n + 1 if n and n % BLOCK_K == 0 else n


@st.composite
def cases(draw, itemsize):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 64))
    Hkv = draw(st.sampled_from([1, 2, 4, 8]))
    Hq = Hkv * draw(st.sampled_from([g for g in (1, 2, 4, 8) if Hkv * g <= 8]))
    D = draw(st.sampled_from([64, 128]))
    num_splits = draw(st.sampled_from([1, 2, 3]))
    row_blocks = -(-(Hq // Hkv * T) // 128)  # the kernel packs G*T rows into blocks of <= 128
    programs = B * Hkv * num_splits * row_blocks
    s_cap = int(min(5000, COPY_BUDGET_BYTES // (2 * B * Hkv * D * itemsize * programs)))
    longest = off_block(draw(st.integers(0, s_cap - 1)))
    lens = [longest] + [off_block(draw(st.integers(0, longest))) for _ in range(B - 1)]
    S = longest + draw(st.integers(0, 100))
    return Case(B, T, Hq, Hkv, D, tuple(draw(st.permutations(lens))), S, num_splits, draw(st.integers(0, 2**31)))


# Both kernels, by the platform that compiles them (ids name the kernel).
KERNELS = [pytest.param("gpu", id="triton"), pytest.param("tpu", id="mosaic")]


def kernel_options(platform, num_splits=None, block_k=BLOCK_K):
    """tree_attention keywords for `platform`; the TPU kernel has no splits."""
    options = dict(platform=platform, block_k=block_k, num_splits=None if platform == "tpu" else num_splits)
    if platform == "mosaic_gpu":  # it has no interpret mode of its own: see mosaic_gpu_interpret
        options["interpret"] = False
    return options


def check(case: Case, dtype, atol_out, atol_lse, *, scale=None, block_k=BLOCK_K, platform="gpu"):
    """Kernel (interpret mode on CPU) vs reference on random inputs for `case`."""
    args = make_inputs(case, dtype)
    out, lse = call(tree_attention, args, scale=scale, **kernel_options(platform, case.num_splits, block_k))
    ref_out, ref_lse = call(tree_attention_reference, args, scale=scale)
    assert out.dtype == args["q"].dtype and lse.dtype == jnp.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), rtol=0, atol=atol_out)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=1e-6, atol=atol_lse)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(cases(itemsize=4))
@example(Case(B=2, T=64, Hq=8, Hkv=2, D=128, lens=(4999, 1234), S=5060, num_splits=3, seed=7))
def test_matches_reference_fp32(case):
    check(case, jnp.float32, 2e-5, 2e-5)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(cases(itemsize=2))
def test_matches_reference_bf16(case):
    check(case, jnp.bfloat16, 2e-2, 1e-3)


@settings(max_examples=2, deadline=None, derandomize=True)
@given(cases(itemsize=4))
@example(Case(B=2, T=64, Hq=8, Hkv=2, D=128, lens=(4999, 1234), S=5060, num_splits=None, seed=7))
@example(Case(B=1, T=40, Hq=8, Hkv=1, D=64, lens=(700,), S=800, num_splits=None, seed=9))  # 2 row blocks
def test_tpu_kernel_matches_reference_fp32(case):
    check(case, jnp.float32, 2e-5, 2e-5, platform="tpu")


@settings(max_examples=2, deadline=None, derandomize=True)
@given(cases(itemsize=2))
def test_tpu_kernel_matches_reference_bf16(case):
    check(case, jnp.bfloat16, 2e-2, 1e-3, platform="tpu")


# A synchronization bug in a Mosaic GPU kernel can deadlock the interpreter's simulated threads: such a test
# must end (with every thread's stack printed), not hold CI until its limit.
INTERPRETER_DEADLINE = pytest.mark.timeout(600, method="thread")


def mosaic_gpu_case(case: Case) -> Case:
    """`case` with a buffer the Mosaic GPU kernel takes: whole 8-row TMA tiles, at least one key block."""
    return dataclasses.replace(case, S=max(-(-case.S // 8) * 8, BLOCK_K))


@INTERPRETER_DEADLINE
@settings(max_examples=4, deadline=None, derandomize=True)  # the interpreter is slow: the examples do the most
@given(cases(itemsize=2), st.sampled_from([64, 128]))
@example(Case(B=1, T=5, Hq=4, Hkv=4, D=64, lens=(130,), S=136, num_splits=2, seed=11), 64)  # last block moved back
@example(Case(B=3, T=1, Hq=32, Hkv=8, D=128, lens=(1600, 0, 77), S=1640, num_splits=None, seed=10), 128)  # decode
@example(Case(B=1, T=40, Hq=8, Hkv=1, D=64, lens=(700,), S=704, num_splits=None, seed=9), 64)  # 5 row blocks
@example(Case(B=2, T=13, Hq=10, Hkv=2, D=128, lens=(333, 64), S=400, num_splits=2, seed=12), 64)  # 2 warpgroups
def test_mosaic_gpu_kernel_matches_reference_bf16(case, block_k):
    """The Hopper kernel in the Mosaic GPU interpreter (simulated TMA, barriers, wgmma, shared memory)."""
    from mosaic_gpu_interpret import interpreted  # private JAX internals: imported here, not where GPU tests run

    with interpreted():
        check(mosaic_gpu_case(case), jnp.bfloat16, 2e-2, 1e-3, block_k=block_k, platform="mosaic_gpu")


@INTERPRETER_DEADLINE
@pytest.mark.parametrize("T", [3, 20], ids=["one-warpgroup", "two-warpgroups"])  # 12 or 80 packed rows
def test_mosaic_gpu_kernel_nan_past_cache_len_and_stacked_layer(T):
    from mosaic_gpu_interpret import interpreted

    with interpreted():
        check_nan_past_cache_len_and_stacked_layer("mosaic_gpu", T)


def test_decode_single_node_with_default_splits():
    case = Case(B=2, T=1, Hq=8, Hkv=2, D=128, lens=(1000, 3), S=1030, num_splits=None, seed=1)
    check(case, jnp.float32, 2e-5, 2e-5, block_k=64)


def test_custom_scale_and_full_buffer():
    case = Case(B=1, T=7, Hq=4, Hkv=4, D=64, lens=(300,), S=300, num_splits=2, seed=2)
    check(case, jnp.float32, 2e-5, 2e-5, scale=0.3)


@pytest.mark.parametrize("platform", KERNELS)
def test_no_prefix_at_all(platform):
    """cache_len 0 everywhere, and a zero-length buffer: only the tree is attended."""
    for S in (0, 50) if platform == "gpu" else (50,):  # no buffer at all never reaches either kernel
        case = Case(B=2, T=5, Hq=4, Hkv=2, D=64, lens=(0, 0), S=S, num_splits=None, seed=3)
        check(case, jnp.float32, 2e-5, 2e-5, platform=platform)


@pytest.mark.parametrize("platform", KERNELS)
def test_nan_past_cache_len_is_never_used(platform):
    """NaN / inf keys and values past cache_len change nothing (the TPU kernel reads whole blocks)."""
    case = Case(B=2, T=3, Hq=4, Hkv=2, D=64, lens=(130, 7), S=300, num_splits=2, seed=4)
    clean = make_inputs(case, jnp.float32, garbage=0.0)
    valid = (jnp.arange(case.S)[None, :] < clean["cache_len"][:, None])[:, None, :, None]
    poisoned = {**clean, "k_cache": jnp.where(valid, clean["k_cache"], jnp.nan),
                "v_cache": jnp.where(valid, clean["v_cache"], jnp.inf)}
    out, lse = call(tree_attention, poisoned, **kernel_options(platform, case.num_splits))
    ref_out, ref_lse = call(tree_attention_reference, clean)
    np.testing.assert_array_equal(call(tree_attention_reference, poisoned)[0], ref_out)  # the oracle, too
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=2e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-6, atol=2e-5)


@pytest.mark.parametrize("platform", KERNELS)
def test_stacked_cache_with_traced_layer(platform):
    case = Case(B=2, T=4, Hq=4, Hkv=2, D=64, lens=(200, 61), S=260, num_splits=2, seed=5)
    layers = [make_inputs(dataclasses.replace(case, seed=case.seed + i), jnp.float32) for i in range(3)]
    args = {**layers[0], "k_cache": jnp.stack([a["k_cache"] for a in layers]),
            "v_cache": jnp.stack([a["v_cache"] for a in layers])}

    @jax.jit
    def at_layer(layer):
        return call(tree_attention, args, layer=layer, **kernel_options(platform, case.num_splits))

    for layer in (2, 0):
        per_layer = {**args, "k_cache": layers[layer]["k_cache"], "v_cache": layers[layer]["v_cache"]}
        ref_out, ref_lse = call(tree_attention_reference, per_layer)
        out, lse = at_layer(jnp.int32(layer))
        np.testing.assert_allclose(out, ref_out, rtol=0, atol=2e-5)
        np.testing.assert_allclose(lse, ref_lse, rtol=1e-6, atol=2e-5)
        stacked_ref = call(tree_attention_reference, args, layer=layer)
        np.testing.assert_allclose(stacked_ref[0], ref_out, rtol=0, atol=1e-6)


def dense_attention(q, k, v):
    """q [N, D], k/v [K, D] -> out [N, D], lse [N]; fp64 numpy. An empty key set gives (0, -inf)."""
    if not len(k):
        return np.zeros_like(q), np.full(q.shape[0], -np.inf)
    s = q @ k.T
    lse = np.log(np.exp(s - s.max(1, keepdims=True)).sum(1)) + s.max(1)
    return np.exp(s - lse[:, None]) @ v, lse


def test_reference_matches_numpy_float64():
    """The oracle itself, per (row, query head), against a float64 softmax over the keys each node may see."""
    case = Case(B=2, T=6, Hq=4, Hkv=2, D=64, lens=(41, 0), S=50, num_splits=None, seed=8)
    a = {k: np.asarray(v) for k, v in make_inputs(case, jnp.float32).items()}
    out, lse = call(tree_attention_reference, {k: jnp.asarray(v) for k, v in a.items()})
    for b in range(case.B):
        for h in range(case.Hq):
            kv = h // (case.Hq // case.Hkv)
            n = a["cache_len"][b]
            for t in range(case.T):
                seen = a["tree_mask"][b, t]
                keys = np.concatenate([a["k_cache"][b, kv, :n], a["k_tree"][b, kv][seen]])
                vals = np.concatenate([a["v_cache"][b, kv, :n], a["v_tree"][b, kv][seen]])
                want_out, want_lse = dense_attention(a["q"][b, t, h][None] / np.sqrt(case.D), keys, vals)
                np.testing.assert_allclose(out[b, t, h], want_out[0], rtol=0, atol=1e-5)
                np.testing.assert_allclose(lse[b, t, h], want_lse[0], rtol=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------- merge_attention


@settings(max_examples=20, deadline=None, derandomize=True)
@given(n_a=st.integers(0, 40), n_b=st.integers(0, 40), seed=st.integers(0, 2**31))
def test_merge_attention_is_exact(n_a, n_b, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((6, 16))
    k, v = 3 * rng.standard_normal((n_a + n_b, 16)), rng.standard_normal((n_a + n_b, 16))
    parts = [dense_attention(q, k[sl], v[sl]) for sl in (slice(0, n_a), slice(n_a, None))]
    (out_a, lse_a), (out_b, lse_b) = [(jnp.asarray(o, jnp.float32), jnp.asarray(l, jnp.float32)) for o, l in parts]
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    want_out, want_lse = dense_attention(q, k, v)
    assert not np.isnan(np.asarray(out)).any() and not np.isnan(np.asarray(lse)).any()
    np.testing.assert_allclose(out, want_out, rtol=0, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=1e-5)


def test_merge_attention_empty_side_ignores_its_output():
    out_a, lse_a = jnp.ones((3, 8), jnp.bfloat16), jnp.array([0.5, -2.0, 7.0])
    out, lse = merge_attention(out_a, lse_a, jnp.full((3, 8), 123.0, jnp.bfloat16), jnp.full((3,), -jnp.inf))
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    np.testing.assert_array_equal(out, out_a)
    np.testing.assert_array_equal(lse, lse_a)
    out, lse = merge_attention(out_a, jnp.full((3,), -jnp.inf), out_a, jnp.full((3,), -jnp.inf))
    np.testing.assert_array_equal(out, 0)
    np.testing.assert_array_equal(lse, -np.inf)
    for garbage in (jnp.nan, jnp.inf):  # an empty side's output is never read, whatever it holds
        out, _ = merge_attention(out_a, lse_a, jnp.full((3, 8), garbage, jnp.bfloat16), jnp.full((3,), -jnp.inf))
        np.testing.assert_array_equal(out, out_a)
        nothing = jnp.full((3, 8), garbage, jnp.bfloat16)
        out, _ = merge_attention(nothing, jnp.full((3,), -jnp.inf), nothing, jnp.full((3,), -jnp.inf))
        np.testing.assert_array_equal(out, 0)


def test_merge_attention_names_mismatched_shapes():
    out, lse = jnp.ones((3, 8)), jnp.zeros((3,))
    for args in ((out, lse, out[:2], lse), (out, lse, out, lse[:2]), (out, lse[:2], out, lse[:2])):
        with pytest.raises(ValueError, match=r"out_a, out_b \[\.\.\., D\] and lse_a, lse_b \[\.\.\.\] of one shape"):
            merge_attention(*args)


# ----------------------------------------------------------------------------- errors and lowering


BASE = Case(B=2, T=3, Hq=4, Hkv=2, D=64, lens=(10, 20), S=32, num_splits=None, seed=0)


BAD_ARGUMENTS = {
    "q rank": (lambda a: {**a, "q": a["q"][0]}, r"q must be \[B, T, Hq, D\]"),
    "head dim": (lambda a: {**a, "q": jnp.zeros((2, 3, 4, 96))}, r"head dim D=96 .* supported: \(64, 128\)"),
    "gqa ratio": (lambda a: {**a, "q": jnp.zeros((2, 3, 3, 64))}, r"Hq=3 .* multiple of KV heads Hkv=2"),
    "cache batch": (lambda a: {**a, "k_cache": a["k_cache"][:1], "v_cache": a["v_cache"][:1]},
                    r"k_cache \(1, 2, 32, 64\) does not match q"),
    "k/v cache": (lambda a: {**a, "v_cache": a["v_cache"][:, :, :30]}, r"k_cache .* and v_cache .* same shape"),
    "k_tree": (lambda a: {**a, "k_tree": a["k_tree"][:, :, :2]}, r"k_tree must be \[B, Hkv, T, D\]"),
    "v_tree": (lambda a: {**a, "v_tree": a["v_tree"][:, :1]}, r"v_tree must be \[B, Hkv, T, D\]"),
    "mask shape": (lambda a: {**a, "tree_mask": a["tree_mask"][:, :2]}, r"tree_mask must be \[B, T, T\]"),
    "mask dtype": (lambda a: {**a, "tree_mask": a["tree_mask"].astype(jnp.int32)}, r"tree_mask must be bool"),
    "cache_len shape": (lambda a: {**a, "cache_len": a["cache_len"][:1]},
                        r"cache_len must be an integer array of shape \[B\]"),
    "cache_len dtype": (lambda a: {**a, "cache_len": a["cache_len"].astype(jnp.float32)},
                        r"cache_len must be an integer"),
    "cache_len list": (lambda a: {**a, "cache_len": [10, 20]}, r"cache_len must be an integer array .* got list"),
    "no rows": (lambda a: {k: v[:0] for k, v in a.items()}, r"q must have at least one row"),
    "cache dtype": (lambda a: {**a, "k_cache": a["k_cache"].astype(jnp.bfloat16)},
                    r"k_cache dtype bfloat16 must match q"),
    "q dtype": (lambda a: {**a, "q": a["q"].astype(jnp.int32)}, r"q dtype int32 is not supported"),
    "stacked without layer": (lambda a: {**a, "k_cache": a["k_cache"][None], "v_cache": a["v_cache"][None]},
                              r"layer="),
}


@pytest.mark.parametrize("mutate, message", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_name_the_problem(mutate, message):
    args = mutate(make_inputs(BASE, jnp.float32))
    for fn in (tree_attention, tree_attention_reference):
        with pytest.raises(ValueError, match=message):
            call(fn, args)


def test_bad_options_name_the_problem():
    args = make_inputs(BASE, jnp.float32)
    with pytest.raises(ValueError, match="layer= needs a stacked k_cache"):
        call(tree_attention, args, layer=0)
    with pytest.raises(ValueError, match="block_k must be a power of two >= 16"):
        call(tree_attention, args, block_k=48)
    for splits in (0, True):
        with pytest.raises(ValueError, match="num_splits must be >= 1"):
            call(tree_attention, args, num_splits=splits)
    with pytest.raises(ValueError, match="platform must be one of .*'cuda'"):
        call(tree_attention, args, platform="cuda")
    with pytest.raises(ValueError, match="block_k must be a power of two >= 128 on tpu, got 64"):
        call(tree_attention, args, platform="tpu", block_k=64)
    with pytest.raises(ValueError, match="applies to the GPU kernels only, got 2 on tpu"):
        call(tree_attention, args, platform="tpu", num_splits=2)
    with pytest.raises(ValueError, match="block_k must be a power of two >= 16 on gpu, got 64.0"):
        call(tree_attention, args, block_k=64.0)
    stacked = {**args, "k_cache": jnp.stack([args["k_cache"]] * 3), "v_cache": jnp.stack([args["v_cache"]] * 3)}
    for layer in (3, -1, jnp.int32(3)):
        for fn in (tree_attention, tree_attention_reference):
            with pytest.raises(ValueError, match=r"layer (3|-1) is outside the stacked cache's 3 layers"):
                call(fn, stacked, layer=layer)


@pytest.mark.parametrize("platform", KERNELS)
def test_traced_layer_out_of_range_is_clamped(platform):
    """A traced layer cannot be checked: past the stack it reads the last layer, below it the first, in the
    kernels and the reference alike (never outside the stack)."""
    case = dataclasses.replace(BASE, S=260, lens=(200, 61))
    layers = [make_inputs(dataclasses.replace(case, seed=i), jnp.float32) for i in range(3)]
    args = {**layers[0], "k_cache": jnp.stack([a["k_cache"] for a in layers]),
            "v_cache": jnp.stack([a["v_cache"] for a in layers])}
    for traced, nearest in ((5, 2), (-1, 0)):
        want = call(tree_attention_reference, args, layer=nearest)[0]
        for fn, options in ((tree_attention, kernel_options(platform)), (tree_attention_reference, {})):
            out = jax.jit(lambda layer: call(fn, args, layer=layer, **options)[0])(jnp.int32(traced))
            np.testing.assert_allclose(out, want, rtol=0, atol=2e-5)


def test_bad_mosaic_gpu_options_name_the_problem():
    args = {k: v.astype(jnp.bfloat16) if v.dtype == jnp.float32 else v
            for k, v in make_inputs(dataclasses.replace(BASE, S=64), jnp.float32).items()}
    with pytest.raises(ValueError, match="cannot interpret the Mosaic GPU kernel"):
        call(tree_attention, args, platform="mosaic_gpu", interpret=True)
    with pytest.raises(ValueError, match="takes bfloat16 or float16 caches, got float32"):
        call(tree_attention, make_inputs(BASE, jnp.float32), platform="mosaic_gpu", interpret=False)
    with pytest.raises(ValueError, match="block_k must be 64 or 128 .* got 256"):
        call(tree_attention, args, platform="mosaic_gpu", block_k=256, interpret=False)
    with pytest.raises(ValueError, match=r"multiple of 8 and >= block_k = 128, got S=64 \(k_cache \(2, 2, 64, 64\)"):
        call(tree_attention, args, platform="mosaic_gpu", block_k=128, interpret=False)
    short = {**args, "k_cache": args["k_cache"][:, :, :60], "v_cache": args["v_cache"][:, :, :60]}
    with pytest.raises(ValueError, match="multiple of 8 .* got S=60"):
        call(tree_attention, short, platform="mosaic_gpu", interpret=False)


def fake_gpu(capability: str, kind: str, platform_version: str = "cuda 12080"):
    """A stand-in for a `jax.Device` of a GPU (what `cuda_capability` reads)."""
    return types.SimpleNamespace(platform="gpu", client=types.SimpleNamespace(platform_version=platform_version),
                                 compute_capability=capability, device_kind=kind)


def test_kernels_name_a_gpu_they_cannot_run_on(monkeypatch):
    """Triton kernels need compute capability 8.0 (jaxlib refuses older GPUs when the kernel compiles), the
    Mosaic GPU kernel's wgmma Hopper: refused before tracing, naming the GPU; ROCm, TPU and CPU devices are
    not judged."""
    assert device_problem("gpu", fake_gpu("9.0", "NVIDIA H100 80GB HBM3")) is None
    assert device_problem("gpu", fake_gpu("8.0", "NVIDIA A100-SXM4-40GB")) is None
    assert device_problem("gpu", fake_gpu("10.0", "NVIDIA B200")) is None
    assert device_problem("mosaic_gpu", fake_gpu("9.0", "NVIDIA H200")) is None
    assert "compute capability 9.x (Hopper); NVIDIA B200 is 10.0" in device_problem("mosaic_gpu",
                                                                                    fake_gpu("10.0", "NVIDIA B200"))
    assert device_problem("gpu", fake_gpu("gfx90a", "AMD Instinct MI250X", "rocm 60300")) is None
    assert device_problem("gpu", jax.devices()[0]) is None and cuda_capability(jax.devices()[0]) is None
    assert cuda_capability(fake_gpu("7.5", "Tesla T4")) == (7, 5)
    assert device_problem("tpu", fake_gpu("7.5", "Tesla T4")) is None
    args, t4 = make_inputs(BASE, jnp.float16), fake_gpu("7.5", "Tesla T4")
    monkeypatch.setattr(jax, "devices", lambda *a: [t4])
    for platform in ("gpu", "mosaic_gpu"):
        with pytest.raises(ValueError, match=r"compute capability (8\.0 or newer|9\.x \(Hopper\)); Tesla T4 is 7\.5"):
            call(tree_attention, args, platform=platform, interpret=False)
    call(tree_attention, args, platform="gpu", interpret=True)  # the interpreter runs anywhere


LLAMA8B = dict(Hq=32, Hkv=8, D=128)
TRITON_DEPRECATION = "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"  # jax >= 0.11


# Lowering for a platform that is not attached reads the target chip from an abstract mesh (jax >= 0.11 needs
# it for GPU; the TPU lowering always does). The custom call each kernel must lower to, by platform:
LOWERING_TARGETS = {
    "gpu": ("cuda", jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"),
            "__gpu$xla.gpu.triton"),
    "tpu": ("tpu", jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu"),
            "tpu_custom_call"),
}
LOWERING_TARGETS["mosaic_gpu"] = (*LOWERING_TARGETS["gpu"][:2], "mosaic_gpu_v2")


@pytest.mark.filterwarnings(TRITON_DEPRECATION)
@pytest.mark.parametrize("platform", [*KERNELS, pytest.param("mosaic_gpu", id="mosaic_gpu")])
@pytest.mark.parametrize("T, stacked", [(1, False), (16, True), (60, False), (512, True)])  # 512: a prefill chunk
def test_lowers_for_the_accelerator(T, stacked, platform):
    """No accelerator needed: the compiled (non-interpret) kernel must lower to its custom call (Triton or
    Mosaic GPU on GPU, Mosaic on TPU). This checks the Pallas lowering rules (for Mosaic GPU, which generates
    the whole kernel in Python, also its layouts, TMA and wgmma shapes), not the chip's own compiler."""
    B, dt = 1, jnp.bfloat16
    S = 4096 + (24 if platform == "mosaic_gpu" else 17)  # Mosaic GPU's TMA reads the cache in tiles of 8 rows
    cache = (3, B, LLAMA8B["Hkv"], S, LLAMA8B["D"]) if stacked else (B, LLAMA8B["Hkv"], S, LLAMA8B["D"])
    sds = jax.ShapeDtypeStruct
    shapes = (sds((B, T, LLAMA8B["Hq"], LLAMA8B["D"]), dt), sds(cache, dt), sds(cache, dt), sds((B,), jnp.int32),
              sds((B, LLAMA8B["Hkv"], T, LLAMA8B["D"]), dt), sds((B, LLAMA8B["Hkv"], T, LLAMA8B["D"]), dt),
              sds((B, T, T), jnp.bool_))

    def fn(*a):
        return tree_attention(*a, layer=jnp.int32(1) if stacked else None, platform=platform, interpret=False)

    assert LOWERING_TARGETS[platform][2] in lower_for(platform, fn, shapes)


def lower_for(platform, fn, shapes) -> str:
    """StableHLO text of jit(fn) lowered for `platform`'s chip (which need not be attached)."""
    lowering_platform, device, _ = LOWERING_TARGETS[platform]
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        return jax.jit(fn).trace(*shapes).lower(lowering_platforms=(lowering_platform,)).as_text()


@pytest.mark.parametrize("D, block_k, dtype", [(64, 64, jnp.float16), (64, 128, jnp.bfloat16),
                                               (128, 128, jnp.float16)])
def test_mosaic_gpu_lowers_for_each_head_dim_and_block(D, block_k, dtype):
    B, T, Hq, Hkv, S = 2, 7, 12, 4, 1000
    sds = jax.ShapeDtypeStruct
    shapes = (sds((B, T, Hq, D), dtype), sds((B, Hkv, S, D), dtype), sds((B, Hkv, S, D), dtype),
              sds((B,), jnp.int32), sds((B, Hkv, T, D), dtype), sds((B, Hkv, T, D), dtype), sds((B, T, T), jnp.bool_))
    fn = functools.partial(tree_attention, platform="mosaic_gpu", block_k=block_k, num_splits=3, interpret=False)
    assert "mosaic_gpu_v2" in lower_for("mosaic_gpu", fn, shapes)


GPU_KERNELS = [pytest.param("gpu", id="triton"), pytest.param("mosaic_gpu", id="mosaic_gpu")]
GPU_CASES = [  # S a multiple of 8 (Mosaic GPU's TMA tiles), lengths not multiples of either block size
    Case(B=1, T=16, lens=(16 * 1024 - 37,), S=16 * 1024, num_splits=None, seed=6, **LLAMA8B),
    Case(B=3, T=1, lens=(16000, 0, 77), S=16384, num_splits=None, seed=10, **LLAMA8B),  # decode, an empty row
    Case(B=2, T=64, Hq=8, Hkv=2, D=128, lens=(4999, 1234), S=5064, num_splits=3, seed=7),
    Case(B=1, T=40, Hq=8, Hkv=1, D=64, lens=(700,), S=704, num_splits=None, seed=9),  # 320 rows: 5 row blocks
    Case(B=1, T=5, Hq=4, Hkv=4, D=64, lens=(130,), S=136, num_splits=2, seed=11),  # last block moved back
]


@pytest.mark.gpu
@pytest.mark.filterwarnings(TRITON_DEPRECATION)
@pytest.mark.parametrize("platform", GPU_KERNELS)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"T{c.T}-S{c.S}-D{c.D}")
def test_compiled_bf16(case, platform):
    check(case, jnp.bfloat16, 2e-2, 1e-3, platform=platform)


@pytest.mark.gpu
@pytest.mark.filterwarnings(TRITON_DEPRECATION)
@pytest.mark.parametrize("case", GPU_CASES[:3], ids=lambda c: f"T{c.T}-S{c.S}-D{c.D}")
def test_compiled_fp32_triton(case):
    """float32 caches through the Triton kernel at its default key block, as attention="pallas" runs float32
    weights ("auto" keeps them on XLA: this had not run on a GPU, whose shared memory a float32 tile may
    overfill)."""
    check(case, jnp.float32, 1e-4, 1e-4, block_k=None)


@pytest.mark.gpu
@pytest.mark.filterwarnings(TRITON_DEPRECATION)
@pytest.mark.parametrize("platform", GPU_KERNELS)
@pytest.mark.parametrize("T", [3, 20])
def test_compiled_nan_past_cache_len_and_stacked_layer(platform, T):
    check_nan_past_cache_len_and_stacked_layer(platform, T)


def check_nan_past_cache_len_and_stacked_layer(platform, T):
    """bf16, layer 1 of a stacked cache holding NaN keys and inf values past cache_len; T tree nodes."""
    case = Case(B=2, T=T, Hq=8, Hkv=2, D=64, lens=(130, 7), S=200, num_splits=2, seed=4)
    layers = [make_inputs(dataclasses.replace(case, seed=case.seed + i), jnp.bfloat16, garbage=0.0)
              for i in range(2)]
    valid = (jnp.arange(case.S)[None, :] < layers[0]["cache_len"][:, None])[:, None, :, None]
    poison = {"k_cache": jnp.nan, "v_cache": jnp.inf}
    stacked = {**layers[0], **{name: jnp.stack([jnp.where(valid, a[name], poison[name]) for a in layers])
                               for name in poison}}
    out, lse = call(tree_attention, stacked, layer=jnp.int32(1), **kernel_options(platform, case.num_splits, 64))
    ref_out, ref_lse = call(tree_attention_reference, {**layers[0], "k_cache": layers[1]["k_cache"],
                                                       "v_cache": layers[1]["v_cache"]})
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), rtol=0, atol=2e-2)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-3)
