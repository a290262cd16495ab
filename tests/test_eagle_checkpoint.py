"""EAGLE-3 heads in the public checkpoint layout: loading, export, errors, and the head's math."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import specpv_jax as sj
from convert.eagle3 import export_eagle3
from convert.hf import ConversionError, hf_config
from specpv_jax.attention import causal_mask
from specpv_jax.checkpoint import CheckpointError
from specpv_jax.config import ConfigError, DraftConfig, ModelConfig, RopeConfig
from specpv_jax import loading
from specpv_jax.draft import eagle3
from test_eagle import make_target

VOCAB, DRAFT_VOCAB, HIDDEN, HEADS, KV_HEADS, INTER = 64, 48, 64, 4, 2, 128


def public_config(**changes) -> dict:
    """The field names of the public Llama-3.1-8B EAGLE-3 head's config.json, scaled down."""
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": INTER,
        "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "num_hidden_layers": 1, "pad_token_id": 0, "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.28.1",
        "use_cache": True, "vocab_size": VOCAB, "draft_vocab_size": DRAFT_VOCAB,
    }
    cfg.update(changes)
    return cfg


def public_state(seed=0, n_features=3, dtype=torch.float16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return (torch.randn(*shape, generator=g) / math.sqrt(shape[-1])).to(dtype)

    d = HIDDEN // HEADS
    ids = torch.sort(torch.randperm(VOCAB, generator=g)[:DRAFT_VOCAB]).values
    t2d = torch.zeros(VOCAB, dtype=torch.bool)
    t2d[ids] = True
    return {
        "fc.weight": w(HIDDEN, n_features * HIDDEN),
        "midlayer.self_attn.q_proj.weight": w(HEADS * d, 2 * HIDDEN),
        "midlayer.self_attn.k_proj.weight": w(KV_HEADS * d, 2 * HIDDEN),
        "midlayer.self_attn.v_proj.weight": w(KV_HEADS * d, 2 * HIDDEN),
        "midlayer.self_attn.o_proj.weight": w(HIDDEN, HEADS * d),
        "midlayer.mlp.gate_proj.weight": w(INTER, HIDDEN), "midlayer.mlp.up_proj.weight": w(INTER, HIDDEN),
        "midlayer.mlp.down_proj.weight": w(HIDDEN, INTER),
        "midlayer.hidden_norm.weight": (1 + 0.1 * torch.randn(HIDDEN, generator=g)).to(dtype),
        "midlayer.input_layernorm.weight": (1 + 0.1 * torch.randn(HIDDEN, generator=g)).to(dtype),
        "midlayer.post_attention_layernorm.weight": (1 + 0.1 * torch.randn(HIDDEN, generator=g)).to(dtype),
        "norm.weight": (1 + 0.1 * torch.randn(HIDDEN, generator=g)).to(dtype),
        "lm_head.weight": w(DRAFT_VOCAB, HIDDEN),
        "d2t": (ids - torch.arange(DRAFT_VOCAB)).long(),
        "t2d": t2d,
    }


def write_head(directory, config=None, state=None, fmt="bin"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or public_config()))
    state = public_state() if state is None else state
    if fmt == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file
        save_file(state, str(directory / "model.safetensors"))
    return directory


@pytest.fixture(scope="module")
def target():
    return make_target(VOCAB, seed=5, layers=8)


def test_public_bin_head_loads_and_speculates(target, tmp_path):
    head = sj.load_draft(write_head(tmp_path / "head"), target)
    assert head.cfg.draft_vocab_size == DRAFT_VOCAB and head.cfg.feature_layers == (2, 4, 5)
    assert head.cfg.rope.theta == 10000.0  # the EAGLE code's default base when config.json has none
    prompt = np.random.default_rng(0).integers(0, VOCAB, 30)
    ar = sj.generate(target, prompt, 20, eos_token_ids=())
    eg = sj.generate(target, prompt, 20, draft=head, mode="eagle", eos_token_ids=(),
                     spec=sj.SpecConfig(tree_depth=3, tree_top_k=4, tree_nodes=10))
    np.testing.assert_array_equal(eg.tokens, ar.tokens)


def test_a_config_that_is_not_a_json_object_is_named(target, tmp_path):
    head = write_head(tmp_path / "head")
    (head / "config.json").write_text("[1, 2]")
    with pytest.raises(ConversionError, match="config.json must hold a JSON object .*, got a list"):
        sj.load_draft(head, target)


def test_unreadable_dtypes_and_a_key_in_two_files_are_named(target, tmp_path):
    """An fp8 tensor once failed deep in numpy/torch (a traceback from the CLI); a stray second safetensors
    file holding a key silently replaced the first's."""
    from safetensors.torch import save_file

    fp8 = {**public_state(), "fc.weight": public_state()["fc.weight"].to(torch.float8_e4m3fn)}
    for fmt, dtype in (("safetensors", "F8_E4M3"), ("bin", "float8_e4m3fn")):
        with pytest.raises(ConversionError, match=f"tensor 'fc.weight' has dtype {dtype}, which an EAGLE-3 head"):
            sj.load_draft(write_head(tmp_path / fmt, state=fp8, fmt=fmt), target)
    head = write_head(tmp_path / "two", fmt="safetensors")
    save_file({"norm.weight": torch.zeros(HIDDEN)}, str(head / "zz-backup.safetensors"))
    with pytest.raises(ConversionError, match="tensor 'norm.weight' appears twice: in model.safetensors and zz-backup"):
        sj.load_draft(head, target)


def test_save_draft_never_replaces_the_directory_it_came_from(target, tmp_path):
    head_dir = write_head(tmp_path / "models" / "head")
    head = sj.load_draft(head_dir, target)
    before = sorted(p.name for p in head_dir.iterdir())
    for out in (head_dir, tmp_path / "models"):
        with pytest.raises(CheckpointError, match="replacing it would delete it"):
            sj.save_draft(head, out, overwrite=True)
    assert sorted(p.name for p in head_dir.iterdir()) == before


def test_export_and_orbax_round_trips(target, tmp_path):
    head = sj.load_draft(write_head(tmp_path / "head", fmt="safetensors"), target)
    again = sj.load_draft(export_eagle3(tmp_path / "exported", head.cfg, head.params, head.d2t), target)
    sj.save_draft(head, tmp_path / "orbax")
    restored = sj.load_draft(tmp_path / "orbax", target)
    for other in (again, restored):
        assert other.cfg == head.cfg
        np.testing.assert_array_equal(np.asarray(other.d2t), np.asarray(head.d2t))
        jax.tree.map(np.testing.assert_array_equal, other.params, head.params)
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert exported["d2t"].dtype == torch.int64 and exported["t2d"].dtype == torch.bool
    assert set(exported) == set(public_state())
    # no table of its own: no target_hidden_size either, which makes the EAGLE reference keep a random table
    # instead of copying the target's (cnets.py: `load_emb and not hasattr(config, "target_hidden_size")`)
    assert "target_hidden_size" not in json.loads((tmp_path / "exported" / "config.json").read_text())


@pytest.mark.parametrize("config, state_edit, message", [
    ({"vocab_size": 100}, None, "vocab_size=100, but the target's vocabulary has 64 tokens"),
    ({"target_hidden_size": 32}, None, "target features of hidden size 32, but the target's hidden_size is 64"),
    ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 3, 11]}}, None,
     r"feature layers \[12\] are outside the target's 8 layers .*0..7.*-1..6: \[11\] there"),
    ({}, lambda s: s.pop("midlayer.hidden_norm.weight"), "missing tensors: midlayer.hidden_norm.weight"),
    ({}, lambda s: s.update({"fc.weight": torch.zeros(HIDDEN, 2 * HIDDEN)}),
     r"fc.weight \(64, 128\) takes 128 feature values, but 3 feature layers"),
    ({}, lambda s: s.update({"midlayer.self_attn.q_proj.weight": torch.zeros(HIDDEN, HIDDEN)}),
     r"midlayer.self_attn.q_proj.weight: shape \(64, 64\) in pytorch_model.bin, but .*config.json implies \(64, 128\)"),
    ({}, lambda s: s.update({"d2t": s["d2t"] + 100}), "d2t maps draft ids outside the target vocabulary"),
    ({}, lambda s: s.pop("d2t"), "needs a d2t tensor"),
    ({}, lambda s: s.update({"extra.weight": torch.zeros(3)}), "unexpected tensors .*extra.weight"),
    ({}, lambda s: s.update({"d2t": s["d2t"] + 0.5}), "d2t must hold integer offsets, got dtype float32"),
    ({}, lambda s: s["d2t"].__setitem__(1, s["d2t"][0] - 1), "d2t maps two draft ids to one target id"),
    ({"hidden_act": "gelu"}, None, r"hidden_act='gelu' \(an EAGLE-3 head here is SiLU-gated only\)"),
    ({"partial_rotary_factor": 0.5}, None, "partial_rotary_factor != 1"),  # loaded and drafted wrongly before
    ({"mlp_bias": True}, None, "mlp_bias=true"),
])
def test_mismatched_heads_are_named(target, tmp_path, config, state_edit, message):
    state = public_state()
    if state_edit is not None:
        state_edit(state)
    head_dir = write_head(tmp_path / "head", public_config(**config), state)
    with pytest.raises(ConversionError, match=message):
        sj.load_draft(head_dir, target)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_a_config_that_does_not_fit_is_named_before_the_weights_are_read(target, tmp_path, fmt):
    """Weights that cannot be read (or a missing torch) must not hide what the config already says."""
    head_dir = write_head(tmp_path / "head", public_config(hidden_act="gelu"), fmt=fmt)
    weights = head_dir / ("pytorch_model.bin" if fmt == "bin" else "model.safetensors")
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="hidden_act='gelu'"):
        sj.load_draft(head_dir, target)


def test_orbax_head_must_match_its_config(target, tmp_path):
    sj.save_draft(sj.load_draft(write_head(tmp_path / "head"), target), tmp_path / "orbax")
    meta_path = tmp_path / "orbax" / "specpv_config.json"
    meta = json.loads(meta_path.read_text())
    meta["draft_config"]["draft_vocab_size"] = 40
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"params/lm_head/kernel has shape \(64, 48\), the configuration "
                                              r"implies \(64, 40\); d2t has shape \(48,\), the configuration"):
        sj.load_draft(tmp_path / "orbax", target)


def test_head_of_another_width_needs_its_own_embedding(target, tmp_path):
    cfg = dataclasses.replace(DraftConfig.for_target(target.cfg, draft_vocab_size=DRAFT_VOCAB), hidden_size=96,
                              head_dim=24)
    params = eagle3.init_params(cfg, jax.random.key(0))
    d2t = np.zeros(DRAFT_VOCAB, np.int32)
    with pytest.raises(ConversionError, match="hidden size 96, the target 64, and it stores no embed_tokens"):
        sj.load_draft(export_eagle3(tmp_path / "bare", cfg, params, d2t), target)
    params["embed_tokens"] = {"embedding": jnp.zeros((VOCAB, 96))}
    head = sj.load_draft(export_eagle3(tmp_path / "own", cfg, params, d2t), target)
    sj.save_draft(head, tmp_path / "orbax")
    assert sj.load_draft(tmp_path / "orbax", target).params["embed_tokens"]["embedding"].shape == (VOCAB, 96)
    prompt = np.arange(3, 23)
    np.testing.assert_array_equal(sj.generate(target, prompt, 8, draft=head, mode="eagle", eos_token_ids=()).tokens,
                                  sj.generate(target, prompt, 8, eos_token_ids=()).tokens)


def test_export_keeps_every_rope_field(target):
    rope = RopeConfig(theta=5e5, kind="yarn", factor=8.0, original_max_position_embeddings=64, beta_fast=16.0,
                      beta_slow=2.0, attention_factor=1.3, mscale=0.7, mscale_all_dim=1.0, truncate=False)
    head = dataclasses.replace(DraftConfig.for_target(target.cfg, draft_vocab_size=DRAFT_VOCAB), rope=rope)
    assert DraftConfig.from_hf(head.to_hf(), target.cfg) == head
    model = dataclasses.replace(target.cfg, rope=rope)
    assert ModelConfig.from_hf(hf_config(model)) == model


def test_not_a_draft_directory(target, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a draft directory"):
        sj.load_draft(tmp_path, target)
    with pytest.raises(ValueError, match="needs a draft"):
        sj.generate(target, [1, 2, 3], 4, mode="eagle")


def reference_head_logits(state, target_embed, features, tokens, variant=None):
    """The EAGLE-3 head written out in torch from the reference code's structure (float32, causal), or from
    the speculators library's for a `variant` (its flags; "sliding_window" a window). Returns (log-probs, the
    state deeper levels are fed)."""
    s = {k.replace("layers.0.", "midlayer."): v.float() for k, v in state.items()}
    variant = variant or {}

    def rms(x, w, eps=1e-5):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    t = tokens.shape[0]
    d = HIDDEN // HEADS
    if variant.get("norm_before_fc"):
        features = rms(features, s["input_norm.weight"])
    if variant.get("fc_norm"):
        features = torch.cat([rms(c, s[f"fc_norm.{i}.weight"]) for i, c in enumerate(features.chunk(3, -1))], -1)
    hidden = features @ s["fc.weight"].T
    normed = rms(hidden, s["midlayer.hidden_norm.weight"])
    x = torch.cat([rms(target_embed[tokens], s["midlayer.input_layernorm.weight"]), normed], -1)
    q = (x @ s["midlayer.self_attn.q_proj.weight"].T).view(t, HEADS, d)
    k = (x @ s["midlayer.self_attn.k_proj.weight"].T).view(t, KV_HEADS, d)
    v = (x @ s["midlayer.self_attn.v_proj.weight"].T).view(t, KV_HEADS, d).transpose(0, 1)
    if variant.get("qk_norm"):
        q, k = rms(q, s["midlayer.self_attn.q_norm.weight"]), rms(k, s["midlayer.self_attn.k_norm.weight"])
    q, k = q.transpose(0, 1), k.transpose(0, 1)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.arange(t).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rot(u):
        return u * cos + torch.cat([-u[..., d // 2:], u[..., : d // 2]], -1) * sin

    q, k = rot(q), rot(k)
    k, v = k.repeat_interleave(HEADS // KV_HEADS, 0), v.repeat_interleave(HEADS // KV_HEADS, 0)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    seen = (j <= i) & (i - j < variant.get("sliding_window", t))
    att = (q @ k.transpose(1, 2)) / math.sqrt(d) + torch.where(seen, 0.0, -1e9)
    out = (att.softmax(-1) @ v).transpose(0, 1).reshape(t, HIDDEN) @ s["midlayer.self_attn.o_proj.weight"].T
    h = (normed if variant.get("norm_before_residual") else hidden) + out
    m = rms(h, s["midlayer.post_attention_layernorm.weight"])
    gate = torch.nn.functional.silu(m @ s["midlayer.mlp.gate_proj.weight"].T)
    h = h + (gate * (m @ s["midlayer.mlp.up_proj.weight"].T)) @ s["midlayer.mlp.down_proj.weight"].T
    final = rms(h, s["norm.weight"])
    return torch.log_softmax(final @ s["lm_head.weight"].T, -1), final if variant.get("norm_output") else h


def test_head_matches_the_reference_structure(target, tmp_path):
    state = public_state(dtype=torch.float32)
    head = sj.load_draft(write_head(tmp_path / "head", state=state), target)
    rng = np.random.default_rng(1)
    t = 24
    features = rng.standard_normal((t, 3 * HIDDEN)).astype(np.float32)
    tokens = rng.integers(0, VOCAB, t)
    embed = np.asarray(target.params["embed_tokens"]["embedding"])
    expected, _ = reference_head_logits(state, torch.tensor(embed), torch.tensor(features), torch.tensor(tokens))
    cache = eagle3.empty_cache(head.cfg, 1, 256, head.params)
    hidden, _, _, _ = eagle3.head_forward(head.params, head.cfg, jnp.asarray(embed), jnp.asarray(tokens)[None],
                                          jnp.asarray(features)[None], jnp.arange(t)[None], cache,
                                          causal_mask(1, t))
    got = eagle3.head_logprobs(head.params, head.cfg, hidden)[0]
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), atol=1e-4)


@pytest.mark.parametrize("config_head_dim", ["written", None, 16])
def test_heads_with_wider_attention_heads_load(target, tmp_path, config_head_dim):
    """Qwen3-4B-style heads (head_dim * heads != hidden) as train-draft and SpecForge write them (head_dim in
    config.json), as the EAGLE reference writes them (none), or with a config head_dim their weights ignore."""
    cfg = dataclasses.replace(sj.load_draft(write_head(tmp_path / "head"), target).cfg, head_dim=32)
    params = eagle3.init_params(cfg, jax.random.key(0))
    d2t = jnp.zeros(cfg.draft_vocab_size, jnp.int32)
    out = export_eagle3(tmp_path / "wide", cfg, params, d2t)
    config = json.loads((out / "config.json").read_text())
    assert config["head_dim"] == 32
    if config_head_dim != "written":
        config.pop("head_dim") if config_head_dim is None else config.update(head_dim=config_head_dim)
        (out / "config.json").write_text(json.dumps(config))
    head = sj.load_draft(out, target)
    assert head.cfg == cfg
    assert loading.draft_config(out, target.cfg) == cfg  # what `plan --draft` sizes it by, no weights read
    jax.tree.map(np.testing.assert_array_equal, head.params, params)


def speculators_config(layer_type="llama", **changes) -> dict:
    """A speculators-format config.json (`Eagle3SpeculatorConfig`'s fields; the layer's as speculators writes
    them, `to_diff_dict` of its transformers config)."""
    import transformers

    layer_class = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}[layer_type]
    fields = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS, vocab_size=VOCAB, num_hidden_layers=1,
                  rms_norm_eps=1e-5)
    layer = layer_class(**{**fields, **changes.pop("layer", {})})
    cfg = {
        "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "speculators_version": "0.9.0",
        "draft_vocab_size": DRAFT_VOCAB, "target_hidden_size": None, "eagle_aux_hidden_state_layer_ids": [2, 4, 5],
        "norm_before_residual": False, "norm_before_fc": False, "fc_norm": False, "norm_output": False,
        "embed_requires_grad": False, "transformer_layer_config": layer.to_diff_dict(),
        "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                               "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3}],
                               "verifier": {"name_or_path": "tiny", "architectures": ["LlamaForCausalLM"]}},
    }
    cfg.update(changes)
    return cfg


def speculators_state(variant: dict, seed=0) -> dict[str, torch.Tensor]:
    """`public_state` under speculators' names, with the tensors `variant`'s flags add (non-trivial norms)."""
    g = torch.Generator().manual_seed(seed + 1)

    def norm(n):
        return 1 + 0.3 * torch.randn(n, generator=g)

    state = {k.replace("midlayer.", "layers.0."): v for k, v in public_state(seed, dtype=torch.float32).items()}
    if variant.get("qk_norm"):
        state.update({f"layers.0.self_attn.{n}.weight": norm(HIDDEN // HEADS) for n in ("q_norm", "k_norm")})
    if variant.get("norm_before_fc"):
        state["input_norm.weight"] = norm(3 * HIDDEN)
    if variant.get("fc_norm"):
        state.update({f"fc_norm.{i}.weight": norm(HIDDEN) for i in range(3)})
    return state


def write_speculators_head(directory, variant: dict):
    flags = {k: v for k, v in variant.items() if k in ("norm_before_residual", "norm_before_fc", "fc_norm",
                                                       "norm_output")}
    layer = {}
    if "sliding_window" in variant:
        layer = {"layer_types": ["sliding_attention"], "sliding_window": variant["sliding_window"]}
    config = speculators_config("qwen3" if variant.get("qk_norm") else "llama", layer=layer, **flags)
    return write_head(directory, config, speculators_state(variant), fmt="safetensors")


def test_a_speculators_head_loads_as_the_same_head(target, tmp_path):
    """The speculators layout (vLLM's `*-speculator.eagle3` heads) holds the reference layout's head under other
    names: both load to one config and one set of parameters."""
    state = public_state(dtype=torch.float32)
    reference = sj.load_draft(write_head(tmp_path / "eagle", public_config(
        rms_norm_eps=1e-5, eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 3, 4]}), state), target)
    embedding = torch.tensor(np.asarray(target.params["embed_tokens"]["embedding"]))
    renamed = {k.replace("midlayer.", "layers.0."): v for k, v in state.items()}
    renamed["embed_tokens.weight"] = embedding  # speculators saves the target's: the head uses the target's
    head = sj.load_draft(write_head(tmp_path / "speculators", speculators_config(), renamed, fmt="safetensors"),
                         target)
    assert head.cfg == reference.cfg
    jax.tree.map(np.testing.assert_array_equal, head.params, reference.params)
    np.testing.assert_array_equal(head.d2t, reference.d2t)
    renamed["embed_tokens.weight"] = embedding + 1  # an embedding of its own is kept
    own = sj.load_draft(write_head(tmp_path / "own", speculators_config(), renamed, fmt="safetensors"), target)
    np.testing.assert_array_equal(own.params["embed_tokens"]["embedding"], embedding.numpy() + 1)


VARIANTS = {
    "norm_before_residual": {"norm_before_residual": True},
    "fc_norm": {"fc_norm": True},
    "norm_before_fc": {"norm_before_fc": True},
    "qwen3_qk_norm": {"qk_norm": True, "norm_before_residual": True},
    "norm_output": {"norm_output": True},
    "sliding_window": {"sliding_window": 6},
}


@pytest.mark.parametrize("name", VARIANTS)
def test_speculators_variants_match_their_reference(target, tmp_path, name):
    """Each flag of a speculators head changes the layer as speculators' own code does. The head reads its
    context in two chunks (the second one through its cache), so the window is applied to cached keys too."""
    variant = VARIANTS[name]
    head = sj.load_draft(write_speculators_head(tmp_path / "head", variant), target)
    assert {k: getattr(head.cfg, k) for k in variant} == variant
    rng = np.random.default_rng(2)
    t, first = 24, 10
    features = rng.standard_normal((t, 3 * HIDDEN)).astype(np.float32)
    tokens = rng.integers(0, VOCAB, t)
    embed = np.asarray(target.params["embed_tokens"]["embedding"])
    expected, expected_state = reference_head_logits(speculators_state(variant), torch.tensor(embed),
                                                     torch.tensor(features), torch.tensor(tokens), variant)
    cache = eagle3.empty_cache(head.cfg, 1, 256, head.params)
    states = []
    for lo, hi in ((0, first), (first, t)):
        cache = cache.replace(length=jnp.array([lo], jnp.int32))
        state, _, _, cache = eagle3.head_forward(head.params, head.cfg, jnp.asarray(embed),
                                                 jnp.asarray(tokens[lo:hi])[None], jnp.asarray(features[lo:hi])[None],
                                                 jnp.arange(lo, hi)[None], cache, causal_mask(1, hi - lo))
        states.append(state[0])
    state = jnp.concatenate(states)
    np.testing.assert_allclose(np.asarray(eagle3.head_logprobs(head.params, head.cfg, state)), expected.numpy(),
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(state), expected_state.numpy(), atol=1e-4)


def test_a_windowed_head_speculates_losslessly(target, tmp_path):
    head = sj.load_draft(write_speculators_head(tmp_path / "head", {"sliding_window": 8}), target)
    prompt = np.random.default_rng(3).integers(0, VOCAB, 40)
    spec = sj.SpecConfig(tree_depth=3, tree_top_k=4, tree_nodes=10)
    np.testing.assert_array_equal(sj.generate(target, prompt, 12, draft=head, mode="eagle", eos_token_ids=(),
                                              spec=spec).tokens,
                                  sj.generate(target, prompt, 12, eos_token_ids=()).tokens)
    with pytest.raises(ValueError, match=r"bounded_draft=True\) does not combine with this EAGLE-3 head.s sliding"):
        sj.generate(target, prompt, 12, draft=head, mode="specpv",
                    spec=dataclasses.replace(spec, bounded_draft=True))


@pytest.mark.parametrize("config, message", [
    (speculators_config(speculators_model_type="eagle"), "only EAGLE-3 heads"),
    (speculators_config(layer={"num_hidden_layers": 2}), "num_hidden_layers=2: only one-layer"),
    (speculators_config(norm_before_fc=True, fc_norm=True), "exclude each other"),
    (speculators_config(norm_output="yes"), "norm_output must be true or false"),
    (speculators_config(layer={"layer_types": ["linear_attention"]}),
     r"layer_types=\['linear_attention'\]: expected a list whose first"),
    (speculators_config(eagle_config={"eagle_aux_hidden_state_layer_ids": [2, 4, 5]}), "name different layers"),
    (public_config(norm_output=False), "norm_output=false"),
    (public_config(eagle_config={"norm_before_fc": True}), "norm_before_fc=true"),
    (speculators_config(eagle_aux_hidden_state_layer_ids=[4]), r"feature layers \[4\] give features as wide"),
    ({**speculators_config(), "transformer_layer_config": {"model_type": "llama", "hidden_size": "wide"}},
     "transformer_layer_config: hidden_size must be a positive integer, got 'wide'"),
    (public_config(transformer_layer_config={}), "without speculators_model_type"),
])
def test_unsupported_head_settings_are_named(target, config, message):
    """Each of these loaded before as the reference's head, computing something else (or failed deep)."""
    with pytest.raises(ConfigError, match=message):
        DraftConfig.from_hf(config, target.cfg)


def test_sliding_fields_where_no_window_is_run(target):
    """The reference layout's producers ignore a target's copied sliding-window fields; a speculators layer
    marked sliding without a window attends to everything, as transformers runs it."""
    copied = public_config(use_sliding_window=True, sliding_window=16, layer_types=["sliding_attention"])
    assert DraftConfig.from_hf(copied, target.cfg).sliding_window is None
    qwen3 = speculators_config("qwen3", layer={"layer_types": ["sliding_attention"]})
    assert DraftConfig.from_hf(qwen3, target.cfg).sliding_window is None


def test_feature_layers_from_either_field(target):
    """A top-level eagle_aux_hidden_state_layer_ids names layer inputs (vLLM); eagle_config's names outputs."""
    assert DraftConfig.from_hf(public_config(eagle_aux_hidden_state_layer_ids=[1, 3, 6]),
                               target.cfg).feature_layers == (1, 3, 6)
    assert DraftConfig.from_hf(public_config(eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 2, 5]}),
                               target.cfg).feature_layers == (1, 3, 6)
    # listed out of order: captured in layer order all the same (the fc's input was permuted)
    assert DraftConfig.from_hf(public_config(eagle_aux_hidden_state_layer_ids=[6, 1, 3]),
                               target.cfg).feature_layers == (1, 3, 6)


def test_variant_heads_save_and_export_what_their_layout_can_hold(target, tmp_path):
    head = sj.load_draft(write_speculators_head(tmp_path / "head", {"fc_norm": True}), target)
    out = export_eagle3(tmp_path / "eagle", head.cfg, head.params, head.d2t)
    again = sj.load_draft(out, target)
    assert again.cfg == head.cfg
    jax.tree.map(np.testing.assert_array_equal, again.params, head.params)
    sj.save_draft(head, tmp_path / "orbax")
    restored = sj.load_draft(tmp_path / "orbax", target)
    assert restored.cfg == head.cfg
    jax.tree.map(np.testing.assert_array_equal, restored.params, head.params)
    for variant in ({"sliding_window": 8}, {"norm_before_residual": True}):  # the reference's readers ignore it
        other = sj.load_draft(write_speculators_head(tmp_path / str(variant), variant), target)
        with pytest.raises(ConfigError, match=f"no field for this head's {next(iter(variant))}: save it with"):
            export_eagle3(tmp_path / "no", other.cfg, other.params, other.d2t)
        assert not (tmp_path / "no").exists()
