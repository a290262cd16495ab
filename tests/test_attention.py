"""The model's attention paths: blockwise XLA vs a dense oracle, and the Pallas dispatch in generate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specpv_jax as sj
from specpv_jax import attention
from specpv_jax.attention import attend, attend_dense, causal_mask, resolve_implementation
from test_eagle import make_head, make_target


@pytest.mark.parametrize("t, lens, stacked, s", [(1, (0, 700), False, 1024), (5, (256, 3), True, 1024),
                                                 (64, (513, 1000), True, 1024),
                                                 (3, (1270, 1100), True, 1280)])
@pytest.mark.parametrize("block", [None, 256, 512], ids=["one-block", "256-key-blocks", "512-key-blocks"])
def test_blockwise_prefix_equals_dense(monkeypatch, t, lens, stacked, s, block):
    """Also with the prefix read in several blocks (at s = 1280, 512-key blocks: the last one starts at 768 and
    overlaps the one before)."""
    rng = np.random.default_rng(t)
    b, hq, hkv, d = 2, 4, 2, 16
    if block is not None:
        monkeypatch.setattr(attention, "SCORE_TILE", block * t * hq // hkv)
        assert attention.read_block(s, t * hq // hkv) == block
    q = jnp.asarray(rng.standard_normal((b, t, hq, d)), jnp.float32)
    kc, vc = (jnp.asarray(rng.standard_normal((b, hkv, s, d)), jnp.float32) for _ in range(2))
    kn, vn = (jnp.asarray(rng.standard_normal((b, hkv, t, d)), jnp.float32) for _ in range(2))
    lens = jnp.asarray(lens, jnp.int32)
    mask = causal_mask(b, t)
    want = attend_dense(q, kc, vc, lens, kn, vn, mask, 0.25)
    if stacked:  # the model's layout: [L, B, Hkv, S, D] read at a layer
        got = attend(q, jnp.stack([kc * 0, kc]), jnp.stack([vc * 0, vc]), lens, kn, vn, mask, 0.25, layer=1)
    else:
        got = attend(q, kc, vc, lens, kn, vn, mask, 0.25)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


@pytest.mark.parametrize("block", [None, 256], ids=["one-block", "256-key-blocks"])
def test_a_window_over_the_prefix_equals_dense(monkeypatch, block):
    """`prefix_from` (a sliding window) per query, read in blocks: blocks before every query's window are
    skipped, later ones masked per query."""
    rng = np.random.default_rng(7)
    b, t, hq, hkv, d, s = 2, 3, 4, 2, 16, 1024
    if block is not None:
        monkeypatch.setattr(attention, "SCORE_TILE", block * t * hq // hkv)
    q = jnp.asarray(rng.standard_normal((b, t, hq, d)), jnp.float32)
    kc, vc = (jnp.asarray(rng.standard_normal((b, hkv, s, d)), jnp.float32) for _ in range(2))
    kn, vn = (jnp.asarray(rng.standard_normal((b, hkv, t, d)), jnp.float32) for _ in range(2))
    lens = jnp.asarray([900, 300], jnp.int32)
    prefix_from = jnp.asarray([[600, 601, 850], [280, 290, 300]], jnp.int32)
    mask = causal_mask(b, t)
    want = attend_dense(q, kc, vc, lens, kn, vn, mask, 0.25, prefix_from)
    got = attend(q, kc, vc, lens, kn, vn, mask, 0.25, prefix_from=prefix_from)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    assert not np.allclose(np.asarray(got), np.asarray(attend_dense(q, kc, vc, lens, kn, vn, mask, 0.25)), atol=1e-3)


def test_a_prefix_read_in_one_step_runs_no_loop(monkeypatch):
    """Decode (and any call whose prefix buffer fits one step) compiles to no loop: a loop whose trip count is
    known only at run time costs a GPU a host round trip per trip. Rows with no prefix yet, even with NaN in
    the stale slots, get plain attention over the new tokens; a buffer read in several steps keeps its loop."""
    rng = np.random.default_rng(3)
    b, t, hq, hkv, d, s = 2, 1, 4, 2, 16, 1024
    q = jnp.asarray(rng.standard_normal((b, t, hq, d)), jnp.float32)
    kn, vn = (jnp.asarray(rng.standard_normal((b, hkv, t, d)), jnp.float32) for _ in range(2))
    stale = jnp.full((b, hkv, s, d), jnp.nan)
    empty = jnp.zeros((b,), jnp.int32)

    def compiled():
        return jax.jit(lambda kc, vc, lens: attend(q, kc, vc, lens, kn, vn, causal_mask(b, t), 0.25)).lower(
            stale, stale, empty).compile()

    assert attention.read_block(s, t * hq // hkv) == s
    one_step = compiled()
    assert " while(" not in one_step.as_text()
    np.testing.assert_allclose(np.asarray(one_step(stale, stale, empty)),
                               np.asarray(attend(q, None, None, None, kn, vn, causal_mask(b, t), 0.25)), atol=2e-6)
    monkeypatch.setattr(attention, "SCORE_TILE", 256 * t * hq // hkv)
    assert " while(" in compiled().as_text()


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_stale_slots_past_cache_len_are_never_used(impl):
    """NaN / inf past a row's length (a rolled-back step's scratch) change nothing, also in a row with no prefix
    at all; and a zero-length buffer is plain attention over the new tokens."""
    rng = np.random.default_rng(0)
    b, t, hq, hkv, d, s = 2, 3, 4, 2, 64, 300
    q, kc, vc = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in
                 ((b, t, hq, d), (b, hkv, s, d), (b, hkv, s, d)))
    kn, vn = (jnp.asarray(rng.standard_normal((b, hkv, t, d)), jnp.float32) for _ in range(2))
    lens, mask = jnp.asarray([0, 130], jnp.int32), causal_mask(b, t)
    valid = (jnp.arange(s)[None, :] < lens[:, None])[:, None, :, None]
    want = attend_dense(q, kc, vc, lens, kn, vn, mask, 0.125)
    kc, vc = jnp.where(valid, kc, jnp.nan), jnp.where(valid, vc, jnp.inf)
    np.testing.assert_array_equal(attend_dense(q, kc, vc, lens, kn, vn, mask, 0.125), want)  # the oracle, too
    got = attend(q, kc, vc, lens, kn, vn, mask, 0.125, impl=impl)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    empty = jnp.zeros((b, hkv, 0, d))
    got = attend(q, empty, empty, jnp.zeros((b,), jnp.int32), kn, vn, mask, 0.125, impl=impl)
    np.testing.assert_allclose(np.asarray(got), np.asarray(attend(q, None, None, None, kn, vn, mask, 0.125)),
                               atol=2e-5)


def test_read_block_fits_the_tile_in_equal_blocks():
    tile, unit = attention.SCORE_TILE, attention.PREFIX_BLOCK
    assert attention.read_block(16640, 4) == 16640  # decode: the whole buffer in one step
    assert attention.read_block(16640, 2048) == 1024  # a 512-token prefill chunk x a GQA group of 4
    for size, rows in [(16640, 244), (65792, 244), (4352, 28), (1280, 640), (300, 5000), (1000, 700)]:
        block = attention.read_block(size, rows)
        widest = max(unit, tile // rows // unit * unit)  # the most keys a step may score
        steps = -(-size // block)
        assert block <= widest and (block % unit == 0 or block == size)
        assert (steps - 1) * widest < size  # no step more than the tile needs


def test_implementation_names():
    from pallas_kernels.tree_attention import cuda_capability

    assert resolve_implementation("auto") == ("pallas" if (cuda_capability() or (0, 0)) >= (8, 0) else "xla")
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        resolve_implementation("flash")


def test_auto_takes_the_kernel_only_on_a_gpu_it_runs_on(monkeypatch):
    """"auto": the Triton kernel for 16-bit weights on NVIDIA GPUs of compute capability 8.0 and up, XLA on
    older ones (jaxlib's Triton refuses them when the kernel compiles: free Colab's T4) and on ROCm GPUs
    (where the kernel has not run); "pallas" on a T4 is refused by generate before anything is compiled."""
    from test_tree_attention import fake_gpu

    target = make_target(16, seed=0)
    gpus = {"t4": fake_gpu("7.5", "Tesla T4"), "a100": fake_gpu("8.0", "NVIDIA A100-SXM4-40GB"),
            "h100": fake_gpu("9.0", "NVIDIA H100 80GB HBM3"), "mi250": fake_gpu("gfx90a", "MI250X", "rocm 60300")}
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    picks = {}
    for name, device in gpus.items():
        monkeypatch.setattr(jax, "devices", lambda *a, device=device: [device])
        picks[name] = resolve_implementation("auto")
        if name != "t4":
            assert resolve_implementation("pallas") == "pallas"
        assert resolve_implementation("xla") == "xla"
    assert picks == {"t4": "xla", "a100": "pallas", "h100": "pallas", "mi250": "xla"}
    # the kernel has run compiled in bfloat16 only: float32 weights stay on XLA unless "pallas" is asked for
    monkeypatch.setattr(jax, "devices", lambda *a: [gpus["h100"]])
    assert [resolve_implementation("auto", dtype) for dtype in ("bfloat16", jnp.float16, "float32")] == [
        "pallas", "pallas", "xla"]
    assert resolve_implementation("pallas", "float32") == "pallas"
    monkeypatch.setattr(jax, "devices", lambda *a: [gpus["t4"]])
    with pytest.raises(ValueError, match=r"Triton tree-attention kernel needs .* 8\.0 or newer; Tesla T4 is 7\.5"):
        sj.generate(target, [1, 2, 3], 4, attention="pallas")


def test_pallas_dispatch_generates_the_same_tokens(monkeypatch):
    """generate(attention="pallas") runs the tree-attention kernel (interpret mode on CPU), given a mesh inside
    shard_map: the kernel call sees the mesh in its context."""
    import pallas_kernels
    from specpv_jax.sharding import make_mesh

    meshes_seen = []
    kernel = pallas_kernels.tree_attention

    def recorded(*a, **k):
        meshes_seen.append(jax.sharding.get_abstract_mesh().axis_names)
        return kernel(*a, **k)

    monkeypatch.setattr(pallas_kernels, "tree_attention", recorded)
    target = make_target(32, seed=7, layers=7, heads=2, head_dim=64)
    head = make_head(target, seed=8)
    prompt = np.random.default_rng(3).integers(0, 32, 300)
    spec = sj.SpecConfig(tree_depth=2, tree_top_k=2, tree_nodes=3)
    xla = sj.generate(target, prompt, 6, draft=head, mode="eagle", spec=spec, eos_token_ids=(), attention="xla")
    pallas = sj.generate(target, prompt, 6, draft=head, mode="eagle", spec=spec, eos_token_ids=(),
                         attention="pallas", mesh=make_mesh(devices=jax.devices()[:1]))
    np.testing.assert_array_equal(pallas.tokens, xla.tokens)
    # prefill, decode and verification went through the kernel, each per shard of the ("data", "model") mesh
    assert meshes_seen and set(meshes_seen) == {("data", "model")}


def test_pallas_kernel_runs_per_shard_under_a_context_mesh():
    """Under `jax.set_mesh` the kernel is wrapped in shard_map (XLA would gather a custom call's operands)."""
    from specpv_jax.sharding import make_mesh

    rng = np.random.default_rng(0)
    b, t, hq, hkv, d, s = 2, 3, 4, 2, 64, 300
    q = jnp.asarray(rng.standard_normal((b, t, hq, d)), jnp.float32)
    kc, vc = (jnp.asarray(rng.standard_normal((2, b, hkv, s, d)), jnp.float32) for _ in range(2))
    kn, vn = (jnp.asarray(rng.standard_normal((b, hkv, t, d)), jnp.float32) for _ in range(2))
    lens, mask = jnp.asarray([290, 17], jnp.int32), causal_mask(b, t)

    def fn(impl):
        return lambda layer: attend(q, kc, vc, lens, kn, vn, mask, 0.125, layer=layer, impl=impl)

    want = jax.jit(fn("xla"))(jnp.int32(1))
    assert "shard_map" not in str(jax.make_jaxpr(fn("pallas"))(jnp.int32(1)))
    with jax.set_mesh(make_mesh(devices=jax.devices()[:1])):
        assert "shard_map" in str(jax.make_jaxpr(fn("pallas"))(jnp.int32(1)))
        got = jax.jit(fn("pallas"))(jnp.int32(1))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
