"""Every generate mode lowers for the accelerators with its Pallas kernel in place, on a CPU-only machine.

`test_tree_attention.py` lowers the kernel alone; here the whole jitted
program (`make_generate_fn`: prefill, the decode `while_loop`, the verification
branches, the layer `scan` that hands the kernel a traced layer index) is
lowered for CUDA and TPU, as `attention="auto"` picks the kernel there. Nothing
is compiled or run: this catches what only those platforms' lowering rules
reject, not the chips' own compilers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from test_tree_attention import LOWERING_TARGETS, TRITON_DEPRECATION

import specpv_jax as sj
from specpv_jax import model as M
from specpv_jax.config import DraftConfig, LongSpecConfig, ModelConfig
from specpv_jax.draft import eagle3
from specpv_jax.draft import longspec as L

# Head dim 64: the kernels' smallest. Hq 8 over Hkv 2 (GQA), two layers, a vocabulary of 512.
TARGET = ModelConfig(arch="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                     num_heads=8, num_kv_heads=2, head_dim=64, max_position_embeddings=8192)
SPEC = sj.SpecConfig(tree_depth=3, tree_top_k=3, tree_nodes=8, sink_tokens=32, retrieval_tokens=256,
                     window_tokens=64, chunk_tokens=32, draft_chunks=4)
PROMPT = 1024  # above SpecPV's partial threshold (352 tokens), so its partial branch is live
MODES = ("ar", "eagle", "specpv", "exact", "specextend", "longspec")


def abstract(init, *args):
    return jax.eval_shape(lambda: init(*args))


def draft_for(mode: str):
    """(draft_cfg, draft_params as shapes) for `mode`."""
    key = jax.random.key(0)
    if mode == "ar":
        return None, None
    if mode == "specextend":
        cfg = dataclasses.replace(TARGET, num_layers=1)
        return cfg, {"params": abstract(M.init_params, cfg, key, jnp.bfloat16)}
    if mode == "longspec":
        cfg = LongSpecConfig.for_target(TARGET, window=64)
        return cfg, {"params": abstract(L.init_params, cfg, key, jnp.bfloat16)}
    cfg = DraftConfig(hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=2, head_dim=64,
                      vocab_size=512, draft_vocab_size=256, target_hidden_size=256,
                      feature_layers=DraftConfig.default_feature_layers(TARGET.num_layers))
    return cfg, {"params": abstract(eagle3.init_params, cfg, key, jnp.bfloat16),
                 "d2t": jax.ShapeDtypeStruct((256,), jnp.int32)}


def lowered(platform: str, mode: str, mesh_shape=(1, 1)) -> str:
    """StableHLO of `make_generate_fn(mode)` lowered for `platform`'s chip over a `(data, model)` mesh."""
    lowering_platform, device, _ = LOWERING_TARGETS[platform]
    draft_cfg, draft_params = draft_for(mode)
    fn = sj.make_generate_fn(TARGET, SPEC, mode=mode, draft_cfg=draft_cfg, max_new_tokens=32, eos_token_ids=(),
                             prefill_chunk=256, attention="pallas")
    params = abstract(M.init_params, TARGET, jax.random.key(1), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2, PROMPT), jnp.int32)
    key = jax.random.key(0)  # outside the mesh: under an abstract mesh JAX 0.11 runs no eager op
    mesh = jax.sharding.AbstractMesh(mesh_shape, ("data", "model"), abstract_device=device,
                                     axis_types=(jax.sharding.AxisType.Auto,) * 2)  # as `sharding.make_mesh`'s
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(params, draft_params, ids, key).lower(
            lowering_platforms=(lowering_platform,)).as_text()


@pytest.fixture
def on(monkeypatch):
    """Makes the kernels take `platform`'s defaults (compiled, not interpreted), as when running there."""
    def pretend(platform: str) -> str:
        monkeypatch.setattr(jax, "default_backend", lambda: platform)
        return platform
    return pretend


# Kernel calls in each mode's program: prefill and the decode loop's verification; SpecPV's loop verifies
# against the partial and the full cache, the latter in a branch per re-feed size (`specpv.refeed_sizes`:
# exact mode has one more); SpecExtend's draft model drafts with it too (its prefill, through a sliding
# window, takes the XLA path: the kernel has no window).
KERNEL_CALLS = {"ar": 2, "eagle": 2, "specpv": 4, "exact": 5, "specextend": 3, "longspec": 2}


@pytest.mark.filterwarnings(TRITON_DEPRECATION)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_generate_lowers_with_the_kernel(on, platform, mode):
    assert lowered(on(platform), mode).count(LOWERING_TARGETS[platform][2]) == KERNEL_CALLS[mode]


@pytest.mark.filterwarnings(TRITON_DEPRECATION)
@pytest.mark.parametrize("mode", ["eagle", "specpv"])
def test_sharded_generate_lowers_with_the_kernel_per_shard(on, mode):
    """On a 2x4 GPU mesh the kernel runs under `shard_map` (XLA cannot partition its custom call)."""
    text = lowered(on("gpu"), mode, mesh_shape=(2, 4))
    assert "__gpu$xla.gpu.triton" in text and "sdy.manual_computation" in text
