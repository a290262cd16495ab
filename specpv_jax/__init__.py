"""specpv-jax: long-context speculative decoding (SpecPV, SpecExtend, LongSpec) in JAX/Flax.

    import specpv_jax as sj
    target = sj.load_target(path, dtype="float32")
    draft = sj.load_draft(eagle3_path, target)
    out = sj.generate(target, input_ids, max_new_tokens=256, draft=draft, mode="eagle")
    out.tokens, out.stats
"""

from specpv_jax.config import DraftConfig, ModelConfig, RopeConfig, SpecConfig
from specpv_jax.generate import GenerateOutput, fidelity, forward_logits, generate
from specpv_jax.loading import Model, load_draft, load_target, save_draft, save_target

__all__ = [
    "DraftConfig", "GenerateOutput", "Model", "ModelConfig", "RopeConfig", "SpecConfig",
    "fidelity", "forward_logits", "generate", "load_draft", "load_target", "save_draft", "save_target",
]
