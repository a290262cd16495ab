"""LongSpec drafts: the released checkpoints, and a documented layout of our own.

Released LongSpec drafts (sail-sg/LongSpec, e.g. `sail/longspec-Llama-3-8B-Instruct-262k`) are
the `save_pretrained` directory of their `LlamaGlideDecoderLayer` / `Qwen2GlideDecoderLayer`
(read here from their code: keys are the module paths, without a prefix):

    config.json        the target's LLaMA/Qwen2 config, "architectures": ["LlamaGlideDecoderLayer"]
    model.safetensors  input_layernorm, post_self_attention_layernorm, post_cross_attention_layernorm .weight
                       self_attn.{q,k,v}_proj.{weight,bias}, self_attn.o_proj.weight,
                       cross_attn.q_proj.{weight,bias}, cross_attn.o_proj.weight (cross_attn.{k,v}_proj exist
                       but are unused: the cross-attention reads the target's keys and values)
                       mlp.{gate,up,down}_proj.weight

Their self-attention window is 512 tokens (hard-coded there) and the layer's output goes to the
LM head without a final norm. Our own layout (what `export_longspec` writes):

    config.json        {"architectures": ["LongSpecDraft"], "longspec_config": {LongSpecConfig fields}}
    model.safetensors  torch layout ([out, in] weights), keys:
        input_layernorm.weight, cross_layernorm.weight, post_attention_layernorm.weight, norm.weight  [H]
        self_attn.{q,k,v,o}_proj.weight, cross_attn.{q,o}_proj.weight, mlp.{gate,up,down}_proj.weight
        (+ the biases above with `attention_bias`; no norm.weight without `final_norm`)

The embedding and LM head are the target's and are not stored.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re

from convert.hf import (ConversionError, Entry, SafetensorsReader, check_dtype, check_tensors, load_params, read_json,
                        scan_headers, table_to_tensors, write_safetensors_dir)
from specpv_jax.config import ConfigError, LongSpecConfig, ModelConfig, RopeConfig, rope_from_hf
from specpv_jax.draft.longspec import BIASED, NORMS

ARCHITECTURE = "LongSpecDraft"
GLIDE_WINDOW = 512
GLIDE_NORMS = {"cross_layernorm": "post_self_attention_layernorm",
               "post_attention_layernorm": "post_cross_attention_layernorm"}
GLIDE_UNUSED = re.compile(r"cross_attn\.[kv]_proj\.(weight|bias)$")


def draft_table(cfg: LongSpecConfig) -> list[Entry]:
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv, c = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.cross_heads * cfg.target_head_dim
    norms = [Entry(f"{n}.weight", (h,), (n, "scale")) for n in (NORMS if cfg.final_norm else NORMS[:-1])]
    dense = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
             "self_attn.o_proj": (h, q), "cross_attn.q_proj": (c, h), "cross_attn.o_proj": (h, c),
             "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    biases = [Entry(f"{a}.{p}.bias", dense[f"{a}.{p}"][:1], (a, p, "bias")) for a, p in BIASED]
    return norms + [Entry(f"{k}.weight", shape, tuple(k.split(".")) + ("kernel",), transpose=True)
                    for k, shape in dense.items()] + (biases if cfg.attention_bias else [])


def glide_table(cfg: LongSpecConfig) -> list[Entry]:
    """`draft_table` under the released checkpoints' key names."""
    def released(key: str) -> str:
        name, _, rest = key.partition(".")
        return f"{GLIDE_NORMS.get(name, name)}.{rest}"
    return [dataclasses.replace(e, hf_key=released(e.hf_key)) for e in draft_table(cfg)]


def glide_config(hf: dict, target: ModelConfig, source: str = "config.json") -> LongSpecConfig:
    """The `LongSpecConfig` of a released draft whose config.json is `hf` (the target's config)."""
    try:
        heads = int(hf["num_attention_heads"])
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        head_dim = int(hf["hidden_size"]) // heads  # as their attention computes it
        return LongSpecConfig(hidden_size=int(hf["hidden_size"]), intermediate_size=int(hf["intermediate_size"]),
                              num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, cross_heads=heads,
                              target_kv_heads=kv_heads, target_head_dim=head_dim, vocab_size=int(hf["vocab_size"]),
                              window=GLIDE_WINDOW, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                              rope=_glide_rope(hf, target), attention_bias=True, final_norm=False)
    except KeyError as e:
        raise ConversionError(f"{source}: missing field {e}") from None
    except (ConfigError, TypeError, ValueError) as e:
        raise ConversionError(f"{source}: {e}") from None


def _glide_rope(hf: dict, target: ModelConfig) -> RopeConfig:
    """The RoPE a released draft's config.json states, for `fit_problems` to compare with the target's (its
    config is the target's, re-labelled): all of it where it has a rope_scaling/rope_parameters block, else
    its rope_theta over the target's scaling; the target's where it states nothing."""
    if hf.get("rope_scaling") or hf.get("rope_parameters"):
        return rope_from_hf(hf)
    if hf.get("rope_theta") is not None:
        return dataclasses.replace(target.rope, theta=float(hf["rope_theta"]))
    return target.rope


def _architectures(path: pathlib.Path) -> list[str]:
    config = path / "config.json"
    return [str(a) for a in read_json(config).get("architectures") or []] if config.is_file() else []


def is_glide_dir(path: pathlib.Path) -> bool:
    """A released LongSpec draft (`LlamaGlideDecoderLayer`, `Qwen2GlideDecoderLayer`)."""
    return any(a.endswith("GlideDecoderLayer") for a in _architectures(path))


def is_longspec_dir(path: pathlib.Path) -> bool:
    """A LongSpec draft directory in either layout."""
    return ARCHITECTURE in _architectures(path) or is_glide_dir(path)


def export_longspec(out_dir: str | os.PathLike, cfg: LongSpecConfig, params: dict,
                    overwrite: bool = False) -> pathlib.Path:
    """Writes a LongSpec draft (config.json + model.safetensors), atomically."""
    config = {"architectures": [ARCHITECTURE], "longspec_config": cfg.to_dict()}
    return write_safetensors_dir(out_dir, table_to_tensors(draft_table(cfg), params, 1), config, overwrite)


def longspec_config(draft_dir: str | os.PathLike, target: ModelConfig) -> LongSpecConfig:
    """The config of a LongSpec draft directory (released or our layout), checked to fit `target`."""
    draft_dir = pathlib.Path(draft_dir)
    source = draft_dir / "config.json"
    hf = read_json(source)
    if is_glide_dir(draft_dir):
        cfg = glide_config(hf, target, str(source))
    else:
        try:
            cfg = LongSpecConfig.from_dict(hf["longspec_config"])
        except (KeyError, TypeError) as e:
            raise ConversionError(f"{source}: missing or malformed field {e}") from None
        except ConfigError as e:
            raise ConversionError(f"{source}: {e}") from None
    problems = cfg.fit_problems(target)
    if problems:
        raise ConversionError(f"{draft_dir}: this LongSpec draft does not fit the target: " + "; ".join(problems))
    return cfg


def load_longspec(draft_dir: str | os.PathLike, target: ModelConfig, dtype="float32",
                  progress: bool = False) -> tuple[LongSpecConfig, dict]:
    """Reads a LongSpec draft directory (released or our layout) for `target`. Returns (config, params)."""
    draft_dir = pathlib.Path(draft_dir)
    dtype = check_dtype(dtype)
    cfg = longspec_config(draft_dir, target)
    if is_glide_dir(draft_dir):
        table, ignore = glide_table(cfg), GLIDE_UNUSED.search
    else:
        table, ignore = draft_table(cfg), lambda key: False
    files = sorted(draft_dir.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"no model.safetensors in {draft_dir}")
    infos = scan_headers(files)
    check_tensors(table, infos, 1, "a LongSpec draft", ignore, source=str(draft_dir / "config.json"))
    with SafetensorsReader(infos) as read:
        params = load_params(table, 1, read, infos, dtype, progress, desc="converting draft")
    return cfg, params
