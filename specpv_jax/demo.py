"""`specpv-jax demo`: generation on a small model, with speed and counters.

Until trained demo models are bundled, the demo runs a small random-weight
LLaMA-shaped model, so it shows speed and machinery, not sensible text.
"""

from __future__ import annotations

import jax
import numpy as np

from specpv_jax.config import ModelConfig, RopeConfig
from specpv_jax.generate import generate
from specpv_jax.loading import Model
from specpv_jax.model import init_params

DEMO_CONFIG = ModelConfig(arch="llama", vocab_size=2048, hidden_size=256, intermediate_size=768, num_layers=4,
                          num_heads=8, num_kv_heads=2, head_dim=32, max_position_embeddings=32768,
                          rope=RopeConfig(theta=500000.0))


def random_demo_model(seed: int = 0) -> Model:
    return Model(DEMO_CONFIG, init_params(DEMO_CONFIG, jax.random.key(seed)), source="random")


def run_demo(context: int = 2048, new_tokens: int = 128) -> int:
    print("specpv-jax demo: random-weight model (trained demo models are not bundled yet)")
    model = random_demo_model()
    prompt = np.random.default_rng(0).integers(0, DEMO_CONFIG.vocab_size, context)
    print(f"{'mode':>8} {'context':>8} {'new':>5} {'tok/s':>9} {'prefill s':>10} {'accept':>7}")
    for mode in ("ar",):
        out = generate(model, prompt, max_new_tokens=new_tokens, mode=mode, eos_token_ids=())
        s = out.stats
        print(f"{mode:>8} {context:>8} {s['new_tokens']:>5} {s['tokens_per_s']:>9.1f} {s['prefill_s']:>10.2f} "
              f"{s['mean_accept_len']:>7.2f}")
    return 0
