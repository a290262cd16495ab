"""Hugging Face LLaMA / Qwen2 / Qwen3 directory -> (ModelConfig, params), without torch.

Conversion is a strict table: every expected tensor is found exactly once with
the shape the config implies, every tensor in the files is used (or is a
known-redundant buffer), and nothing is loaded until all of that holds.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from specpv_jax import sharding
from specpv_jax.config import ARCHITECTURES, ConfigError, ModelConfig

SUPPORTED_DTYPES = {"F32", "F16", "BF16"}
STORED_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# Tensors some checkpoints carry that the model recomputes.
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


class ConversionError(ValueError):
    """A checkpoint that does not match its config or our table."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: HF key (with `{i}` for per-layer keys), HF shape, our path, transform."""

    hf_key: str
    hf_shape: tuple[int, ...]
    path: tuple[str, ...]
    transpose: bool = False
    per_layer: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        """Our shape of one layer's tensor: HF's `[out, in]` kernels transposed."""
        return self.hf_shape[::-1] if self.transpose else self.hf_shape


def read_json(path: pathlib.Path) -> dict:
    """The JSON object in `path`; raises naming the file when it is missing, not JSON, or not an object."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:  # a directory, unreadable
        raise ConversionError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} must hold a JSON object (field: value, ...), got a {type(data).__name__}")
    return data


def read_config(model_dir: str | pathlib.Path) -> tuple[ModelConfig, dict]:
    """ModelConfig and the raw config.json dict of an HF model directory."""
    model_dir = pathlib.Path(model_dir)
    hf = read_json(model_dir / "config.json")
    gen_path = model_dir / "generation_config.json"
    gen = read_json(gen_path) if gen_path.exists() else None
    try:
        return ModelConfig.from_hf(hf, gen), hf
    except (KeyError, TypeError, ValueError) as e:
        problem = str(e) if isinstance(e, ConfigError) else f"missing or malformed field {e}"
        where = model_dir / "config.json"
        if gen is not None and "eos_token_id" in gen and "eos_token_id" in problem:  # it overrides config.json's
            where = f"{where} (eos_token_id from {gen_path.name})"
        raise ConversionError(f"{where}: {problem}") from None


def param_table(cfg: ModelConfig) -> list[Entry]:
    """Every tensor a checkpoint of `cfg` must contain."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    table = [
        Entry("model.embed_tokens.weight", (cfg.vocab_size, h), ("embed_tokens", "embedding")),
        Entry("model.norm.weight", (h,), ("norm", "scale")),
    ]
    if not cfg.tie_word_embeddings:
        table.append(Entry("lm_head.weight", (cfg.vocab_size, h), ("lm_head", "kernel"), transpose=True))
    layer = [
        ("input_layernorm.weight", (h,), ("input_layernorm", "scale"), False),
        ("post_attention_layernorm.weight", (h,), ("post_attention_layernorm", "scale"), False),
        ("self_attn.q_proj.weight", (q, h), ("self_attn", "q_proj", "kernel"), True),
        ("self_attn.k_proj.weight", (kv, h), ("self_attn", "k_proj", "kernel"), True),
        ("self_attn.v_proj.weight", (kv, h), ("self_attn", "v_proj", "kernel"), True),
        ("self_attn.o_proj.weight", (h, q), ("self_attn", "o_proj", "kernel"), True),
        ("mlp.gate_proj.weight", (i, h), ("mlp", "gate_proj", "kernel"), True),
        ("mlp.up_proj.weight", (i, h), ("mlp", "up_proj", "kernel"), True),
        ("mlp.down_proj.weight", (h, i), ("mlp", "down_proj", "kernel"), True),
    ]
    if cfg.qkv_bias:
        layer += [(f"self_attn.{n}_proj.bias", (s,), ("self_attn", f"{n}_proj", "bias"), False)
                  for n, s in (("q", q), ("k", kv), ("v", kv))]
    if cfg.o_bias:
        layer.append(("self_attn.o_proj.bias", (h,), ("self_attn", "o_proj", "bias"), False))
    if cfg.qk_norm:
        layer += [(f"self_attn.{n}_norm.weight", (d,), ("self_attn", f"{n}_norm", "scale"), False)
                  for n in ("q", "k")]
    table += [Entry(f"model.layers.{{i}}.{key}", shape, ("layers",) + path, transpose=t, per_layer=True)
              for key, shape, path, t in layer]
    return table


def safetensors_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    """The checkpoint's weight files: `model.safetensors` when there is one (transformers' choice over an index
    beside it), else the shards the index lists, else every `*.safetensors`."""
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.exists():
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index} has no weight_map")
        bad = sorted({repr(f) for f in weight_map.values()
                      if not isinstance(f, str) or pathlib.PurePath(f).name != f or not f})
        if bad:
            raise ConversionError(f"{index}: weight_map must name shard files in {model_dir}, got {', '.join(bad)}")
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConversionError(f"{index} lists shard files that do not exist: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = (f" (found {bins}: re-save with safetensors, e.g. save_pretrained(safe_serialization=True))"
                if bins else "")
        raise ConversionError(f"no *.safetensors files in {model_dir}{hint}")
    return files


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: pathlib.Path
    shape: tuple[int, ...]
    dtype: str


def scan_headers(files: Iterable[pathlib.Path]) -> dict[str, TensorInfo]:
    """Key -> (file, shape, dtype) from the safetensors headers; reads no tensor data."""
    found: dict[str, TensorInfo] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="numpy") as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    info = TensorInfo(path, tuple(s.get_shape()), s.get_dtype())
                    if key in found:
                        raise ConversionError(f"tensor {key!r} appears twice: in {found[key].file.name} and "
                                              f"{path.name}")
                    found[key] = info
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    return found


def check_tensors(table: list[Entry], found: dict[str, TensorInfo], num_layers: int, what: str,
                  ignore: Callable[[str], bool] = lambda k: False, source: str = "config.json") -> None:
    """Raises one error listing every missing, unexpected, misshaped or unsupported-dtype tensor.

    `what` names the model in messages ("a llama model with this config").
    """
    expected = {}
    for e in table:
        keys = [e.hf_key.format(i=i) for i in range(num_layers)] if e.per_layer else [e.hf_key]
        expected.update({k: e.hf_shape for k in keys})
    problems = []
    missing = [k for k in expected if k not in found]
    if missing:
        problems.append(f"missing tensors: {_abbrev(missing)}")
    extra = [k for k in found if k not in expected and not IGNORED.match(k) and not ignore(k)]
    if extra:
        problems.append(f"unexpected tensors (not used by {what}): {_abbrev(extra)}")
    for key, shape in expected.items():
        info = found.get(key)
        if info is None:
            continue
        if info.shape != shape:
            problems.append(f"{key}: shape {info.shape} in {info.file.name}, but {source} implies {shape}")
        if info.dtype not in SUPPORTED_DTYPES:
            problems.append(f"{key}: unsupported dtype {info.dtype} in {info.file.name} "
                            f"(supported: {', '.join(sorted(SUPPORTED_DTYPES))})")
    if problems:
        raise ConversionError(f"checkpoint does not match {source}:\n  " + "\n  ".join(problems))


def _abbrev(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


class SafetensorsReader:
    """Reads tensors by key (as numpy arrays) from a set of safetensors files (a context manager)."""

    def __init__(self, found: dict[str, TensorInfo]):
        self.found = found
        self._handles = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()

    def __call__(self, key: str) -> np.ndarray:
        path = self.found[key].file
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="numpy").__enter__()
        try:
            return self._handles[path].get_tensor(key)
        except SafetensorError as e:
            raise ConversionError(f"{path}: cannot read tensor {key!r} (truncated or corrupt?): {e}") from None


def _to_param(xp, layers: list, dtype, transpose: bool, stacked: bool):
    """HF-layout tensors (one per layer) -> our param, cast (and transposed, and stacked when `stacked`), with
    `[len(layers)]` flags: layer i is finite as stored, and after the cast. `xp`: numpy or jax.numpy."""
    x = xp.stack(layers)
    y = x.astype(dtype)
    y = xp.swapaxes(y, -1, -2) if transpose else y
    finite = lambda a: xp.isfinite(a).reshape(a.shape[0], -1).all(axis=1)  # noqa: E731
    return (y if stacked else y[0]), finite(x), finite(y)


@functools.lru_cache(maxsize=None)
def _to_param_on_device(where: NamedSharding | None):
    """`_to_param` jitted with its param placed by `where` (None: the default device). On an accelerator the
    work runs there (an 8B model's transposes would take minutes in host numpy), one compiled function per
    tensor shape; on a mesh XLA splits the inputs as the param, so no device ever holds a whole tensor."""
    return jax.jit(functools.partial(_to_param, jnp), static_argnames=("dtype", "transpose", "stacked"),
                   out_shardings=None if where is None else (where, None, None))


def _convert(layers: list[np.ndarray], dtype, transpose: bool, stacked: bool, where):
    """`_to_param`'s result with the param placed by `where` (a sharding, or None: the default device)."""
    if jax.default_backend() != "cpu":
        return _to_param_on_device(where)(layers, dtype=dtype, transpose=transpose, stacked=stacked)
    # On a CPU backend numpy does the same work with nothing to compile.
    with np.errstate(over="ignore", invalid="ignore"):  # the flags report it, naming the tensor
        value, finite_stored, finite_cast = _to_param(np, layers, dtype, transpose, stacked)
    value = np.ascontiguousarray(value)
    return (jax.device_put(value) if where is None else sharding.place(value, where)), finite_stored, finite_cast


def load_params(table: list[Entry], num_layers: int, read: Callable[[str], np.ndarray],
                found: dict[str, TensorInfo], dtype, progress: bool = True, desc: str = "converting",
                mesh: Mesh | None = None, cfg: Any = None) -> dict:
    """Reads (`read(key)`), transposes, stacks and casts every table entry into a nested param dict, placed
    on `mesh` as `sharding.param_specs` splits a model of `cfg` (None: on the default device).

    Raises ConversionError naming the file (from `found`) and key of a tensor with NaN or Inf, or of one
    with values beyond the range of `dtype`.
    """
    dtype = jnp.dtype(dtype)
    params: dict = {}
    checks = []
    total = sum(num_layers if e.per_layer else 1 for e in table)
    with tqdm(total=total, desc=desc, unit="tensor", disable=not progress) as bar:
        for e in table:
            keys = [e.hf_key.format(i=i) for i in range(num_layers)] if e.per_layer else [e.hf_key]
            layers = []
            for key in keys:
                layers.append(read(key))
                bar.update(1)
            shape = ((num_layers,) if e.per_layer else ()) + e.shape
            where = None if mesh is None else NamedSharding(mesh, sharding.param_spec(e.path, shape, mesh, cfg))
            value, finite_stored, finite_cast = _convert(layers, dtype, e.transpose, e.per_layer, where)
            checks.append((keys, finite_stored, finite_cast))
            node = params
            for name in e.path[:-1]:
                node = node.setdefault(name, {})
            node[e.path[-1]] = value
    for keys, finite_stored, finite_cast in checks:  # after the loop: no device sync per tensor
        for key, stored_ok, cast_ok in zip(keys, np.asarray(finite_stored), np.asarray(finite_cast)):
            if not stored_ok:
                raise ConversionError(f"{found[key].file}: tensor {key!r} contains NaN or Inf")
            if not cast_ok:
                raise ConversionError(f"{found[key].file}: tensor {key!r} has values beyond the range of "
                                      f"{dtype.name}; load it in a wider dtype")
    return params


DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16",
                 "half": "float16"}


def check_dtype(dtype) -> jnp.dtype:
    """`dtype` (a name such as "bfloat16" or "bf16", or a dtype) as a supported parameter dtype."""
    try:
        resolved = jnp.dtype(DTYPE_ALIASES.get(dtype, dtype) if isinstance(dtype, str) else dtype)
    except TypeError:
        resolved = None
    if resolved not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ConversionError(f"unsupported parameter dtype {str(dtype)!r}: use float32, bfloat16 or float16")
    return resolved


def stored_dtype(found: dict) -> str | None:
    """The one floating dtype ("float32", "bfloat16", "float16") the tensors `scan_headers` found are stored in;
    None for a mix or another type."""
    stored = {info.dtype for key, info in found.items() if not IGNORED.match(key)}
    return STORED_DTYPES.get(stored.pop()) if len(stored) == 1 else None


def load_hf_model(model_dir: str | pathlib.Path, dtype="float32", progress: bool = True,
                  mesh: Mesh | None = None) -> tuple[ModelConfig, dict]:
    """Converts an HF model directory into `(ModelConfig, params)`; dtype None keeps the stored one (float32
    where tensors are stored in different dtypes: it holds every value); params placed on `mesh` (`load_params`).

    Raises ConversionError naming the file and key for any mismatch, before
    reading tensor data.
    """
    model_dir = pathlib.Path(model_dir)
    cfg, _ = read_config(model_dir)
    found = scan_headers(safetensors_files(model_dir))
    if "fc.weight" in found and "model.embed_tokens.weight" not in found:  # EAGLE-1/2's config.json is LLaMA's
        raise ConversionError(f"{model_dir} holds an EAGLE-1/2 draft head (fc.weight, layers.0.*), not a LLaMA/Qwen "
                              f"model: only EAGLE-3 heads are supported")
    dtype = check_dtype(dtype or stored_dtype(found) or "float32")
    stored_layers = 1 + max((int(m[1]) for k in found if (m := re.match(r"model\.layers\.(\d+)\.", k))), default=-1)
    if stored_layers != cfg.num_layers:  # (checked first: listing every missing layer's keys could take hours)
        held = f"model.layers.0 to {stored_layers - 1}" if stored_layers else "no model.layers.*"
        raise ConversionError(f"{model_dir / 'config.json'} says num_hidden_layers={cfg.num_layers}, but the "
                              f"weights hold {held}")
    table = param_table(cfg)
    tied_head = cfg.tie_word_embeddings and "lm_head.weight" in found
    # A tied model's stored copy of the embedding as lm_head is redundant; a different head is not.
    check_tensors(table, found, cfg.num_layers, f"a {cfg.arch} model with this config",
                  ignore=lambda k: tied_head and k == "lm_head.weight", source=str(model_dir / "config.json"))
    with SafetensorsReader(found) as read:
        if tied_head and not _same_tensor(read("lm_head.weight"), read("model.embed_tokens.weight")):
            raise ConversionError(
                f"{model_dir / 'config.json'} sets tie_word_embeddings=true, but {found['lm_head.weight'].file.name} "
                f"holds an lm_head.weight that differs from model.embed_tokens.weight: set tie_word_embeddings "
                f"to false to use the stored head, or remove it to use the embedding")
        return cfg, load_params(table, cfg.num_layers, read, found, dtype, progress, mesh=mesh, cfg=cfg)


def _same_tensor(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype == b.dtype:  # bitwise: no float32 copy of a vocabulary-sized matrix
        return a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))
    return a.shape == b.shape and np.array_equal(a.astype(np.float32), b.astype(np.float32))


def hf_config(cfg: ModelConfig) -> dict:
    """A transformers-readable config.json dict for `cfg` (the inverse of `ModelConfig.from_hf`); raises for a
    `cfg` whose attention flags its architecture cannot express."""
    arch = {v: k for k, v in ARCHITECTURES.items()}[cfg.arch]
    expressible = {"qwen2": (True, False, False), "qwen3": (cfg.qkv_bias, cfg.qkv_bias, True),
                   "llama": (cfg.qkv_bias, cfg.qkv_bias, False)}[cfg.arch]
    if (cfg.qkv_bias, cfg.o_bias, cfg.qk_norm) != expressible:
        raise ConversionError(f"{arch} has no layout for qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}, "
                              f"qk_norm={cfg.qk_norm} (ModelConfig(arch={cfg.arch!r}) needs "
                              f"(qkv_bias, o_bias, qk_norm) = {expressible})")
    rope = cfg.rope.to_hf()
    out = {
        "architectures": [arch], "model_type": cfg.arch, "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "rope_parameters": rope,
        # Hub checkpoints and transformers 4 read these two instead of rope_parameters.
        "rope_theta": cfg.rope.theta, "rope_scaling": None if cfg.rope.kind == "default" else rope,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids) or None,
        "pad_token_id": cfg.pad_token_id,
    }
    if cfg.arch != "qwen2":
        out["attention_bias"] = cfg.qkv_bias
    return out


def table_to_tensors(table: list[Entry], params: dict, num_layers: int) -> dict:
    """The inverse of `load_params`: HF key -> numpy array (torch layout) for every table entry."""
    tensors = {}
    for e in table:
        node = params
        for name in e.path:
            node = node[name]
        for i in range(num_layers) if e.per_layer else [None]:
            x = np.asarray(node[i] if i is not None else node)
            tensors[e.hf_key.format(i=i)] = np.ascontiguousarray(x.T if e.transpose else x)
    return tensors


def write_safetensors_dir(out_dir, tensors: dict, config: dict, overwrite: bool = False) -> pathlib.Path:
    """config.json + model.safetensors, written atomically (nothing half-written on failure)."""
    from safetensors.numpy import save_file

    from specpv_jax.checkpoint import atomic_directory

    out = pathlib.Path(out_dir).resolve()
    with atomic_directory(out, overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return out


def export_hf(out_dir: str | pathlib.Path, cfg: ModelConfig, params: dict, overwrite: bool = False) -> pathlib.Path:
    """Writes `params` as a Hugging Face directory (config.json + model.safetensors), atomically.

    The result loads with `transformers` (`AutoModelForCausalLM.from_pretrained`) and with `load_target`.
    """
    config = hf_config(cfg)  # first: it refuses a config transformers has no layout for
    return write_safetensors_dir(out_dir, table_to_tensors(param_table(cfg), params, cfg.num_layers), config,
                                 overwrite)
