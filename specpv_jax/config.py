"""Frozen, hashable configuration dataclasses (static under jit).

`ModelConfig.from_hf` reads a Hugging Face `config.json` dict for the three
supported architectures and rejects anything whose semantics we do not
implement, naming the field, instead of silently computing something else.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
ROPE_KINDS = ("default", "llama3", "yarn")
MODES = ("ar", "eagle", "specpv", "exact", "specextend", "longspec")  # generate's modes
PARTIAL_MODES = ("specpv", "exact")  # verifying against a partial cache between full steps
EAGLE3_MODES = ("eagle", *PARTIAL_MODES)  # drafting with an EAGLE-3 head


def spec_fields_read(mode: str) -> tuple[str, ...]:
    """The `SpecConfig` fields `mode` reads: the tree's (every speculative mode), the partial cache's (specpv,
    exact), `full_step_cost` (exact, when sampling) and the draft's retrieval (specextend)."""
    tree = ("tree_depth", "tree_top_k", "tree_nodes", "tree_threshold", "tree_beam")
    partial = ("block_size", "sink_tokens", "retrieval_tokens", "window_tokens", "buffer_tokens", "bounded_draft",
               "offload")
    retrieval = ("chunk_tokens", "draft_chunks", "retrieve_every")
    return ((tree if mode != "ar" else ()) + (partial if mode in PARTIAL_MODES else ())
            + (("full_step_cost",) if mode == "exact" else ()) + (retrieval if mode == "specextend" else ()))


class ConfigError(ValueError):
    """A configuration that names something unsupported or inconsistent."""


def is_integer(x: Any) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_positive(config, names: tuple[str, ...]) -> None:
    """Raises naming the first of the numeric fields `names` of `config` that is not positive and finite."""
    for name in names:
        value = getattr(config, name)
        if not 0 < value < float("inf"):
            raise ConfigError(f"{type(config).__name__}.{name} must be positive, got {value!r}")


def _check_field_types(config) -> None:
    """Raises naming a field whose value is not of its annotated type (`int`, `bool`, `float`, `int | None`);
    numpy scalars become Python ones, so that equal configs hash equally under jit."""
    for field in dataclasses.fields(config):
        value, kind = getattr(config, field.name), field.type
        if value is None and kind.endswith("| None"):
            continue
        kind = kind.removesuffix(" | None")
        if kind == "bool" and isinstance(value, (bool, np.bool_)):
            value = bool(value)
        elif kind == "int" and is_integer(value):
            value = int(value)
        elif (kind == "float" and isinstance(value, (int, float, np.integer, np.floating))
              and not isinstance(value, bool)):
            value = float(value)
        elif kind in ("bool", "int", "float"):
            raise ConfigError(f"{type(config).__name__}.{field.name} must be {'an' if kind == 'int' else 'a'} {kind}, "
                              f"got {value!r}")
        object.__setattr__(config, field.name, value)


class _Serialised:
    """`to_dict` / `from_dict` (our own checkpoint metadata, not the Hugging Face layout) for a config
    dataclass whose fields are plain values, tuples and a `rope: RopeConfig`."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-serialisable values (nested `rope` as a dict)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Inverse of `to_dict`; raises naming fields the class does not have."""
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        d = dict(d)
        if "rope" in fields:
            d["rope"] = RopeConfig(**d.get("rope", {}))
        for name in d:  # JSON has no tuples
            if fields[name].startswith("tuple"):
                d[name] = tuple(d[name])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, in the Hugging Face conventions.

    kind: "default", "llama3" (Llama 3.1 frequency smoothing) or "yarn".
    """

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.kind not in ROPE_KINDS:
            raise ConfigError(f"unsupported RoPE type {self.kind!r} (supported: {', '.join(ROPE_KINDS)})")
        _check_field_types(self)
        if self.kind != "default" and self.original_max_position_embeddings is None:
            raise ConfigError(f"RoPE type {self.kind!r} needs original_max_position_embeddings")
        optional = ("original_max_position_embeddings", "attention_factor")
        _check_positive(self, ("theta", "factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow")
                        + tuple(name for name in optional if getattr(self, name) is not None))
        for name in ("mscale", "mscale_all_dim"):  # 0 means unset, as in transformers
            value = getattr(self, name)
            if value is not None and not 0 <= value < float("inf"):
                raise ConfigError(f"RopeConfig.{name} must be >= 0 and finite, got {value!r}")
        if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"RoPE llama3 high_freq_factor ({self.high_freq_factor}) must exceed low_freq_factor "
                              f"({self.low_freq_factor})")

    def to_hf(self) -> dict[str, Any]:
        """The `rope_parameters` / `rope_scaling` dict of a config.json (the inverse of reading one)."""
        hf: dict[str, Any] = {"rope_type": self.kind, "rope_theta": self.theta}
        if self.kind == "default":
            return hf
        hf.update(factor=self.factor, original_max_position_embeddings=self.original_max_position_embeddings)
        if self.kind == "llama3":
            hf.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor)
        if self.kind == "yarn":
            hf.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow, truncate=self.truncate)
            optional = {"attention_factor": self.attention_factor, "mscale": self.mscale,
                        "mscale_all_dim": self.mscale_all_dim}
            hf.update({k: v for k, v in optional.items() if v is not None})
        return hf


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Serialised):
    """Decoder shape and semantics for LLaMA-3.x, Qwen2 and Qwen3."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.arch not in ARCHITECTURES.values():
            raise ConfigError(f"unsupported arch {self.arch!r}")
        _check_field_types(self)
        _check_positive(self, ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                               "num_kv_heads", "head_dim", "max_position_embeddings", "rms_norm_eps"))
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not all(is_integer(t) for t in self.eos_token_ids):
            raise ConfigError(f"ModelConfig.eos_token_ids must be token ids, got {self.eos_token_ids!r}")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))  # numpy: JSON-able
        for tok in self.eos_token_ids:
            if not 0 <= tok < self.vocab_size:
                raise ConfigError(f"eos_token_id {tok} is outside the vocabulary (size {self.vocab_size})")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None) -> "ModelConfig":
        """Builds a config from a Hugging Face config.json dict (transformers 4 or 5 layout).

        `generation_config` (generation_config.json), when given, supplies the EOS
        ids that `transformers.generate` would stop on.
        """
        arch = _architecture(hf)
        _reject_unsupported(hf, arch)
        num_heads = _positive_int(hf, "num_attention_heads")
        hidden = _positive_int(hf, "hidden_size")
        # As transformers' configs default it: Qwen3Config's head_dim is 128, the others' hidden / heads.
        head_dim = _positive_int(hf, "head_dim") if hf.get("head_dim") is not None else \
            128 if arch == "qwen3" else hidden // num_heads
        if arch == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        eos = (generation_config or {}).get("eos_token_id", hf.get("eos_token_id"))
        rope = rope_from_hf(hf)
        return cls(
            arch=arch,
            vocab_size=_positive_int(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_positive_int(hf, "intermediate_size"),
            num_layers=_positive_int(hf, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=_positive_int(hf, "num_key_value_heads") if hf.get("num_key_value_heads") is not None
            else num_heads,
            head_dim=head_dim,
            max_position_embeddings=_position_limit(hf, rope),
            rms_norm_eps=_positive_float(hf, "rms_norm_eps", 1e-6),  # transformers' default for all three
            rope=rope,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=arch == "qwen3",
            bos_token_id=_first(hf.get("bos_token_id")),
            eos_token_ids=_as_ids(eos),
            pad_token_id=_first(hf.get("pad_token_id")),
        )


def _architecture(hf: Mapping[str, Any]) -> str:
    names = hf.get("architectures") or []
    if not isinstance(names, list):
        raise ConfigError(f"architectures in config.json must be a list of names, got {names!r}")
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    if names:
        raise ConfigError(
            f"unsupported architecture {names[0]!r} in config.json "
            f"(supported: {', '.join(ARCHITECTURES)})")
    model_type = hf.get("model_type")
    if model_type in ARCHITECTURES.values():
        return model_type
    raise ConfigError(
        f"unsupported model_type {model_type!r} in config.json (supported: llama, qwen2, qwen3)")


def _position_limit(hf: Mapping[str, Any], rope: RopeConfig) -> int:
    """The positions a config.json's model is built for: its max_position_embeddings, raised to YaRN's
    factor x original length (Qwen's model cards extend a model by adding a rope_scaling block alone, as vLLM
    reads it) and capped at a `dual_chunk_attention_config`'s original length (Qwen2.5-1M: further positions
    need dual-chunk attention, which neither transformers nor this library has)."""
    limit = _positive_int(hf, "max_position_embeddings")
    if rope.kind == "yarn":
        limit = max(limit, int(rope.factor * rope.original_max_position_embeddings))
    dual_chunk = hf.get("dual_chunk_attention_config")
    if isinstance(dual_chunk, Mapping) and dual_chunk.get("original_max_position_embeddings") is not None:
        limit = min(limit, _positive_int(dual_chunk, "original_max_position_embeddings"))
    return limit


def _reject_unsupported(hf: Mapping[str, Any], arch: str) -> None:
    """Fields that would change the computation in ways we do not implement."""
    problems = []
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act={act!r} (only 'silu')")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=true")
    layer_types = hf.get("layer_types") or []
    # As transformers reads Qwen configs: without layer_types, layers from max_window_layers on slide.
    # A missing sliding_window is transformers' default, 4096 (not "none").
    if not layer_types and hf.get("use_sliding_window") and hf.get("sliding_window", 4096) is not None and \
            hf.get("max_window_layers", 28) < hf.get("num_hidden_layers", 0):
        problems.append(f"use_sliding_window=true with max_window_layers={hf.get('max_window_layers', 28)} "
                        f"(sliding-window attention in layers {hf.get('max_window_layers', 28)} and up)")
    if any(t != "full_attention" for t in layer_types):
        problems.append(f"layer_types={sorted(set(layer_types))} (only full_attention)")
    if hf.get("pretraining_tp", 1) not in (1, None):
        problems.append(f"pretraining_tp={hf['pretraining_tp']}")
    if problems:
        raise ConfigError(f"unsupported config.json fields for {arch}: " + "; ".join(problems))


def _rope_dict(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The RoPE settings as transformers reads them: rope_scaling (hub checkpoints; a model card's YaRN
    block added to a transformers-5 config) over rope_parameters (transformers 5), with rope_theta and
    a top-level original_max_position_embeddings (Phi-3 style) beside them."""
    scaling, params = hf.get("rope_scaling"), hf.get("rope_parameters")
    for name, value in (("rope_scaling", scaling), ("rope_parameters", params)):
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"{name} in config.json must be a mapping (rope_type, factor, ...), got {value!r}")
    if params and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    rope = dict(scaling or params or {})
    saved_theta = (params or {}).get("rope_theta")
    if scaling and "rope_theta" not in scaling and "rope_theta" not in hf and saved_theta not in (None, 10000.0):
        # transformers takes rope_scaling whole and its theta default, 10000: surely not what was meant.
        raise ConfigError(f"rope_scaling in config.json has no rope_theta, and rope_parameters says "
                          f"rope_theta={saved_theta}: transformers would use 10000 (rope_scaling replaces "
                          f"rope_parameters); set rope_theta in rope_scaling to say which")
    rope.setdefault("rope_theta", hf.get("rope_theta", saved_theta if saved_theta is not None else 10000.0))
    if (rope.get("rope_type", rope.get("type")) in ("llama3", "yarn", "longrope")
            and hf.get("original_max_position_embeddings") is not None):
        rope["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    return rope


def rope_from_hf(hf: Mapping[str, Any]) -> RopeConfig:
    """The RoPE of an HF config.json dict (`_rope_dict`'s settings, checked)."""
    r = _rope_dict(hf)
    try:
        return _rope_config(hf, r)
    except ConfigError:
        raise
    except (TypeError, ValueError, ArithmeticError) as e:  # float(None), int("x"), int(inf), x / 0, ...
        raise ConfigError(f"malformed RoPE settings in config.json {r}: {e}") from None


def _rope_config(hf: Mapping[str, Any], r: Mapping[str, Any]) -> RopeConfig:
    if float(r.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise ConfigError("unsupported config.json field: partial_rotary_factor != 1 (rotary on every dimension only)")
    kind = r.get("rope_type", r.get("type", "default")) or "default"
    theta = float(r["rope_theta"])  # `_rope_dict` always sets it
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind not in ROPE_KINDS:
        raise ConfigError(f"unsupported rope_scaling type {kind!r} in config.json "
                          f"(supported: {', '.join(ROPE_KINDS)})")
    # transformers' default: the model was pretrained at the length it now runs at
    orig = _positive_int({"original_max_position_embeddings": hf.get("max_position_embeddings")}
                         if r.get("original_max_position_embeddings") is None else r,
                         "original_max_position_embeddings")
    if kind == "llama3":
        return RopeConfig(theta=theta, kind=kind, factor=float(r["factor"]),
                          original_max_position_embeddings=orig,
                          low_freq_factor=float(r["low_freq_factor"]),
                          high_freq_factor=float(r["high_freq_factor"]))
    if "factor" not in r:  # transformers reads it unchecked (a KeyError); null asks for the ratio below
        raise ConfigError(f"the RoPE settings of type {kind!r} in config.json have no factor (null: "
                          f"max_position_embeddings / original_max_position_embeddings)")
    factor = r["factor"]
    if factor is None:
        factor = hf["max_position_embeddings"] / orig
    return RopeConfig(
        theta=theta, kind=kind, factor=float(factor), original_max_position_embeddings=orig,
        beta_fast=float(r.get("beta_fast") or 32.0), beta_slow=float(r.get("beta_slow") or 1.0),
        attention_factor=r.get("attention_factor"), mscale=r.get("mscale"),
        mscale_all_dim=r.get("mscale_all_dim"), truncate=bool(r.get("truncate", True)))


def _positive_int(hf: Mapping[str, Any], name: str) -> int:
    """Field `name` of a config.json: a positive integer (a whole-number float is accepted)."""
    value = hf[name]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _positive_int_or(hf: Mapping[str, Any], name: str, default: int) -> int:
    """Optional field `name` of a config.json: a positive integer, `default` when absent or null."""
    return default if hf.get(name) is None else _positive_int(hf, name)


def _positive_float(hf: Mapping[str, Any], name: str, default: float) -> float:
    """Field `name` of a config.json: a positive number (`default` when absent)."""
    value = hf.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _as_ids(x) -> tuple[int, ...]:
    """eos_token_id: an id, a list of them, or null."""
    ids = [] if x is None else x if isinstance(x, list) else [x]
    if not all(isinstance(t, int) and not isinstance(t, bool) or isinstance(t, float) and t.is_integer()
               for t in ids):
        raise ConfigError(f"eos_token_id must be a token id or a list of them, got {x!r}")
    return tuple(int(t) for t in ids)


def _first(x):
    if isinstance(x, (list, tuple)):
        return x[0] if x else None
    return x


def is_speculators(hf: Mapping[str, Any]) -> bool:
    """Whether an EAGLE-3 config.json is in the speculators library's layout (its tensors are `layers.0.*`)."""
    return "speculators_model_type" in hf


def _flag(hf: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = hf.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def _layer_ids(value, name: str) -> list[int]:
    if not (isinstance(value, list) and value and all(isinstance(i, int) and not isinstance(i, bool) for i in value)):
        raise ConfigError(f"{name} must be a list of layer numbers, got {value!r}")
    return value


def _feature_layers(hf: Mapping[str, Any], target: ModelConfig) -> tuple[int, ...]:
    """The target layers whose inputs a head takes (`DraftConfig.feature_layers`) from an EAGLE-3 config.json.

    SGLang, SpecForge and ModelOpt write `eagle_config.eagle_aux_hidden_state_layer_ids` as the layers whose
    *outputs* are captured (input of the next); vLLM and speculators read a top-level one as layers whose
    inputs are. Both present must agree.
    """
    nested = (hf.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    top = hf.get("eagle_aux_hidden_state_layer_ids")
    nested = None if nested is None else tuple(
        i + 1 for i in _layer_ids(nested, "eagle_config.eagle_aux_hidden_state_layer_ids"))
    top = None if top is None else tuple(_layer_ids(top, "eagle_aux_hidden_state_layer_ids"))
    if nested is not None and top is not None and nested != top:
        raise ConfigError(f"eagle_aux_hidden_state_layer_ids={list(top)} (layer inputs) and eagle_config's "
                          f"{[i - 1 for i in nested]} (layer outputs) name different layers")
    found = top if top is not None else nested
    # in layer order, as the serving frameworks capture them (appended while walking the layers), whatever
    # order the config lists them in: listed out of order, the fc's input was permuted
    return tuple(sorted(found)) if found is not None else DraftConfig.default_feature_layers(target.num_layers)


def _speculators_layer(layer) -> dict[str, Any]:
    """A speculators config's `transformer_layer_config` with every field: speculators writes only those that
    differ from the defaults of its `model_type`'s transformers config class (Qwen3's when it names none)."""
    if not isinstance(layer, Mapping):
        raise ConfigError(f"transformer_layer_config must be a mapping of the layer's fields, got {layer!r}")
    from transformers import AutoConfig  # only speculators-format heads need transformers' defaults

    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "vocab_size", "num_hidden_layers"):  # before transformers divides by them
        if layer.get(name) is not None:
            try:
                _positive_int(layer, name)
            except ConfigError as e:
                raise ConfigError(f"transformer_layer_config: {e}") from None
    model_type = layer.get("model_type", "qwen3")
    if model_type not in ARCHITECTURES.values():
        raise ConfigError(f"transformer_layer_config.model_type={model_type!r}: supported are llama, qwen2, qwen3")
    try:
        full = AutoConfig.for_model(model_type, **{k: v for k, v in layer.items() if k != "model_type"}).to_dict()
    except Exception as e:  # transformers' checks raise their own types (huggingface_hub's, ZeroDivisionError)
        raise ConfigError(f"transformer_layer_config: {type(e).__name__}: {e}") from None
    return {**full, "model_type": model_type}


@dataclasses.dataclass(frozen=True)
class DraftConfig(_Serialised):
    """EAGLE-3 head: one decoder layer over (token embedding, fused target features).

    feature_layers: target layers whose *inputs* are concatenated (3 x target
    hidden) and projected by `fc`; EAGLE-3 uses (2, L // 2, L - 3).

    The variants below are those of heads trained outside the EAGLE-3 reference
    (the speculators library's, SpecForge's); all off is the reference's layer.
    norm_before_residual: the attention's residual is `hidden_norm(feature)`, not
    the feature. norm_output: the head's state (what deeper tree levels are fed)
    is `norm(out)`, and the logits are `lm_head(state)`. norm_before_fc: one
    RMSNorm (`input_norm`) over the concatenated features before `fc`; fc_norm:
    one per feature layer (`fc_norm/{i}`). qk_norm: per-head RMSNorm of q and k
    (Qwen3-style layers). sliding_window: a position attends to committed
    context no more than `sliding_window - 1` positions back, as vLLM runs such
    heads (a tree node from its own position; its ancestors always).
    """

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    draft_vocab_size: int
    target_hidden_size: int
    feature_layers: tuple[int, ...]
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    norm_before_residual: bool = False
    norm_output: bool = False
    norm_before_fc: bool = False
    fc_norm: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None

    def __post_init__(self):
        _check_field_types(self)
        _check_positive(self, ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                               "vocab_size", "draft_vocab_size", "target_hidden_size", "max_position_embeddings",
                               "rms_norm_eps"))
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"draft num_attention_heads ({self.num_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_kv_heads})")
        if not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ConfigError(f"draft_vocab_size {self.draft_vocab_size} must be in [1, vocab_size={self.vocab_size}]")
        if len(set(self.feature_layers)) != len(self.feature_layers) or not self.feature_layers:
            raise ConfigError(f"feature_layers must be distinct and non-empty, got {self.feature_layers}")
        if self.norm_before_fc and self.fc_norm:
            raise ConfigError("norm_before_fc and fc_norm exclude each other (one norm over the features, or one each)")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be a positive number of positions, got {self.sliding_window}")

    @classmethod
    def for_target(cls, target: ModelConfig, draft_vocab_size: int) -> "DraftConfig":
        """A head shaped like one target layer, with EAGLE-3's feature layers."""
        return cls(hidden_size=target.hidden_size, intermediate_size=target.intermediate_size,
                   num_heads=target.num_heads, num_kv_heads=target.num_kv_heads, head_dim=target.head_dim,
                   vocab_size=target.vocab_size, draft_vocab_size=draft_vocab_size,
                   target_hidden_size=target.hidden_size,
                   feature_layers=cls.default_feature_layers(target.num_layers),
                   max_position_embeddings=target.max_position_embeddings, rms_norm_eps=target.rms_norm_eps,
                   rope=target.rope)

    @staticmethod
    def default_feature_layers(num_layers: int) -> tuple[int, ...]:
        """EAGLE-3's capture points, in layer order (a layer named twice is captured once)."""
        return tuple(sorted({2, num_layers // 2, num_layers - 3} & set(range(num_layers))))

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], target: ModelConfig) -> "DraftConfig":
        """Reads a public EAGLE-3 config.json: the EAGLE-3 reference's and SpecForge's (LlamaForCausalLM-style
        fields plus `draft_vocab_size`), or the speculators library's (`speculators_model_type: eagle3`, the
        layer's fields in `transformer_layer_config`; `is_speculators` tells them apart).

        Feature layers: `eagle_config.eagle_aux_hidden_state_layer_ids` name the target layers whose outputs
        are captured (as SGLang and SpecForge write them); a top-level `eagle_aux_hidden_state_layer_ids`
        names layers whose inputs are (as vLLM and speculators read them).
        """
        if is_speculators(hf):
            return cls._from_speculators(hf, target)
        for name in ("speculators_config", "transformer_layer_config"):
            if name in hf:
                raise ConfigError(f"{name} without speculators_model_type (is this a speculators config.json?)")
        problems = []
        if hf.get("norm_output") is False:  # SpecForge's flag: False drops the norm before lm_head
            problems.append("norm_output=false (logits without the final norm)")
        if hf.get("norm_before_fc") or (hf.get("eagle_config") or {}).get("norm_before_fc"):
            problems.append("norm_before_fc=true (a norm over the features whose weight this layout does not name)")
        # Sliding-window fields copied from a target's config are ignored here, as the EAGLE reference's and
        # SpecForge's layers ignore them.
        if problems:
            raise ConfigError("unsupported EAGLE-3 head settings: " + "; ".join(problems))
        return cls._from_layer(hf, hf, target, _feature_layers(hf, target), norm_before_residual=_flag(
            hf, "norm_before_residual"), fc_norm=_flag(hf, "fc_norm"))

    @classmethod
    def _from_speculators(cls, hf: Mapping[str, Any], target: ModelConfig) -> "DraftConfig":
        kind = hf.get("speculators_model_type")
        if kind != "eagle3":
            raise ConfigError(f"speculators_model_type={kind!r}: only EAGLE-3 heads (eagle3) are supported")
        layer = _speculators_layer(hf.get("transformer_layer_config"))
        if layer.get("num_hidden_layers", 1) != 1:
            raise ConfigError(f"transformer_layer_config.num_hidden_layers={layer['num_hidden_layers']}: "
                              f"only one-layer EAGLE-3 heads are supported")
        types = layer.get("layer_types") or ["full_attention"]
        if not isinstance(types, list) or types[0] not in ("full_attention", "sliding_attention"):
            raise ConfigError(f"transformer_layer_config.layer_types={types!r}: expected a list whose first entry "
                              f"is 'full_attention' or 'sliding_attention'")
        window = None  # a sliding layer without a window attends to everything, as transformers runs it
        if types[0] == "sliding_attention" and layer.get("sliding_window") is not None:
            window = _positive_int(layer, "sliding_window")
        cfg = cls._from_layer(
            layer, hf, target, _feature_layers(hf, target),
            # vLLM's reading: heads saved before speculators wrote the flag were trained with it set
            norm_before_residual=_flag(hf, "norm_before_residual", True), norm_output=_flag(hf, "norm_output"),
            norm_before_fc=_flag(hf, "norm_before_fc"), fc_norm=_flag(hf, "fc_norm"),
            qk_norm=layer.get("model_type") == "qwen3", sliding_window=window)
        if len(cfg.feature_layers) * cfg.target_hidden_size == cfg.hidden_size:
            # `eagle3.head_forward` tells target features from the head's own states by their width (the EAGLE
            # reference's rule); speculators projects features of any width.
            raise ConfigError(f"feature layers {list(cfg.feature_layers)} give features as wide as the head "
                              f"({cfg.hidden_size}), which this library cannot tell from the head's own states")
        return cfg

    @classmethod
    def _from_layer(cls, layer: Mapping[str, Any], top: Mapping[str, Any], target: ModelConfig,
                    feature_layers: tuple[int, ...], **variant) -> "DraftConfig":
        """The config from the layer's fields (`layer`) and the head's own (`top`: draft_vocab_size,
        target_hidden_size)."""
        if layer.get("hidden_act", "silu") != "silu":  # the head's MLP is SiLU-gated, as in the EAGLE code
            raise ConfigError(f"hidden_act={layer['hidden_act']!r} (an EAGLE-3 head here is SiLU-gated only)")
        if layer.get("mlp_bias"):
            raise ConfigError("mlp_bias=true (an EAGLE-3 head's MLP has no biases)")
        num_heads = _positive_int(layer, "num_attention_heads")
        hidden = _positive_int(layer, "hidden_size")
        vocab = _positive_int(layer, "vocab_size")
        return cls(
            hidden_size=hidden,
            intermediate_size=_positive_int(layer, "intermediate_size"),
            num_heads=num_heads,
            num_kv_heads=_positive_int_or(layer, "num_key_value_heads", num_heads),
            # SpecForge's heads (Qwen3-4B: 32 heads of 128 over hidden 2560) honour head_dim; the EAGLE
            # reference ignores it, so `load_eagle3` takes the width its q_proj weight has.
            head_dim=_positive_int_or(layer, "head_dim", hidden // num_heads),
            vocab_size=vocab,
            draft_vocab_size=_positive_int_or(top, "draft_vocab_size", vocab),
            target_hidden_size=_positive_int_or(top, "target_hidden_size", hidden),
            feature_layers=feature_layers,
            max_position_embeddings=_positive_int_or(layer, "max_position_embeddings", 2048),
            rms_norm_eps=_positive_float(layer, "rms_norm_eps", 1e-6),  # LlamaConfig's default
            rope=rope_from_hf(layer),  # RoPE base 10000 when unset, as in the EAGLE code
            **variant,
        )

    def fit_problems(self, target: ModelConfig) -> list[str]:
        """What keeps this head from drafting for `target` (empty when it fits)."""
        problems = []
        if self.vocab_size != target.vocab_size:
            problems.append(f"vocab_size={self.vocab_size}, but the target's vocabulary has {target.vocab_size} tokens")
        if self.target_hidden_size != target.hidden_size:
            problems.append(f"the head takes target features of hidden size {self.target_hidden_size}, "
                            f"but the target's hidden_size is {target.hidden_size}")
        bad = [i for i in self.feature_layers if not 0 <= i < target.num_layers]
        if bad:
            n = target.num_layers
            problems.append(f"feature layers {bad} are outside the target's {n} layers (a feature layer is a layer's "
                            f"input, 0..{n - 1}, as a top-level eagle_aux_hidden_state_layer_ids names it; "
                            f"eagle_config's names outputs, -1..{n - 2}: {[i - 1 for i in bad]} there)")
        return problems

    def to_hf(self) -> dict[str, Any]:
        """config.json in the public EAGLE-3 layout (readable by the EAGLE reference code, and SpecForge where
        `fc_norm`; llama3 or yarn RoPE scaling only by vLLM, SGLang and ours: the reference allows linear and
        dynamic); raises for the variants its readers have no field for."""
        unwritable = [name for name in ("norm_before_residual", "norm_output", "norm_before_fc", "qk_norm",
                                        "sliding_window") if getattr(self, name)]
        if unwritable:
            raise ConfigError(f"the EAGLE-3 layout has no field for this head's {', '.join(unwritable)}: "
                              f"save it with save_draft (orbax) instead")
        hf = {
            "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "num_hidden_layers": 1, "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.target_hidden_size, "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings, "rope_theta": self.rope.theta,
            "tie_word_embeddings": False,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in self.feature_layers]},
        }
        if self.fc_norm:
            hf["fc_norm"] = True
        if self.rope.kind != "default":
            hf["rope_scaling"] = {"type": self.rope.kind, **self.rope.to_hf()}
        return hf


@dataclasses.dataclass(frozen=True)
class LongSpecConfig(_Serialised):
    """LongSpec draft: one layer of sliding-window self-attention (`num_heads` / `num_kv_heads` x
    `head_dim`, over the last `window` tokens), cross-attention onto the target's last-layer K/V
    (`cross_heads` query heads of the target's `target_head_dim`, grouped over its
    `target_kv_heads`) and a SwiGLU MLP. `hidden_size` and `vocab_size` are the target's (the
    embedding and LM head are shared); `rope` is the target's (the cross-attention's queries meet
    the target's rotated keys). The released LongSpec checkpoints (`convert.longspec`)
    have `attention_bias` (biases on the self-attention's q/k/v and the cross-attention's q) and
    no `final_norm` (the layer's output goes straight to the LM head)."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    cross_heads: int
    target_kv_heads: int
    target_head_dim: int
    vocab_size: int
    window: int = 512
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    attention_bias: bool = False
    final_norm: bool = True

    def __post_init__(self):
        _check_field_types(self)
        _check_positive(self, ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                               "cross_heads", "target_kv_heads", "target_head_dim", "vocab_size", "window",
                               "rms_norm_eps"))
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"LongSpec num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                              f"({self.num_kv_heads})")
        if self.cross_heads % self.target_kv_heads:
            raise ConfigError(f"LongSpec cross_heads ({self.cross_heads}) must be a multiple of the target's "
                              f"KV heads ({self.target_kv_heads})")

    @classmethod
    def for_target(cls, target: ModelConfig, window: int = 512) -> "LongSpecConfig":
        """A draft layer shaped like one of the target's layers."""
        return cls(hidden_size=target.hidden_size, intermediate_size=target.intermediate_size,
                   num_heads=target.num_heads, num_kv_heads=target.num_kv_heads, head_dim=target.head_dim,
                   cross_heads=target.num_heads, target_kv_heads=target.num_kv_heads,
                   target_head_dim=target.head_dim, vocab_size=target.vocab_size, window=window,
                   rms_norm_eps=target.rms_norm_eps, rope=target.rope)

    def fit_problems(self, target: ModelConfig) -> list[str]:
        """What keeps this draft from running on `target` (empty when it fits)."""
        checks = [("hidden_size", self.hidden_size, target.hidden_size),
                  ("vocab_size", self.vocab_size, target.vocab_size),
                  ("target_kv_heads", self.target_kv_heads, target.num_kv_heads),
                  ("target_head_dim", self.target_head_dim, target.head_dim),
                  ("rope", self.rope, target.rope)]
        return [f"{name} {mine} != the target's {theirs}" for name, mine, theirs in checks if mine != theirs]


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding parameters (static under jit).

    Tree (EAGLE-3 style): `tree_depth` draft levels, `tree_top_k` expansions per
    frontier node, `tree_nodes` best nodes verified (plus the root). The EAGLE-3
    code's `depth=7, total_token=60` counts differently: 8 levels and 59 nodes
    plus the root, `SpecConfig(tree_depth=8, tree_top_k=10, tree_nodes=59)`.
    `tree_beam` (LongSpec's beam tree): the drafter runs on every node of a level,
    not only its `tree_top_k` best, and the next level keeps the `tree_top_k**2`
    best children overall; LongSpec's [4, 16, 16, 16, 16] is
    `SpecConfig(tree_depth=5, tree_top_k=4, tree_nodes=68, tree_beam=True)`.
    Partial verification (SpecPV): the partial cache holds `sink_tokens` +
    `retrieval_tokens` (in `block_size` blocks) + `window_tokens` (at least the
    `tree_depth + 1` tokens a step commits) + a buffer of `buffer_tokens`
    (None: 20 + tree_nodes + 1) for tokens accepted in partial mode.
    `bounded_draft`: in partial steps the EAGLE-3 head, too, attends only to sink +
    the blocks retrieved for the target's last layer + its recent window, not to
    its whole cache (cheaper drafting at long context; acceptance may change).
    `offload` (modes "specpv", "exact"): the target's full cache and block summaries
    live in host memory; see `specpv_jax.offload`.
    `tree_threshold` (dynamic tree, OPT-tree's rule): a row stops drafting, before
    `tree_depth` levels, once a level raised the expected accepted length of its
    best `tree_nodes`-node tree (the sum of their path probabilities) by no more
    than this (0 drafts every level; SpecExtend's reference: 0.7 with top-k 50,
    9 levels, 50 nodes: `specextend.SPECEXTEND_TREE`).
    `full_step_cost` (mode "exact" with sampling): what a full verification step
    costs in partial ones, from which the mode plans how many tokens to hold
    provisional before a full step (`specpv.planned_cap`). The default, 1.5, is
    about Llama-3.1-8B's at 64K on a GPU (the weights and K/V bytes each step
    reads); larger batches and longer contexts raise it. On a 2-core CPU with the
    demo models at 4K a full step cost about 1.5 partial ones without re-fed
    tokens, and about 3 when it re-fed provisional tokens padded to
    `max_missing` slots, before exact mode's one-step re-feed branch
    (`specpv.refeed_sizes`; BENCHMARKS.md).
    SpecExtend's Cross-model Retrieval (small-draft modes): the draft's working
    cache holds the `draft_chunks` best `chunk_tokens`-token chunks of the
    context, re-chosen every `retrieve_every` steps by the target's attention,
    plus every token since; `draft_chunks=0` lets the draft attend to its whole
    cache (classic draft-model speculation).
    """

    tree_depth: int = 7
    tree_top_k: int = 10
    tree_nodes: int = 60
    block_size: int = 16
    sink_tokens: int = 32
    retrieval_tokens: int = 4096
    window_tokens: int = 128
    buffer_tokens: int | None = None
    bounded_draft: bool = False
    offload: bool = False
    tree_threshold: float = 0.0
    tree_beam: bool = False
    full_step_cost: float = 1.5
    chunk_tokens: int = 32
    draft_chunks: int = 32
    retrieve_every: int = 4

    def __post_init__(self):
        _check_field_types(self)
        _check_positive(self, ("tree_depth", "tree_top_k", "tree_nodes", "block_size", "chunk_tokens",
                               "retrieve_every"))
        from specpv_jax.attention import PREFIX_BLOCK

        if PREFIX_BLOCK % self.block_size:  # block summaries tile the caches, allocated in PREFIX_BLOCK multiples
            raise ConfigError(f"SpecConfig.block_size={self.block_size} must divide {PREFIX_BLOCK} "
                              f"(e.g. 8, 16, 32, 64)")
        if self.tree_nodes > self.max_tree_nodes:
            raise ConfigError(
                f"SpecConfig.tree_nodes={self.tree_nodes} exceeds the {self.max_tree_nodes} candidates a "
                f"{'beam ' if self.tree_beam else ''}tree of depth {self.tree_depth} and top_k {self.tree_top_k} "
                f"proposes")
        for name in ("sink_tokens", "retrieval_tokens", "window_tokens"):
            value = getattr(self, name)
            if value < 0 or value % self.block_size:
                raise ConfigError(f"SpecConfig.{name}={value} must be a non-negative multiple of "
                                  f"block_size={self.block_size}")
        if self.draft_chunks < 0:
            raise ConfigError(f"SpecConfig.draft_chunks must be a non-negative integer (0 = no retrieval), "
                              f"got {self.draft_chunks!r}")
        if not 0.0 <= self.tree_threshold < 1.0:
            raise ConfigError(f"SpecConfig.tree_threshold must be in [0, 1), got {self.tree_threshold!r}")
        if not 1.0 <= self.full_step_cost < float("inf"):
            raise ConfigError(f"SpecConfig.full_step_cost must be at least 1 (a full step's cost in partial "
                              f"steps), got {self.full_step_cost!r}")
        if self.buffer_tokens is not None and self.buffer_tokens < self.tree_nodes + 1:
            raise ConfigError(f"SpecConfig.buffer_tokens={self.buffer_tokens} must hold at least one tree "
                              f"(tree_nodes + 1 = {self.tree_nodes + 1})")

    def check_partial(self) -> None:
        """Raises unless partial verification (modes "specpv", "exact") can run with these settings: its window
        must hold the `tree_depth + 1` tokens a step commits (a full step scores the blocks before their keys
        are in its block summaries: retrieved, they were stale)."""
        if self.window_tokens < self.tree_depth + 1:
            enough = -(-(self.tree_depth + 1) // self.block_size) * self.block_size
            raise ConfigError(f"SpecConfig.window_tokens={self.window_tokens} must hold the tree_depth + 1 = "
                              f"{self.tree_depth + 1} tokens a step commits, e.g. {enough} (a full step scores the "
                              f"blocks before their keys are in its block summaries: retrieved, they were stale)")

    @classmethod
    def tuned(cls, target, draft, context, **options) -> "SpecConfig":
        """The tree size and partial budget that ran fastest here on `context`: a prompt (token ids) of the
        length to be run, or a length (random ids then, which draft and retrieve unlike text).

        Times short generations of a few candidates; see `specpv_jax.tuning.tune` for the options.
        """
        from specpv_jax.tuning import tune

        return tune(target, draft, context, **options)[0]

    @property
    def max_tree_nodes(self) -> int:
        """Candidates a tree proposes (top-k or beam alike): top_k at level 1, top_k**2 at each further one."""
        k, d = self.tree_top_k, self.tree_depth
        return k + (d - 1) * k * k

    @property
    def tree_branching(self) -> int:
        """The most children a node can have: `tree_top_k`, or `tree_top_k**2` in a beam tree below level 1."""
        from specpv_jax.tree import branching

        return branching(self.tree_top_k, self.tree_depth, self.tree_beam)

    @property
    def buffer_size(self) -> int:
        """Partial-cache slots for tokens accepted in partial mode: `buffer_tokens`, or 20 + tree_nodes + 1."""
        return self.buffer_tokens if self.buffer_tokens is not None else 20 + self.tree_nodes + 1

    @property
    def static_tokens(self) -> int:
        """Partial-cache tokens outside the buffer: sink + retrieval + window."""
        return self.sink_tokens + self.retrieval_tokens + self.window_tokens

    @property
    def partial_threshold(self) -> int:
        """Partial verification needs a context longer than this (sink + retrieval + window)."""
        return self.static_tokens

    def draft_working_slots(self, cache_slots: int) -> int:
        """Slots of a retrieving draft's working cache beside a `cache_slots`-slot cache of the whole sequence:
        the chosen chunks, the chunk in progress at the last retrieval, and what `retrieve_every` steps can add
        before the next, in whole chunks; never more than the whole sequence's, in whole chunks."""
        c = self.chunk_tokens
        wanted = (self.draft_chunks + 1) * c + self.retrieve_every * (self.tree_depth + 1)
        return min(-(-wanted // c), -(-cache_slots // c)) * c

    @property
    def max_missing(self) -> int:
        """Most tokens accepted in partial mode before a full verification must re-feed them."""
        return self.buffer_size - self.tree_nodes + self.tree_depth
