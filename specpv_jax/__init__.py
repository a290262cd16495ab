"""specpv-jax: long-context speculative decoding (SpecPV, SpecExtend, LongSpec) in JAX/Flax.

    import specpv_jax as sj
    target = sj.load_target(path, dtype="float32")
    draft = sj.load_draft(eagle3_path, target)
    out = sj.generate(target, input_ids, max_new_tokens=256, draft=draft, mode="eagle")
    out.tokens, out.stats
"""

from specpv_jax import xla_cpu

xla_cpu.configure()  # first: before anything can start JAX's backends

from specpv_jax.config import DraftConfig, ModelConfig, RopeConfig, SpecConfig
from specpv_jax.demo import DemoModels, demo_models
from specpv_jax.generate import GenerateOutput, fidelity, forward_logits, generate, make_generate_fn
from specpv_jax.loading import Model, load_draft, load_target, save_draft, save_target
from specpv_jax.warning import SpecPVWarning

__all__ = [
    "DemoModels", "DraftConfig", "GenerateOutput", "Model", "ModelConfig", "RopeConfig", "SpecConfig",
    "SpecPVWarning",
    "demo_models", "fidelity", "forward_logits", "generate", "load_draft", "load_target", "make_generate_fn",
    "save_draft", "save_target",
]
