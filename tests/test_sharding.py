"""Tensor/batch-parallel generation on 8 fake CPU devices gives the one-device tokens."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import specpv_jax as sj
from specpv_jax.sharding import make_mesh, param_specs
from test_eagle import make_head, make_target

HERE = pathlib.Path(__file__).resolve().parent


def _sharded_generate(*args: str) -> str:
    """Runs tests/sharded_generate.py with 8 fake CPU devices (a subprocess: the count is fixed at start-up)."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=str(HERE))
    proc = subprocess.run([sys.executable, str(HERE / "sharded_generate.py"), *args], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.rstrip().endswith("ok")
    return proc.stdout


def test_sharded_generate_matches_one_device():
    """exact on a 2x4 mesh; a tied target on 1x8; ar on the default mesh (2x4) with chunked prefill and streaming
    (every mode on every mesh and the Pallas kernel per shard: the slow test)."""
    out = _sharded_generate()
    assert [line for line in out.splitlines() if "same tokens" in line] == [
        "exact 2x4: same tokens", "loaded on 2x4: same tokens", "tied 1x8: same tokens",
        "ar on the default mesh (2x4): same tokens"]


@pytest.mark.slow
def test_sharded_generate_matches_one_device_on_every_mesh():
    """ar, eagle and exact on each of 1x8, 2x4 and 8x1; ar with the Pallas kernel per shard on 2x4."""
    assert _sharded_generate("--every-mesh").count("same tokens") == 13


def test_two_processes_load_generate_and_save_as_one(tmp_path):
    """A multi-controller job (`jax.distributed`, two processes of 4 CPU devices: two hosts' worth): HF load
    onto the default mesh (model within a host), an orbax draft, generate ar and exact with the one-process
    tokens, and one checkpoint saved by both that restores here equal."""
    import json
    import socket

    from convert.hf import export_hf

    target = make_target(32, layers=2, heads=8)  # 4 KV heads: 4 devices per host along model
    head = make_head(target)
    export_hf(tmp_path / "hf", target.cfg, target.params)
    sj.save_draft(head, tmp_path / "head")
    spec = dict(tree_depth=3, tree_top_k=3, tree_nodes=8, retrieval_tokens=64, window_tokens=32)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 32, n).tolist() for n in (200, 41, 150, 77)]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    for mode in ("ar", "exact"):
        out = sj.generate(target, prompts, 16, draft=None if mode == "ar" else head, mode=mode,
                          spec=sj.SpecConfig(**spec), eos_token_ids=(5,))
        np.save(tmp_path / f"tokens_{mode}.npy", out.tokens)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(HERE))
    logs = [tmp_path / f"process{i}.log" for i in (0, 1)]
    with logs[0].open("w") as out0, logs[1].open("w") as out1:
        procs = [subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py"), str(i), port, str(tmp_path)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT) for i, out in enumerate((out0, out1))]
        try:
            procs[0].wait(timeout=240)  # ~35 s; a process waiting on another's collective would wait forever
            procs[1].wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for p in procs:
            p.kill()
            p.wait()
    for i, (p, log) in enumerate(zip(procs, logs)):
        text = log.read_text()
        assert p.returncode == 0 and text.rstrip().endswith("ok"), f"process {i} ({p.returncode}):\n{text[-3000:]}"
    saved = sj.load_target(tmp_path / "saved")
    jax.tree.map(np.testing.assert_array_equal, saved.params, target.params)
    assert not list(tmp_path.glob(".saved*"))  # no partial directory left


def test_param_specs_split_whole_heads_and_mlp_where_the_mesh_divides():
    from types import SimpleNamespace

    target = make_target(16, layers=2)  # 4 query heads, 2 KV heads of 16
    mesh = make_mesh(devices=jax.devices()[:1])
    specs = param_specs(target.params, mesh, target.cfg)
    attn, mlp = specs["layers"]["self_attn"], specs["layers"]["mlp"]
    assert attn["q_proj"]["kernel"] == P(None, None, "model") and attn["o_proj"]["kernel"] == P(None, "model", None)
    assert attn["k_proj"]["kernel"] == P(None, None, "model")
    assert mlp["down_proj"]["kernel"] == P(None, "model", None) and specs["lm_head"]["kernel"] == P(None, "model")
    assert specs["embed_tokens"]["embedding"] == P("model", None)  # [V, H]: over the vocabulary, as the LM head
    # Four devices along "model" divide the K/V projections' 32 columns but not their 2 heads: split mid-head,
    # XLA re-split the cache along head_dim to match and gathered it back in every decode step.
    four = param_specs(target.params, SimpleNamespace(shape={"model": 4}), target.cfg)["layers"]
    assert four["self_attn"]["q_proj"]["kernel"] == P(None, None, "model")
    assert four["self_attn"]["k_proj"]["kernel"] == four["self_attn"]["v_proj"]["kernel"] == P(None, None, None)
    assert four["mlp"]["up_proj"]["kernel"] == P(None, None, "model")
    with pytest.raises(ValueError, match="a 3 x 1 mesh needs 3 devices, 1 given"):
        make_mesh(3, 1, devices=jax.devices()[:1])


def test_default_mesh_splits_whole_heads():
    from specpv_jax import presets
    from specpv_jax.sharding import default_shape

    llama = presets.model_config("llama-3.1-8b")  # 32 query heads, 8 KV heads
    assert [default_shape(n, llama) for n in (1, 2, 4, 6, 8, 16)] == [(1, 1), (1, 2), (1, 4), (3, 2), (1, 8), (2, 8)]
    small = make_target(16, heads=14, head_dim=8).cfg  # 14 query heads, 7 KV heads
    assert default_shape(8, small) == (8, 1) and default_shape(7, small) == (1, 7) and default_shape(8) == (1, 8)
    assert default_shape(16, llama, per_host=4) == (4, 4) and default_shape(12, llama, per_host=6) == (6, 2)


def test_generate_names_a_mesh_it_cannot_use():
    import numpy as np
    from jax.sharding import Mesh

    import specpv_jax as sj

    target = make_target(64, layers=2)
    devices = np.array(jax.devices()[:1]).reshape(1, 1)
    for mesh, message in [(jax.make_mesh((1, 1), ("data", "model")), r"of types \('Explicit', 'Explicit'\)"),
                          (Mesh(devices, ("batch", "tp")), r"axes \{'batch': 1, 'tp': 1\}"), ("2x4", "must be a"),
                          (Mesh(devices, ("model", "data")), r"needs axes \('data', 'model'\), in that order")]:
        with pytest.raises((ValueError, TypeError), match=message):
            sj.generate(target, [1, 2, 3], 4, mesh=mesh)
    one = make_mesh(devices=jax.devices()[:1])
    assert sj.generate(target, [1, 2, 3], 4, mesh=one, eos_token_ids=()).tokens.shape == (1, 4)


def test_a_model_axis_that_splits_kv_heads_is_named():
    """Qwen2.5-7B's 4 KV heads on a 1x8 mesh: the projections split mid-head, the cache cannot (it was
    replicated on all 8 devices, without a word)."""
    from types import SimpleNamespace

    from specpv_jax.sharding import unsplit_cache_note

    qwen = SimpleNamespace(num_heads=28, num_kv_heads=4)
    assert unsplit_cache_note(qwen, SimpleNamespace(shape={"data": 1, "model": 8}, size=8)) == (
        "a model axis of 8 does not divide the target's 4 KV heads: every device holds the whole target KV cache; "
        "a 2x4 mesh splits whole heads")
    assert unsplit_cache_note(qwen, SimpleNamespace(shape={"data": 2, "model": 4}, size=8)) is None
    # A small draft with 2 KV heads (Qwen2.5-0.5B's) under it.
    small = SimpleNamespace(num_heads=14, num_kv_heads=2)
    assert unsplit_cache_note(qwen, SimpleNamespace(shape={"data": 2, "model": 4}, size=8), small) == (
        "a model axis of 4 does not divide the draft's 2 KV heads: every device holds the whole draft KV cache; "
        "a 4x2 mesh splits whole heads")
    assert "the target's 4 and the draft's 2 KV heads: every device holds the whole target and draft KV caches; " \
        "a 4x2" in \
        unsplit_cache_note(qwen, SimpleNamespace(shape={"data": 1, "model": 8}, size=8), small)
    assert unsplit_cache_note(qwen, SimpleNamespace(shape={"data": 4, "model": 2}, size=8), small) is None
    # 3 KV heads on 8 devices: no model axis splits them (it suggested "a 8x1 mesh", which at batch 1 splits nothing)
    assert unsplit_cache_note(SimpleNamespace(num_heads=24, num_kv_heads=3),
                              SimpleNamespace(shape={"data": 1, "model": 8}, size=8)).endswith(
        "; no model axis over 8 devices does (8x1 splits the batch's rows alone; fewer devices, "
        "sharding.make_mesh(devices=...), can split the heads)")

