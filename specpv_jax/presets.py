"""Hugging Face configs of the models SpecPV is evaluated on, for planning and benchmarks without weights.

`specpv-jax plan --model llama-3.1-8b` and `benchmarks/scale.py` read these; the
field values are those of the public `config.json` files.
"""

from __future__ import annotations

import copy
from typing import Any

from specpv_jax.config import ModelConfig

HF_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}},
    "qwen3-8b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096,
        "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645},
    "qwen2.5-7b": {  # Qwen2.5-7B-Instruct: 28 query and 4 KV heads (a model axis of 8 splits neither whole)
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 131072,
        "max_window_layers": 28, "bos_token_id": 151643, "eos_token_id": 151645},
}


def hf_config(name: str) -> dict[str, Any]:
    """A copy of preset `name`'s Hugging Face config dict."""
    if name not in HF_CONFIGS:
        raise KeyError(f"unknown model preset {name!r} (presets: {', '.join(HF_CONFIGS)})")
    return copy.deepcopy(HF_CONFIGS[name])


def model_config(name: str) -> ModelConfig:
    """The `ModelConfig` of preset `name`."""
    return ModelConfig.from_hf(hf_config(name))
