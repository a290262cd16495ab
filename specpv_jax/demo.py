"""`specpv-jax demo`: generation on a small model, with speed and counters.

Until trained demo models are bundled, the demo runs a small random-weight
LLaMA-shaped model and a random EAGLE-3 head, so it shows the machinery and
its cost, not sensible text: a random head's guesses are almost never
accepted, so `eagle` is slower than `ar` here.
"""

from __future__ import annotations

import jax
import numpy as np

from specpv_jax.config import DraftConfig, ModelConfig, RopeConfig, SpecConfig
from specpv_jax.draft import eagle3
from specpv_jax.generate import generate
from specpv_jax.loading import Model
from specpv_jax.model import init_params

DEMO_CONFIG = ModelConfig(arch="llama", vocab_size=2048, hidden_size=256, intermediate_size=768, num_layers=4,
                          num_heads=8, num_kv_heads=2, head_dim=32, max_position_embeddings=32768,
                          rope=RopeConfig(theta=500000.0))


def random_demo_model(seed: int = 0) -> Model:
    return Model(DEMO_CONFIG, init_params(DEMO_CONFIG, jax.random.key(seed)), source="random")


def random_head(target: Model, seed: int = 1) -> eagle3.Eagle3:
    """A random EAGLE-3 head shaped like the target's layers."""
    cfg = target.cfg
    dcfg = DraftConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                       vocab_size=cfg.vocab_size, draft_vocab_size=cfg.vocab_size,
                       target_hidden_size=cfg.hidden_size,
                       feature_layers=DraftConfig.default_feature_layers(cfg.num_layers), rope=cfg.rope)
    return eagle3.Eagle3(dcfg, eagle3.init_params(dcfg, jax.random.key(seed), target.dtype),
                         eagle3.identity_d2t(dcfg), source="random")


def run_demo(context: int = 2048, new_tokens: int = 128) -> int:
    print("specpv-jax demo: random-weight target and head (trained demo models are not bundled yet),\n"
          "so drafted tokens are almost never accepted and `eagle` only shows its cost here.")
    model = random_demo_model()
    head = random_head(model)
    spec = SpecConfig(tree_depth=5, tree_top_k=8, tree_nodes=32)
    prompt = np.random.default_rng(0).integers(0, DEMO_CONFIG.vocab_size, context)
    print(f"{'mode':>8} {'context':>8} {'new':>5} {'tok/s':>9} {'vs ar':>6} {'prefill s':>10} {'accept':>7}")
    base = None
    for mode in ("ar", "eagle"):
        out = generate(model, prompt, max_new_tokens=new_tokens, mode=mode, draft=head, spec=spec,
                       eos_token_ids=())
        s = out.stats
        base = base or s["tokens_per_s"]
        print(f"{mode:>8} {context:>8} {s['new_tokens']:>5} {s['tokens_per_s']:>9.1f} {s['tokens_per_s'] / base:>6.2f} "
              f"{s['prefill_s']:>10.2f} {s['mean_accept_len']:>7.2f}")
    return 0
