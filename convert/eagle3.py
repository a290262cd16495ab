"""Public EAGLE-3 head checkpoints <-> (DraftConfig, params, d2t).

The public layout (e.g. the EAGLE-3 heads for Llama-3.1-8B-Instruct): an
HF-style config.json with `draft_vocab_size`, and `pytorch_model.bin` or
`model.safetensors` holding `fc.weight`, `midlayer.*`, `norm.weight`,
`lm_head.weight`, `d2t` (draft id -> target id offset), `t2d` (target ids in
the draft vocabulary) and sometimes `embed_tokens.weight`. The speculators
library's layout (e.g. the `*-speculator.eagle3` heads vLLM serves) names the
layer `layers.0.*` and nests its fields in config.json's
`transformer_layer_config`; `DraftConfig.from_hf` reads both.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from convert.hf import (ConversionError, Entry, TensorInfo, check_dtype, check_tensors, load_params, read_json,
                        scan_headers, table_to_tensors, write_safetensors_dir)
from specpv_jax.config import ConfigError, DraftConfig, ModelConfig, is_speculators
from specpv_jax.draft.eagle3 import d2t_problem

TORCH_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
                "bool": "BOOL"}


def head_table(cfg: DraftConfig, speculators: bool = False) -> list[Entry]:
    """The head's tensors: in the EAGLE-3 reference's layout (its layer is `midlayer.*`) or, with
    `speculators`, the speculators library's (`layers.0.*`). Our parameter paths are the same in both."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    n_in = len(cfg.feature_layers) * cfg.target_hidden_size
    mid, key = "midlayer", _layer_key(speculators)
    table = [
        Entry("fc.weight", (h, n_in), ("fc", "kernel"), transpose=True),
        Entry(f"{key}.input_layernorm.weight", (h,), (mid, "input_layernorm", "scale")),
        Entry(f"{key}.hidden_norm.weight", (h,), (mid, "hidden_norm", "scale")),
        Entry(f"{key}.post_attention_layernorm.weight", (h,), (mid, "post_attention_layernorm", "scale")),
        Entry(f"{key}.self_attn.q_proj.weight", (q, 2 * h), (mid, "self_attn", "q_proj", "kernel"), transpose=True),
        Entry(f"{key}.self_attn.k_proj.weight", (kv, 2 * h), (mid, "self_attn", "k_proj", "kernel"), transpose=True),
        Entry(f"{key}.self_attn.v_proj.weight", (kv, 2 * h), (mid, "self_attn", "v_proj", "kernel"), transpose=True),
        Entry(f"{key}.self_attn.o_proj.weight", (h, q), (mid, "self_attn", "o_proj", "kernel"), transpose=True),
        Entry(f"{key}.mlp.gate_proj.weight", (i, h), (mid, "mlp", "gate_proj", "kernel"), transpose=True),
        Entry(f"{key}.mlp.up_proj.weight", (i, h), (mid, "mlp", "up_proj", "kernel"), transpose=True),
        Entry(f"{key}.mlp.down_proj.weight", (h, i), (mid, "mlp", "down_proj", "kernel"), transpose=True),
        Entry("norm.weight", (h,), ("norm", "scale")),
        Entry("lm_head.weight", (cfg.draft_vocab_size, h), ("lm_head", "kernel"), transpose=True),
    ]
    if cfg.qk_norm:
        table += [Entry(f"{key}.self_attn.{name}.weight", (d,), (mid, "self_attn", name, "scale"))
                  for name in ("q_norm", "k_norm")]
    if cfg.norm_before_fc:
        table.append(Entry("input_norm.weight", (n_in,), ("input_norm", "scale")))
    if cfg.fc_norm:
        table += [Entry(f"fc_norm.{j}.weight", (cfg.target_hidden_size,), ("fc_norm", str(j), "scale"))
                  for j in range(len(cfg.feature_layers))]
    return table


def _layer_key(speculators: bool) -> str:
    return "layers.0" if speculators else "midlayer"


def read_state(head_dir: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, TensorInfo]]:
    """All tensors of a head checkpoint (it is small) and their header facts."""
    files = sorted(head_dir.glob("*.safetensors"))
    if files:
        for key, info in scan_headers(files).items():  # a key in two files, an unreadable file: named here
            _check_readable(key, info.dtype, info.file)
        tensors = {}
        for path in files:
            try:
                with safe_open(str(path), framework="numpy") as f:
                    tensors.update({k: (f.get_tensor(k), path) for k in f.keys()})
            except SafetensorError as e:
                raise ConversionError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    elif (head_dir / "pytorch_model.bin").exists():
        tensors = _read_torch_bin(head_dir / "pytorch_model.bin")
    else:
        raise ConversionError(f"no model.safetensors or pytorch_model.bin in {head_dir}")
    infos = {k: TensorInfo(p, tuple(x.shape), _dtype_name(x.dtype)) for k, (x, p) in tensors.items()}
    return {k: x for k, (x, _) in tensors.items()}, infos


def _read_torch_bin(path: pathlib.Path) -> dict:
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path} is a torch pickle: reading it needs torch installed "
                              "(or re-save the head as model.safetensors)") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for damaged pickles
        raise ConversionError(f"{path}: cannot read the torch checkpoint (truncated or corrupt?): {e}") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ConversionError(f"{path}: expected a flat state dict (tensor name -> tensor), as "
                              f"torch.save(model.state_dict()) writes")
    out = {}
    for k, t in state.items():
        name = str(t.dtype).removeprefix("torch.")
        _check_readable(k, TORCH_DTYPES.get(name, name), path)
        out[k] = (t.float().numpy().astype(jnp.bfloat16) if name == "bfloat16" else t.numpy(), path)
    return out


def _check_readable(key: str, dtype: str, path: pathlib.Path) -> None:
    """Raises naming a tensor stored in a dtype a head cannot hold (fp8, say), before it is read."""
    if dtype not in TORCH_DTYPES.values():
        raise ConversionError(f"{path}: tensor {key!r} has dtype {dtype}, which an EAGLE-3 head cannot be read "
                              f"from (supported: {', '.join(sorted(TORCH_DTYPES.values()))})")


def _dtype_name(dtype) -> str:
    return TORCH_DTYPES.get(jnp.dtype(dtype).name, jnp.dtype(dtype).name.upper())


def check_fits_target(cfg: DraftConfig, target: ModelConfig, where: str) -> None:
    """Raises naming every way the head does not fit the target."""
    problems = cfg.fit_problems(target)
    if problems:
        raise ConversionError(f"{where}: this EAGLE-3 head does not fit the target: " + "; ".join(problems))


def check_embedding(cfg: DraftConfig, target: ModelConfig, own_embedding: bool, where: str) -> None:
    """A head narrower or wider than its target must bring its own token embedding (it cannot use the target's)."""
    if cfg.hidden_size != target.hidden_size and not own_embedding:
        raise ConversionError(f"{where}: this EAGLE-3 head has hidden size {cfg.hidden_size}, the target "
                              f"{target.hidden_size}, and it stores no embed_tokens of its own to embed tokens with")


def _attention_width(cfg: DraftConfig, hf: dict, infos: dict[str, TensorInfo]) -> DraftConfig:
    """`cfg` with head_dim = q_proj's rows / heads where the weights say (whether a config's head_dim is used
    varies)."""
    q = infos.get(f"{_layer_key(is_speculators(hf))}.self_attn.q_proj.weight")
    if q is not None and len(q.shape) == 2 and q.shape[0] % cfg.num_heads == 0:
        return dataclasses.replace(cfg, head_dim=q.shape[0] // cfg.num_heads)
    return cfg


def head_config(head_dir: str | os.PathLike, target: ModelConfig) -> DraftConfig:
    """The config of a public-layout EAGLE-3 head directory, checked to fit `target`, its attention width read
    off q_proj in the safetensors headers (no tensor data read; a torch pickle's is known once `load_eagle3`
    reads it)."""
    head_dir = pathlib.Path(head_dir)
    try:
        hf = read_json(head_dir / "config.json")
        cfg = DraftConfig.from_hf(hf, target)
    except (KeyError, TypeError) as e:
        raise ConversionError(f"{head_dir / 'config.json'}: missing or malformed field {e}") from None
    except ConfigError as e:
        raise ConversionError(f"{head_dir / 'config.json'}: {e}") from None
    cfg = _attention_width(cfg, hf, scan_headers(sorted(head_dir.glob("*.safetensors"))))
    check_fits_target(cfg, target, str(head_dir))
    return cfg


def load_eagle3(head_dir: str | os.PathLike, target: ModelConfig, dtype="float32",
                progress: bool = False) -> tuple[DraftConfig, dict, jax.Array]:
    """Reads a public-layout EAGLE-3 head for `target`. Returns (config, params, d2t `[V_draft]` int32)."""
    head_dir = pathlib.Path(head_dir)
    dtype = check_dtype(dtype)
    cfg = head_config(head_dir, target)  # checked before any weight is read
    hf = read_json(head_dir / "config.json")
    tensors, infos = read_state(head_dir)
    cfg = _attention_width(cfg, hf, infos)  # a torch pickle's, now known
    extras = {"d2t", "t2d", "embed_tokens.weight"}
    fc = infos.get("fc.weight")
    if fc is not None and len(fc.shape) == 2 and fc.shape[1] != len(cfg.feature_layers) * target.hidden_size:
        raise ConversionError(
            f"{head_dir}: fc.weight {fc.shape} takes {fc.shape[1]} feature values, but {len(cfg.feature_layers)} "
            f"feature layers {cfg.feature_layers} of a hidden-size-{target.hidden_size} target give "
            f"{len(cfg.feature_layers) * target.hidden_size}")
    table = head_table(cfg, is_speculators(hf))
    check_tensors(table, infos, 1, "an EAGLE-3 head", ignore=lambda k: k in extras,
                  source=f"{head_dir / 'config.json'}")
    check_embedding(cfg, target, "embed_tokens.weight" in infos, str(head_dir))
    if "embed_tokens.weight" in tensors:
        shape = infos["embed_tokens.weight"].shape
        if shape != (target.vocab_size, cfg.hidden_size):
            raise ConversionError(f"{head_dir}: embed_tokens.weight has shape {shape}, expected "
                                  f"{(target.vocab_size, cfg.hidden_size)}")
        table.append(Entry("embed_tokens.weight", shape, ("embed_tokens", "embedding")))
    params = load_params(table, 1, tensors.__getitem__, infos, dtype, progress, desc="converting head")
    return cfg, params, _d2t(tensors, cfg, head_dir)


def _d2t(tensors: dict, cfg: DraftConfig, head_dir: pathlib.Path) -> jax.Array:
    if "d2t" not in tensors:
        if cfg.draft_vocab_size != cfg.vocab_size:
            raise ConversionError(f"{head_dir}: draft_vocab_size={cfg.draft_vocab_size} differs from "
                                  f"vocab_size={cfg.vocab_size}, so the checkpoint needs a d2t tensor")
        return jax.device_put(np.zeros(cfg.draft_vocab_size, np.int32))
    return check_d2t(tensors["d2t"], cfg, str(head_dir))


def check_d2t(d2t, cfg: DraftConfig, where: str) -> jax.Array:
    """The draft-to-target offsets `d2t [V_draft]` as int32 on the device, once they map every draft id into
    the target's vocabulary; raises naming `where` otherwise."""
    d2t = np.asarray(d2t)
    if d2t.shape != (cfg.draft_vocab_size,):
        raise ConversionError(f"{where}: d2t has shape {d2t.shape}, expected ({cfg.draft_vocab_size},)")
    problem = d2t_problem(d2t, cfg.vocab_size)
    if problem:
        raise ConversionError(f"{where}: {problem}")
    return jax.device_put(d2t.astype(np.int32))


def export_eagle3(out_dir: str | os.PathLike, cfg: DraftConfig, params: dict, d2t: jax.Array,
                  overwrite: bool = False) -> pathlib.Path:
    """Writes a head in the public layout (config.json + model.safetensors), atomically."""
    tensors = table_to_tensors(head_table(cfg), params, 1)
    if "embed_tokens" in params:
        tensors["embed_tokens.weight"] = np.asarray(params["embed_tokens"]["embedding"])
    d2t = np.asarray(d2t, np.int64)
    t2d = np.zeros(cfg.vocab_size, bool)
    t2d[d2t + np.arange(d2t.size)] = True
    tensors["d2t"], tensors["t2d"] = d2t, t2d
    hf = cfg.to_hf()
    if "embed_tokens" not in params and cfg.target_hidden_size == cfg.hidden_size:
        del hf["target_hidden_size"]  # with it, the EAGLE reference keeps a random table, not the target's
    return write_safetensors_dir(out_dir, tensors, hf, overwrite)
