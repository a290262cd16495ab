"""Shared fixtures: tiny random Hugging Face models saved with `save_pretrained`."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import pathlib

import jax
import pytest

importlib.import_module("specpv_jax")  # before JAX starts: it sets XLA:CPU flags (specpv_jax/xla_cpu.py)

# fp32 parity needs full-precision matmuls on GPUs too (no TF32).
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    accelerator = jax.default_backend() in ("gpu", "tpu")
    for item in items:
        if "hf_model" in item.fixturenames:  # builds its models with transformers' PyTorch classes
            item.add_marker(pytest.mark.torch)
        if not accelerator and item.get_closest_marker("gpu"):  # the marker, not a keyword: an id may say "gpu"
            item.add_marker(pytest.mark.skip(reason="needs a GPU or TPU"))


TRANSFORMERS_5 = int(importlib.metadata.version("transformers").split(".")[0]) >= 5
# Tests of what transformers 5 does with configs (rope_parameters); pyproject allows transformers 4.56 too.
needs_transformers_5 = pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 5's config layout")


@dataclasses.dataclass(frozen=True)
class HFSpec:
    """A tiny HF model: architecture plus config overrides."""

    name: str
    arch: str  # llama | qwen2 | qwen3
    heads: int = 4
    kv_heads: int = 2
    head_dim: int | None = None
    tie: bool = False
    rope: tuple = ()  # rope_parameters items beyond theta
    extra: tuple = ()  # other config fields

    def config(self):
        import transformers

        cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "qwen3": transformers.Qwen3Config}[self.arch]
        kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=self.heads,
                  num_key_value_heads=self.kv_heads, vocab_size=160, max_position_embeddings=2048,
                  initializer_range=0.15, tie_word_embeddings=self.tie, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, rms_norm_eps=1e-5)
        kw["head_dim"] = self.head_dim or 64 // self.heads
        kw["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "default", **dict(self.rope)}
        if not TRANSFORMERS_5:  # transformers 4 keeps rope_parameters as an unknown field: rope_theta + rope_scaling
            rope = kw.pop("rope_parameters")
            kw["rope_theta"] = rope.pop("rope_theta")
            kw["rope_scaling"] = rope if rope["rope_type"] != "default" else None
        kw.update(dict(self.extra))
        return cls(**kw)


LLAMA3_ROPE = (("rope_type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
               ("original_max_position_embeddings", 64))
YARN_ROPE = (("rope_type", "yarn"), ("factor", 4.0), ("original_max_position_embeddings", 64))

HF_SPECS = {
    s.name: s for s in [
        HFSpec("llama-mha", "llama", heads=4, kv_heads=4),
        HFSpec("llama-gqa2-tied-llama3", "llama", heads=4, kv_heads=2, tie=True, rope=LLAMA3_ROPE),
        HFSpec("llama-gqa4-yarn-bias", "llama", heads=8, kv_heads=2, rope=YARN_ROPE,
               extra=(("attention_bias", True),)),
        HFSpec("qwen2-gqa2-tied", "qwen2", heads=4, kv_heads=2, tie=True),
        HFSpec("qwen2-gqa4-yarn", "qwen2", heads=8, kv_heads=2, rope=YARN_ROPE),
        HFSpec("qwen3-gqa4-headdim", "qwen3", heads=4, kv_heads=1, head_dim=32),
        HFSpec("qwen3-gqa2-tied-yarn", "qwen3", heads=4, kv_heads=2, tie=True, rope=YARN_ROPE),
    ]
}


def save_hf_model(spec: HFSpec, directory: pathlib.Path, seed: int = 0):
    """Builds a random HF model for `spec`, saves it, returns the torch model (eval mode)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "qwen3": transformers.Qwen3ForCausalLM}[spec.arch]
    model = cls(spec.config()).eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
    """`hf_model(name) -> (directory, torch model)`, built once per session."""
    cache = {}

    def get(name: str):
        if name not in cache:
            d = tmp_path_factory.mktemp(name)
            cache[name] = (d, save_hf_model(HF_SPECS[name], d))
        return cache[name]

    return get


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drops compiled executables after each test module, so one long pytest process does not accumulate
    every module's programs (memory grows by gigabytes over the suite otherwise)."""
    yield
    from specpv_jax import host

    host._EXECUTABLES.clear()
    jax.clear_caches()
