"""ModelConfig.from_hf: the three architectures, both RoPE layouts, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import HF_SPECS, needs_transformers_5
from specpv_jax import rope
from specpv_jax.config import ConfigError, DraftConfig, LongSpecConfig, ModelConfig, RopeConfig, SpecConfig


def hf_dict(name):
    return HF_SPECS[name].config().to_dict()


def test_reads_every_architecture():
    llama = ModelConfig.from_hf({**hf_dict("llama-gqa4-yarn-bias"), "architectures": ["LlamaForCausalLM"]})
    assert (llama.arch, llama.num_heads, llama.num_kv_heads) == ("llama", 8, 2)
    assert llama.qkv_bias and llama.o_bias and not llama.qk_norm
    qwen2 = ModelConfig.from_hf({**hf_dict("qwen2-gqa2-tied"), "architectures": ["Qwen2ForCausalLM"]})
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.tie_word_embeddings
    qwen3 = ModelConfig.from_hf({**hf_dict("qwen3-gqa4-headdim"), "architectures": ["Qwen3ForCausalLM"]})
    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.hidden_size // qwen3.num_heads == 16
    assert qwen3.eos_token_ids == (2,) and qwen3.pad_token_id == 0


@needs_transformers_5
def test_hub_rope_scaling_layout_equals_transformers5_layout():
    """Hub checkpoints store rope_scaling + rope_theta; transformers 5 writes rope_parameters."""
    new = hf_dict("llama-gqa2-tied-llama3")
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old["rope_theta"] = 10000.0
    old["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64}
    assert ModelConfig.from_hf(old) == ModelConfig.from_hf(new)
    qwen = {**hf_dict("qwen2-gqa4-yarn")}
    del qwen["rope_parameters"]
    qwen.update(rope_theta=10000.0, rope_scaling={"type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 64})
    assert ModelConfig.from_hf(qwen).rope == ModelConfig.from_hf(hf_dict("qwen2-gqa4-yarn")).rope


@needs_transformers_5
def test_rope_scaling_wins_over_rope_parameters_as_in_transformers():
    """A model card's YaRN block added to a transformers-5 config (which holds rope_parameters): transformers
    uses rope_scaling, and so do we (it was ignored: logits 4.9 apart); a top-level
    original_max_position_embeddings (Phi-3 style) wins over the dict's, as there."""
    import transformers

    cfg = hf_dict("qwen3-gqa4-headdim")
    assert cfg["rope_parameters"]["rope_type"] == "default"
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    ours = ModelConfig.from_hf(cfg).rope
    theirs = transformers.Qwen3Config.from_dict(cfg).rope_parameters
    assert (ours.kind, ours.factor, ours.original_max_position_embeddings, ours.theta) == (
        theirs["rope_type"], theirs["factor"], theirs["original_max_position_embeddings"], theirs["rope_theta"])
    llama = hf_dict("llama-gqa2-tied-llama3")
    llama["original_max_position_embeddings"] = 256
    # (transformers' from_pretrained on such a config.json: logits within 1e-5 of ours; 1.65 apart before)
    assert ModelConfig.from_hf(llama).rope.original_max_position_embeddings == 256


@needs_transformers_5
def test_rope_settings_without_their_original_length_take_max_positions_as_in_transformers():
    """yarn and llama3 settings without original_max_position_embeddings: transformers takes
    max_position_embeddings (they were refused); a yarn block without factor is refused, as there (a KeyError)."""
    import transformers

    qwen = hf_dict("qwen3-gqa4-headdim")
    qwen["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": qwen["rope_parameters"]["rope_theta"]}
    llama = hf_dict("llama-gqa2-tied-llama3")
    del llama["rope_parameters"]["original_max_position_embeddings"]
    for cfg, config_class in ((qwen, transformers.Qwen3Config), (llama, transformers.LlamaConfig)):
        ours = ModelConfig.from_hf(cfg).rope
        theirs = config_class.from_dict(cfg).rope_parameters
        assert (ours.kind, ours.factor, ours.original_max_position_embeddings) == (
            theirs["rope_type"], theirs["factor"], theirs["original_max_position_embeddings"])
        assert ours.original_max_position_embeddings == cfg["max_position_embeddings"]
    del qwen["rope_scaling"]["factor"]
    with pytest.raises(ConfigError, match="the RoPE settings of type 'yarn' in config.json have no factor"):
        ModelConfig.from_hf(qwen)
    qwen["rope_scaling"].update(factor=None, original_max_position_embeddings=qwen["max_position_embeddings"] // 4)
    assert ModelConfig.from_hf(qwen).rope.factor == 4.0  # null: the ratio (DeepSeek-V3's configs)


@needs_transformers_5
def test_rope_scaling_without_theta_beside_another_saved_theta_is_refused():
    """transformers takes rope_scaling whole, so a YaRN block without rope_theta added to a transformers-5 config
    saved with theta 1e6 runs at theta 10000 there (logits 0.19 apart from ours, which kept 1e6): refused,
    naming both; stating the theta in rope_scaling settles it."""
    cfg = hf_dict("qwen3-gqa4-headdim")
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    with pytest.raises(ConfigError, match=r"rope_scaling .* has no rope_theta, and rope_parameters says "
                                          r"rope_theta=1000000.0: transformers would use 10000"):
        ModelConfig.from_hf(cfg)
    cfg["rope_scaling"]["rope_theta"] = 1e6
    assert ModelConfig.from_hf(cfg).rope.theta == 1e6


def test_qwen3_head_dim_defaults_as_in_transformers():
    """Qwen3Config's head_dim defaults to 128, not hidden / heads (its checkpoint was refused as misshapen)."""
    import transformers

    cfg = {k: v for k, v in hf_dict("qwen3-gqa4-headdim").items() if k != "head_dim"}
    assert ModelConfig.from_hf(cfg).head_dim == transformers.Qwen3Config.from_dict(cfg).head_dim == 128
    llama = {k: v for k, v in hf_dict("llama-mha").items() if k != "head_dim"}
    assert ModelConfig.from_hf(llama).head_dim == llama["hidden_size"] // llama["num_attention_heads"]


def test_generation_config_eos_wins():
    cfg = ModelConfig.from_hf(hf_dict("llama-mha"), {"eos_token_id": [2, 7]})
    assert cfg.eos_token_ids == (2, 7)


def test_dict_round_trip():
    cfg = ModelConfig.from_hf(hf_dict("qwen3-gqa2-tied-yarn"))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    hash(cfg)  # static under jit
    head = DraftConfig.for_target(cfg, 64)
    long = LongSpecConfig.for_target(cfg, window=np.int64(16))  # numpy ints, as for the other configs
    assert long == LongSpecConfig.for_target(cfg, window=16) and type(long.window) is int
    for config in (head, long):
        assert type(config).from_dict(config.to_dict()) == config
        with pytest.raises(ConfigError, match=rf"unknown {type(config).__name__} fields: \['windw'\]"):
            type(config).from_dict({**config.to_dict(), "windw": 8})


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["MistralForCausalLM"]}, "unsupported architecture 'MistralForCausalLM'"),
    ({"architectures": None, "model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "unsupported rope_scaling type 'dynamic'"),
    ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads (3)"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"eos_token_id": 999}, "eos_token_id 999 is outside the vocabulary"),
    ({"eos_token_id": "12"}, "eos_token_id must be a token id or a list of them, got '12'"),
    ({"eos_token_id": 2.5}, "eos_token_id must be a token id or a list of them, got 2.5"),
    ({"architectures": "LlamaForCausalLM"}, "architectures in config.json must be a list of names"),
    ({"rope_parameters": None, "rope_scaling": "yarn"}, "rope_scaling in config.json must be a mapping"),
    ({"rope_parameters": "yarn"}, "rope_parameters in config.json must be a mapping"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": None, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64}}, "malformed RoPE settings in config.json"),
    ({"rms_norm_eps": "1e-5x"}, "rms_norm_eps must be a positive number, got '1e-5x'"),
    ({"head_dim": 0}, "head_dim must be a positive integer, got 0"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
])
def test_unsupported_fields_are_named(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_hf({**hf_dict("llama-mha"), **change})


def test_configs_restored_from_our_metadata_are_checked_too():
    d = ModelConfig.from_hf(hf_dict("llama-mha")).to_dict()
    for change, message in [({"rms_norm_eps": -1.0}, "ModelConfig.rms_norm_eps must be positive, got -1.0"),
                            ({"rms_norm_eps": float("nan")}, "ModelConfig.rms_norm_eps must be positive, got nan"),
                            ({"num_layers": "2"}, "ModelConfig.num_layers must be an int, got '2'")]:
        with pytest.raises(ConfigError, match=message):
            ModelConfig.from_dict({**d, **change})


EAGLE3_HF = {"architectures": ["LlamaForCausalLMEagle3"], "hidden_size": 64, "intermediate_size": 128,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 160, "draft_vocab_size": 32,
             "rms_norm_eps": 1e-5, "max_position_embeddings": 2048}


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": "abc"}, "hidden_size must be a positive integer, got 'abc'"),
    ({"hidden_size": 64.9}, "hidden_size must be a positive integer, got 64.9"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({"num_key_value_heads": -2}, "num_key_value_heads must be a positive integer, got -2"),
    ({"rms_norm_eps": "x"}, "rms_norm_eps must be a positive number, got 'x'"),
    ({"draft_vocab_size": 0}, "draft_vocab_size must be a positive integer, got 0"),
    ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": ["a"]}},
     "eagle_aux_hidden_state_layer_ids must be a list of layer numbers, got ['a']"),
    ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": 3}},
     "eagle_aux_hidden_state_layer_ids must be a list of layer numbers, got 3"),
])
def test_eagle3_config_fields_are_checked(change, message):
    """Malformed numbers in an EAGLE-3 head's config.json are named (bare int() errors, a ZeroDivisionError
    and a silently truncated 64.9 before)."""
    target = ModelConfig.from_hf(hf_dict("llama-mha"))
    assert DraftConfig.from_hf(EAGLE3_HF, target).draft_vocab_size == 32
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        DraftConfig.from_hf({**EAGLE3_HF, **change}, target)


def test_sliding_window_is_rejected_where_a_layer_slides():
    hf = {k: v for k, v in hf_dict("qwen2-gqa2-tied").items() if k != "layer_types"}
    sliding = {"use_sliding_window": True, "sliding_window": 64}
    with pytest.raises(ConfigError, match="use_sliding_window=true with max_window_layers=1"):
        ModelConfig.from_hf({**hf, **sliding, "max_window_layers": 1})
    # As transformers reads it: layers below max_window_layers attend to everything, so here none slides.
    assert ModelConfig.from_hf({**hf, **sliding, "max_window_layers": hf["num_hidden_layers"]}).num_layers == \
        hf["num_hidden_layers"]
    with pytest.raises(ConfigError, match="layer_types"):
        ModelConfig.from_hf({**hf, "layer_types": ["sliding_attention"] * hf["num_hidden_layers"]})
    # No sliding_window: transformers slides over its default 4096 (this loaded, 2.0 off from position 4096).
    with pytest.raises(ConfigError, match="use_sliding_window=true with max_window_layers=1"):
        ModelConfig.from_hf({**{k: v for k, v in hf.items() if k != "sliding_window"}, "use_sliding_window": True,
                             "max_window_layers": 1})


def test_position_limits_follow_yarn_and_dual_chunk_attention():
    """Qwen's model cards extend a model with a YaRN rope_scaling block alone (max_position_embeddings stays);
    Qwen2.5-1M needs dual-chunk attention past its original 262144 positions."""
    hf = {k: v for k, v in hf_dict("qwen2-gqa2-tied").items() if k not in ("rope_scaling", "rope_parameters")}
    hf = {**hf, "max_position_embeddings": 32768, "rope_theta": 1e6}
    assert ModelConfig.from_hf(hf).max_position_embeddings == 32768
    card = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert ModelConfig.from_hf({**hf, "rope_scaling": card}).max_position_embeddings == 131072
    one_m = {**hf, "max_position_embeddings": 1010000, "rope_theta": 1e7, "dual_chunk_attention_config": {
        "chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings": 262144}}
    assert ModelConfig.from_hf(one_m).max_position_embeddings == 262144


@pytest.mark.torch
def test_rope_tables_match_transformers():
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for name in ("llama-gqa2-tied-llama3", "qwen2-gqa4-yarn"):
        hf_cfg = HF_SPECS[name].config()
        ours = ModelConfig.from_hf(hf_cfg.to_dict())
        inv, scaling = ROPE_INIT_FUNCTIONS[ours.rope.kind](hf_cfg, torch.device("cpu"))
        np.testing.assert_allclose(rope.inverse_frequencies(ours.rope, ours.head_dim), inv.numpy(), rtol=1e-6)
        assert rope.attention_scaling(ours.rope) == pytest.approx(scaling)


@pytest.mark.torch
@pytest.mark.parametrize("rope_config", [
    RopeConfig(theta=5e5, kind="llama3", factor=8.0, original_max_position_embeddings=8192),  # Llama 3.1
    RopeConfig(theta=1e6, kind="yarn", factor=4.0, original_max_position_embeddings=32768),  # Qwen's long-context card
    RopeConfig(theta=1e4), RopeConfig(theta=1e6), RopeConfig(theta=5e6)], ids=lambda r: f"{r.kind}-{r.theta:g}")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_tables_at_real_head_widths_match_transformers_to_the_bit(rope_config, head_dim):
    """At most one entry one ulp apart (numpy's float32 power left a sixth of them an ulp off, which moved
    float32 logits 0.1 from transformers' at 128K tokens)."""
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaling = None if rope_config.kind == "default" else rope_config.to_hf()  # read by transformers 4 and 5
    hf_cfg = LlamaConfig(hidden_size=32 * head_dim, num_attention_heads=32, head_dim=head_dim,
                         max_position_embeddings=131072, rope_theta=rope_config.theta, rope_scaling=scaling)
    init = ROPE_INIT_FUNCTIONS.get(rope_config.kind)
    if init is None:  # transformers 5 keeps the default table on the rotary class
        init = LlamaRotaryEmbedding.compute_default_rope_parameters
    inv, _ = init(hf_cfg, device=torch.device("cpu"))
    ulps = np.abs(rope.inverse_frequencies(rope_config, head_dim).view(np.int32) - inv.numpy().view(np.int32))
    assert ulps.max() <= 1 and (ulps > 0).sum() <= 1, ulps


def test_rope_config_validation():
    with pytest.raises(ConfigError, match="needs original_max_position_embeddings"):
        RopeConfig(kind="yarn", factor=4.0)


def test_cli_spec_assignments_take_each_field_type_and_name_mistakes():
    from specpv_jax.cli import parse_spec
    from specpv_jax.config import SpecConfig

    assert parse_spec(None) == SpecConfig()
    spec = parse_spec(["retrieval_tokens=2048", "offload=yes", "tree-threshold=0.25", "buffer_tokens=100",
                       "bounded_draft=off"])
    assert spec == SpecConfig(retrieval_tokens=2048, offload=True, tree_threshold=0.25, buffer_tokens=100)
    assert parse_spec(["buffer_tokens=100", "buffer_tokens=none"]).buffer_tokens is None  # the last one wins
    for bad, message in [("retrival_tokens=2048", "SpecConfig has no field 'retrival_tokens'; fields: tree_depth, "),
                         ("offload", "expected FIELD=VALUE"),
                         ("offload=maybe", "offload takes true or false"),
                         ("tree_nodes=6.5", "tree_nodes takes an integer"),
                         ("tree_threshold=high", "tree_threshold takes a number"),
                         ("buffer_tokens=lots", "buffer_tokens takes an integer or none"),
                         ("sink_tokens=7", "sink_tokens=7 must be a non-negative multiple of block_size=16")]:
        with pytest.raises(ValueError, match=message):
            parse_spec([bad])


@pytest.mark.parametrize("field, value, message", [
    ("retrieval_tokens", 256.0, "SpecConfig.retrieval_tokens must be an int, got 256.0"),
    ("buffer_tokens", 30.5, "SpecConfig.buffer_tokens must be an int"),
    ("bounded_draft", "no", "SpecConfig.bounded_draft must be a bool, got 'no'"),
    ("offload", "false", "SpecConfig.offload must be a bool"),
    ("tree_nodes", True, "SpecConfig.tree_nodes must be an int, got True"),
])
def test_spec_config_field_types(field, value, message):
    with pytest.raises(ConfigError, match=message):
        SpecConfig(**{field: value})


def test_spec_config_block_size_divides_the_cache_blocks():
    """Block summaries tile caches allocated in 256-token blocks: 48 ran on a 400-token prompt and failed with
    a reshape error naming neither setting on a 700-token one."""
    with pytest.raises(ConfigError, match="block_size=48 must divide 256"):
        SpecConfig(block_size=48, sink_tokens=48, retrieval_tokens=480, window_tokens=96)
    assert SpecConfig(block_size=64, sink_tokens=64, retrieval_tokens=512, window_tokens=64).block_size == 64


def test_spec_config_window_holds_the_tokens_a_step_commits():
    """A full step scores blocks before its accepted path's keys are folded into their summaries: with a window
    shorter than the path, a block holding it could be retrieved on stale extrema (window 0: 1 of 3 full steps).
    Modes without a partial cache take any tree."""
    with pytest.raises(ConfigError, match=r"window_tokens=0 must hold the tree_depth \+ 1 = 8 tokens a step "
                                          r"commits, e.g. 16"):
        SpecConfig(window_tokens=0).check_partial()
    with pytest.raises(ConfigError, match=r"window_tokens=16 must hold the tree_depth \+ 1 = 21 .* e.g. 32"):
        SpecConfig(window_tokens=16, tree_depth=20, tree_nodes=20).check_partial()
    SpecConfig(window_tokens=16, tree_depth=15).check_partial()
    from specpv_jax.generate import check_mode_and_draft

    target_cfg = ModelConfig(arch="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                             num_heads=2, num_kv_heads=2, head_dim=8, max_position_embeddings=4096)
    draft_cfg = DraftConfig.for_target(target_cfg, 32)
    deep = SpecConfig(tree_depth=130, tree_top_k=1, tree_nodes=130)  # a chain longer than the default window
    check_mode_and_draft(target_cfg, "eagle", draft_cfg, deep)  # only the partial modes have a window
    for mode in ("specpv", "exact"):
        with pytest.raises(ConfigError, match="window_tokens=128 must hold the tree_depth"):
            check_mode_and_draft(target_cfg, mode, draft_cfg, deep)


def test_spec_config_takes_numpy_scalars_as_python_ones():
    spec = SpecConfig(tree_nodes=np.int64(30), bounded_draft=np.bool_(True), tree_threshold=0)
    plain = SpecConfig(tree_nodes=30, bounded_draft=True)
    assert spec == plain and hash(spec) == hash(plain)
    assert type(spec.tree_nodes) is int and type(spec.tree_threshold) is float


def test_config_errors_name_generation_config_only_for_its_eos(tmp_path):
    """generation_config.json's eos_token_id overrides config.json's; an error names it only when it is in play."""
    import json

    from convert.hf import ConversionError, read_config

    (tmp_path / "config.json").write_text(json.dumps({**hf_dict("llama-mha"), "num_key_value_heads": 3}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    with pytest.raises(ConversionError, match=r"config\.json: .*num_key_value_heads") as e:
        read_config(tmp_path)
    assert "generation_config" not in str(e.value)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))  # not in play for this error
    with pytest.raises(ConversionError, match=r"config\.json: .*num_key_value_heads") as e:
        read_config(tmp_path)
    assert "generation_config" not in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps(hf_dict("llama-mha")))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 999}))
    with pytest.raises(ConversionError, match=r"config\.json \(eos_token_id from generation_config\.json\): "
                                              r"eos_token_id 999 is outside the vocabulary"):
        read_config(tmp_path)
