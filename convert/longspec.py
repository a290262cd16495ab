"""LongSpec drafts <-> a documented directory layout of our own.

The released LongSpec checkpoints' key names are not documented in a form we
could verify, so drafts are exported and imported in this layout:

    config.json        {"architectures": ["LongSpecDraft"], "longspec_config": {LongSpecConfig fields}}
    model.safetensors  torch layout ([out, in] weights), keys:
        input_layernorm.weight, cross_layernorm.weight, post_attention_layernorm.weight, norm.weight  [H]
        self_attn.{q,k,v,o}_proj.weight, cross_attn.{q,o}_proj.weight, mlp.{gate,up,down}_proj.weight

The embedding and LM head are the target's and are not stored.
"""

from __future__ import annotations

import os
import pathlib

from convert.hf import (ConversionError, Entry, SafetensorsReader, check_dtype, check_tensors, load_params, read_json,
                        scan_headers, table_to_tensors, write_safetensors_dir)
from specpv_jax.config import ConfigError, LongSpecConfig, ModelConfig

ARCHITECTURE = "LongSpecDraft"


def draft_table(cfg: LongSpecConfig) -> list[Entry]:
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv, c = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.cross_heads * cfg.target_head_dim
    norms = [Entry(f"{n}.weight", (h,), (n, "scale"))
             for n in ("input_layernorm", "cross_layernorm", "post_attention_layernorm", "norm")]
    dense = [("self_attn.q_proj", (q, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
             ("self_attn.o_proj", (h, q)), ("cross_attn.q_proj", (c, h)), ("cross_attn.o_proj", (h, c)),
             ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)), ("mlp.down_proj", (h, i))]
    return norms + [Entry(f"{k}.weight", shape, tuple(k.split(".")) + ("kernel",), transpose=True)
                    for k, shape in dense]


def is_longspec_dir(path: pathlib.Path) -> bool:
    config = path / "config.json"
    return config.is_file() and ARCHITECTURE in (read_json(config).get("architectures") or [])


def export_longspec(out_dir: str | os.PathLike, cfg: LongSpecConfig, params: dict,
                    overwrite: bool = False) -> pathlib.Path:
    """Writes a LongSpec draft (config.json + model.safetensors), atomically."""
    config = {"architectures": [ARCHITECTURE], "longspec_config": cfg.to_dict()}
    return write_safetensors_dir(out_dir, table_to_tensors(draft_table(cfg), params, 1), config, overwrite)


def load_longspec(draft_dir: str | os.PathLike, target: ModelConfig, dtype="float32",
                  progress: bool = False) -> tuple[LongSpecConfig, dict]:
    """Reads a LongSpec draft directory for `target`. Returns (config, params)."""
    draft_dir = pathlib.Path(draft_dir)
    dtype = check_dtype(dtype)
    source = draft_dir / "config.json"
    try:
        cfg = LongSpecConfig.from_dict(read_json(source)["longspec_config"])
    except (KeyError, TypeError) as e:
        raise ConversionError(f"{source}: missing or malformed field {e}") from None
    except ConfigError as e:
        raise ConversionError(f"{source}: {e}") from None
    problems = cfg.fit_problems(target)
    if problems:
        raise ConversionError(f"{draft_dir}: this LongSpec draft does not fit the target: " + "; ".join(problems))
    files = sorted(draft_dir.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"no model.safetensors in {draft_dir}")
    infos = scan_headers(files)
    table = draft_table(cfg)
    check_tensors(table, infos, 1, "a LongSpec draft", source=str(source))
    with SafetensorsReader(infos) as read:
        params = load_params(table, 1, read, dtype, progress, desc="converting draft")
    return cfg, params
