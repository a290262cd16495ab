"""specpv-jax: long-context speculative decoding (SpecPV, SpecExtend, LongSpec) in JAX/Flax.

    import specpv_jax as sj
    target = sj.load_target(path, dtype="float32")
    out = sj.generate(target, input_ids, max_new_tokens=256, mode="ar")
    out.tokens, out.stats
"""

from specpv_jax.config import ModelConfig, RopeConfig
from specpv_jax.generate import GenerateOutput, forward_logits, generate
from specpv_jax.loading import Model, load_target, save_target

__all__ = [
    "GenerateOutput", "Model", "ModelConfig", "RopeConfig",
    "forward_logits", "generate", "load_target", "save_target",
]
