"""Run by tests/test_sharding.py in a subprocess with 8 fake CPU devices: sharded vs one-device tokens.

`--every-mesh`: ar, eagle and exact on every mesh and ar with the Pallas kernel per shard on 2x4 (the slow
test); by default exact on 2x4 and ar on the default mesh (2x4, chunked prefill, streaming).
"""

import dataclasses
import importlib
import pathlib
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from test_eagle import make_head, make_target
from test_memory import compiled_peak

import pallas_kernels
import specpv_jax as sj
from convert.hf import _to_param_on_device, export_hf
from specpv_jax import hlo, host, memory, sharding
from specpv_jax.cache import allocated_slots
from specpv_jax.generate import DEFAULT_PREFILL_CHUNK
from specpv_jax.prompts import bucket_length
from specpv_jax.model import init_params
from specpv_jax.sharding import make_mesh


def pallas_per_shard(one) -> None:
    """The Pallas kernel (interpret mode here) runs per shard on 2x4 (rows and heads split): XLA's tokens."""
    rng = np.random.default_rng(1)
    wide = make_target(32, layers=2, heads=8, head_dim=64)
    short = [rng.integers(0, 32, n).tolist() for n in (40, 17)]
    xla = sj.generate(wide, short, 8, mesh=one, eos_token_ids=(5,), attention="xla")
    kernel, seen = pallas_kernels.tree_attention, set()
    pallas_kernels.tree_attention = lambda q, *a, **k: seen.add(q.shape[::2]) or kernel(q, *a, **k)
    pallas = sj.generate(wide, short, 8, mesh=make_mesh(2, 4), eos_token_ids=(5,), attention="pallas")
    pallas_kernels.tree_attention = kernel
    np.testing.assert_array_equal(pallas.tokens, xla.tokens)
    assert seen == {(1, 2)}, seen  # (rows, query heads) of one shard: 2 rows / 2 data, 8 heads / 4 model
    print("pallas 2x4: same tokens", flush=True)


def tied_embedding_split(prompts, one) -> None:
    """A tied target's embedding, also its LM head, is split over the vocabulary on 1x8: one-device tokens."""
    cfg = dataclasses.replace(make_target(32, layers=2, heads=8).cfg, tie_word_embeddings=True)
    params = init_params(cfg, jax.random.key(3))
    params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"] * 40  # clear argmax margins
    expected = sj.generate(sj.Model(cfg, params), prompts, 16, mesh=one, eos_token_ids=(5,))
    placed = sj.Model(cfg, sharding.shard_params(params, make_mesh(1, 8), cfg))
    assert placed.params["embed_tokens"]["embedding"].addressable_shards[0].data.shape == (4, 64)
    with jax.transfer_guard("disallow"):
        out = sj.generate(placed, prompts, 16, eos_token_ids=(5,))
    np.testing.assert_array_equal(out.tokens, expected.tokens)
    print("tied 1x8: same tokens", flush=True)


def loaded_on_mesh(target, head, prompts, spec, expected) -> None:
    """load_target places each tensor on a mesh as it reads it (HF and orbax), load_draft follows the target's
    mesh, and generate runs where the target is, with the one-device tokens."""
    with tempfile.TemporaryDirectory() as tmp:
        hf, orbax, head_dir = (pathlib.Path(tmp, n) for n in ("hf", "orbax", "head"))
        export_hf(hf, target.cfg, target.params)
        sj.save_target(target, orbax)
        sj.save_draft(head, head_dir)
        by_default = sj.load_target(hf)
        assert sharding.mesh_of(by_default.params) == make_mesh(2, 4), "model: the most devices dividing 4 KV heads"
        for source in (hf, orbax):
            loaded = sj.load_target(source, mesh=make_mesh(2, 4))
            q = loaded.params["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, H, Hq*D]: 4 column blocks
            assert q.sharding.spec == P(None, None, "model") and q.addressable_shards[0].data.shape[-1] * 4 == \
                q.shape[-1], q.sharding
            draft = sj.load_draft(head_dir, loaded)
            assert sharding.mesh_of(draft.params) == make_mesh(2, 4)
            out = sj.generate(loaded, prompts, 24, draft=draft, mode="exact", spec=spec, eos_token_ids=(5,))
            assert out.stats["mesh"] == (2, 4), out.stats["mesh"]
            try:
                sj.generate(loaded, prompts, 24, draft=draft, mode="exact",
                            spec=dataclasses.replace(spec, offload=True))
                raise AssertionError("offload ran on 8 devices")
            except NotImplementedError as e:
                assert "runs on one device" in str(e), e
            np.testing.assert_array_equal(out.tokens, expected.tokens)
        call_mesh = importlib.import_module("specpv_jax.generate")._call_mesh  # its warnings without an 8-device run
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call_mesh(loaded, None, make_mesh(1, 8), spec)
        assert any("weights are on a 2x4 mesh and generate runs on a 1x8 mesh" in str(w.message) for w in caught)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call_mesh(target, None, make_mesh(2, 4), spec)  # weights from init_params: one device
        assert any("weights are not on a mesh and generate runs on a 2x4 mesh" in str(w.message) for w in caught)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call_mesh(loaded, head, None, spec)  # a draft loaded before its target was placed
        messages = [str(w.message) for w in caught]
        assert any(m.startswith("the draft's weights are not on a mesh and generate runs on a 2x4 mesh: they are "
                                "copied there on every call") for m in messages), messages
        assert any(m.startswith("a model axis of 4 does not divide the draft's 2 KV heads") for m in messages), \
            messages
        sj.save_target(loaded, pathlib.Path(tmp, "resaved"))  # from shards
        one = sj.load_target(pathlib.Path(tmp, "resaved"), mesh=make_mesh(devices=jax.devices()[:1]))
        assert sharding.mesh_of(one.params).size == 1
        jax.tree.map(np.testing.assert_array_equal, one.params, target.params)
    print("loaded on 2x4: same tokens", flush=True)


def accelerator_conversion_on_mesh() -> None:
    """The jitted conversion (GPU/TPU loading) places a param by its sharding and splits its inputs the same
    way: no device holds a whole tensor."""
    where = NamedSharding(make_mesh(2, 4), P(None, None, "model"))
    layers = [np.random.default_rng(i).standard_normal((64, 32)).astype(np.float32) for i in range(3)]
    convert = _to_param_on_device(where)
    value, _, _ = convert(layers, dtype=jnp.bfloat16, transpose=True, stacked=True)
    assert value.sharding == where, value.sharding
    np.testing.assert_array_equal(np.asarray(value), np.swapaxes(np.stack(layers), 1, 2).astype(jnp.bfloat16))
    inputs = convert.lower(layers, dtype=jnp.bfloat16, transpose=True, stacked=True).compile().input_shardings
    assert not any(s.is_fully_replicated for s in inputs[0][0]), inputs


def caches_created_in_shards() -> None:
    """`sharding.zeros` (generate's empty caches) allocates only each device's shard: on a mesh of small devices
    a whole cache need not fit on one first."""
    shape = (3, 4, 8, 512, 16)  # [L, B, Hkv, S, D]: rows split in 2, heads in 4
    where = sharding.cache_sharding(shape, make_mesh(2, 4))
    cache = sharding.zeros(shape, jnp.bfloat16, where)
    assert cache.sharding.is_equivalent_to(where, len(shape)) and not np.asarray(cache).any()
    memory = sharding.zeros.lower(shape, jnp.bfloat16, where).compile().memory_analysis()
    assert memory.output_size_in_bytes == cache.nbytes // 8, memory


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    target = make_target(32, layers=3, heads=8)
    head = make_head(target)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 32, n).tolist() for n in (300, 41, 260, 77, 300, 12, 150, 299)]
    spec = sj.SpecConfig(tree_depth=3, tree_top_k=3, tree_nodes=8, retrieval_tokens=64, window_tokens=32)
    one = make_mesh(devices=jax.devices()[:1])
    # every mode on every mesh with --every-mesh; else exact (which drafts as eagle does) on 2x4 (data and model
    # axes both split), and ar on the default mesh (2x4) at the end
    every = "--every-mesh" in sys.argv
    meshes = ((1, 8), (2, 4), (8, 1)) if every else ((2, 4),)
    expected = {}
    for mode in ("ar", "eagle", "exact") if every else ("ar", "exact"):
        draft = None if mode == "ar" else head
        expected[mode] = sj.generate(target, prompts, 24, draft=draft, mode=mode, spec=spec, mesh=one,
                                     eos_token_ids=(5,))
        for data, model in meshes if every or mode != "ar" else ():
            compiled = set(host._EXECUTABLES)
            with jax.transfer_guard("disallow"):  # generate places everything it moves explicitly
                out = sj.generate(target, prompts, 24, draft=draft, mode=mode, spec=spec,
                                  mesh=make_mesh(data, model), eos_token_ids=(5,))
            np.testing.assert_array_equal(out.lengths, expected[mode].lengths)
            np.testing.assert_array_equal(out.tokens, expected[mode].tokens)
            est = memory.estimate(target.cfg, 300, 24, len(prompts), mode, spec, "float32",
                                  None if draft is None else draft.cfg, mesh_shape=(data, model))
            bucket = bucket_length(300, DEFAULT_PREFILL_CHUNK)  # the longest prompt's
            slots = allocated_slots(memory.cache_length(spec, memory.loop_mode(spec, mode, bucket, 24), bucket, 24))
            for key in set(host._EXECUTABLES) - compiled:  # each stage's per-device peak within the estimate
                text = host._EXECUTABLES[key].as_text()
                assert compiled_peak(host._EXECUTABLES[key]) <= est.total, (mode, data, model, est.parts)
                # no cache gathered in a loop, the draft's included where "model" does not divide its 2 KV heads
                gathered = [f.shape for f in hlo.loop_copies(text) if f.kind == "all-gather" and slots in f.dims]
                assert not gathered, (mode, data, model, gathered)
            print(f"{mode} {data}x{model}: same tokens", flush=True)
    if every:
        pallas_per_shard(one)
    loaded_on_mesh(target, head, prompts, spec, expected["exact"])
    tied_embedding_split(prompts, one)
    accelerator_conversion_on_mesh()
    caches_created_in_shards()
    # More than one device and no mesh: sharded by default (2 x 4: 4 KV heads); chunked prefill and host callbacks
    # on it; the caller's own mesh in the context (other axes, Explicit) does not get in the way.
    streamed = []
    theirs = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(theirs), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        default = sj.generate(target, prompts, 24, prefill_chunk=64, progress=True, stream=streamed.append,
                              eos_token_ids=(5,))
    assert default.stats["mesh"] == (2, 4)
    # weights from init_params (one device): copied to the mesh on each call, which says so
    assert any("copied there on every call" in str(w.message) for w in caught), [str(w.message) for w in caught]
    np.testing.assert_array_equal(default.lengths, expected["ar"].lengths)
    np.testing.assert_array_equal(default.tokens, expected["ar"].tokens)
    for r, n in enumerate(default.lengths):
        np.testing.assert_array_equal(np.concatenate([s[r] for s in streamed]), default.tokens[r, :n])
    print("ar on the default mesh (2x4): same tokens")
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
