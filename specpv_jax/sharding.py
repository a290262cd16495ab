"""Tensor- and batch-parallel placement: a ("data", "model") device mesh and partition specs.

Attention projections are split over whole heads and the MLP over its hidden units
along "model" (Megatron-style column/row splits), the token embedding and the
LM head over the vocabulary (a lookup in the split table costs one all-reduce
of the looked-up rows); prompts and caches are split over rows along "data"
and over KV heads along "model". An axis is split only where the mesh divides
it; other arrays are replicated. XLA's SPMD partitioner then runs the same
jitted loop on every device, so sharded generation gives the same tokens as one
device in float32 (in bfloat16 split matrix products round differently: near-ties
may go the other way).
`load_target` places each parameter by `param_spec` as it reads it (by default
on `default_mesh(cfg)`: tensor parallel over whole heads, the rest data
parallel), and `generate` runs on the mesh the weights are on (`mesh_of`).

Multi-host (e.g. a TPU pod slice): call `jax.distributed.initialize()` on
every host first; `jax.devices()` then lists all hosts' devices (host by
host), `make_mesh` spans them and the default mesh keeps "model" within a host.
Every process runs the same calls; each reads the model files (a shared or
copied directory) and fills its own devices' shards.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "model")
# (module name, leaf name) -> the axis that carries "model" (negative: the same for stacked [L, ...] leaves).
_MODEL_AXIS = {
    ("q_proj", "kernel"): -1, ("k_proj", "kernel"): -1, ("v_proj", "kernel"): -1,
    ("q_proj", "bias"): -1, ("k_proj", "bias"): -1, ("v_proj", "bias"): -1,
    ("o_proj", "kernel"): -2,
    ("gate_proj", "kernel"): -1, ("up_proj", "kernel"): -1, ("down_proj", "kernel"): -2,
    ("lm_head", "kernel"): -1,  # [H, V]
    ("embed_tokens", "embedding"): -2,  # [V, H]
}


def make_mesh(data: int = 1, model: int | None = None, devices: list | None = None) -> Mesh:
    """A `("data", "model")` mesh over `devices` (default: all); `model` defaults to the devices left."""
    devices = list(devices if devices is not None else jax.devices())
    model = len(devices) // data if model is None else model
    if data < 1 or model < 1 or data * model != len(devices):
        raise ValueError(f"a {data} x {model} mesh needs {data * model} devices, {len(devices)} given")
    return Mesh(np.array(devices).reshape(data, model), AXES)


def default_shape(devices: int, cfg: Any = None, per_host: int | None = None) -> tuple[int, int]:
    """(data, model) of the default mesh over `devices`: along "model" the most devices that divide the
    query and KV heads of `cfg` (a ModelConfig; all devices without one), so that tensor parallelism splits
    whole heads (Llama-3.1-8B's 8 KV heads: 1 x 8 on eight devices, 3 x 2 on six); the rest along "data".
    per_host: devices per host when there are several hosts; "model" then stays within one (its all-reduces
    every layer would otherwise cross the network), dividing `per_host`."""
    model = _whole_head_split(devices, (cfg.num_heads, cfg.num_kv_heads) if cfg is not None else (), per_host)
    return devices // model, model


def _whole_head_split(devices: int, heads: tuple[int, ...], per_host: int | None = None) -> int:
    """The most of `devices` (dividing `per_host` too, if given) that divide every count in `heads`."""
    limit = per_host or devices
    return max(m for m in range(1, limit + 1) if devices % m == 0 and limit % m == 0 and all(h % m == 0 for h in heads))


def default_mesh(cfg: Any = None) -> Mesh | None:
    """Where `load_target` places a model of `cfg` and `generate` runs it by default: `default_shape` over
    all devices, or None on one device (nothing to split)."""
    per_host = jax.local_device_count() if jax.process_count() > 1 else None
    return make_mesh(*default_shape(jax.device_count(), cfg, per_host)) if jax.device_count() > 1 else None


def unsplit_cache_note(cfg: Any, mesh: Any, draft_cfg: Any = None) -> str | None:
    """Why `mesh` cannot split the KV cache of `cfg` (the target's) or `draft_cfg` (its draft's, if it has KV
    heads) along "model" (its model axis does not divide the KV heads: `cache_sharding` splits whole heads
    only, the projections split on), with a mesh shape that can; None when it can."""
    model = mesh.shape["model"]
    unsplit = [(who, c) for who, c in (("target", cfg), ("draft", draft_cfg))
               if getattr(c, "num_kv_heads", None) and c.num_kv_heads % model]
    if not unsplit:
        return None
    split = _whole_head_split(mesh.size, tuple(h for c in (cfg, draft_cfg) if getattr(c, "num_kv_heads", None)
                                               for h in (c.num_heads, c.num_kv_heads)))
    whose = " and ".join(f"the {who}'s {c.num_kv_heads}" for who, c in unsplit)
    which = " and ".join(who for who, _ in unsplit)
    remedy = (f"a {mesh.size // split}x{split} mesh splits whole heads" if split > 1 else
              f"no model axis over {mesh.size} devices does ({mesh.size}x1 splits the batch's rows alone; "
              f"fewer devices, sharding.make_mesh(devices=...), can split the heads)")
    return (f"a model axis of {model} does not divide {whose} KV heads: every device holds the whole {which} KV "
            f"cache{'s' * (len(unsplit) > 1)}; {remedy}")


def mesh_of(params: Any) -> Mesh | None:
    """The mesh every leaf of `params` is placed on with our axes (`shard_params`, `load_target(mesh=)`), or
    None when they are not all placed so."""
    meshes = {getattr(x.sharding, "mesh", None) if isinstance(x, jax.Array) else None
              for x in jax.tree.leaves(params)}
    mesh = meshes.pop() if len(meshes) == 1 else None
    return mesh if isinstance(mesh, Mesh) and tuple(mesh.axis_names) == AXES else None


def check_mesh(mesh: Any) -> None:
    """Raises unless `mesh` is a mesh `generate` can place arrays on: axes named `AXES`, of Auto type."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (sj.sharding.make_mesh), got {type(mesh).__name__}")
    types = _axis_types(mesh)
    if tuple(mesh.axis_names) != AXES or any(t != "Auto" for t in types):
        raise ValueError(f"mesh has axes {dict(mesh.shape)} of types {types}; generate needs axes {AXES}, in "
                         f"that order, of type Auto: sj.sharding.make_mesh(data, model, devices) makes one")


def _axis_types(mesh: Any) -> tuple[str, ...]:
    return tuple(getattr(t, "name", str(t)) for t in getattr(mesh, "axis_types", ()))


def _split(shape: tuple[int, ...], axis: int | None, name: str, mesh: Mesh) -> P:
    spec = [None] * len(shape)
    if axis is not None and shape[axis] % mesh.shape[name] == 0:
        spec[axis] = name
    return P(*spec)


def model_splits(names: tuple[str, ...], shape: tuple[int, ...], model: int, cfg: Any) -> bool:
    """Whether the parameter at key path `names` (e.g. ("layers", "mlp", "up_proj", "kernel")) of a model of
    `cfg` (a ModelConfig, DraftConfig or LongSpecConfig) is split over `model` devices along "model": it has a
    model axis, `model` divides it, and for an attention projection its heads (whole heads only: split
    mid-head, the K/V projections would have XLA re-split the cache along head_dim and gather it back at
    every read)."""
    axis = _MODEL_AXIS.get(tuple(names[-2:]))
    heads = _heads(names, cfg)
    return axis is not None and shape[axis] % model == 0 and (heads is None or heads % model == 0)


def _heads(names: tuple[str, ...], cfg: Any) -> int | None:
    """The heads along an attention projection's model axis (None for other parameters)."""
    projection = names[-2]
    if projection in ("q_proj", "o_proj"):
        return cfg.cross_heads if "cross_attn" in names else cfg.num_heads
    return cfg.num_kv_heads if projection in ("k_proj", "v_proj") else None


def param_spec(names: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh, cfg: Any) -> P:
    """The PartitionSpec of the parameter at key path `names` of a model of `cfg`."""
    spec = [None] * len(shape)
    if model_splits(names, shape, mesh.shape["model"], cfg):
        spec[_MODEL_AXIS[tuple(names[-2:])]] = "model"
    return P(*spec)


def key_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """A parameter's key path (`jax.tree_util.tree_map_with_path`'s) as names, e.g. ("mlp", "up_proj", "kernel")."""
    return tuple(getattr(k, "key", str(k)) for k in path)


def param_specs(params: Any, mesh: Mesh, cfg: Any) -> Any:
    """A PartitionSpec per parameter leaf of a model of `cfg` (same tree as `params`)."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: param_spec(key_names(path), leaf.shape, mesh, cfg),
                                            params)


def shard_params(params: Any, mesh: Mesh, cfg: Any) -> Any:
    """`params` of a model of `cfg` placed on `mesh` (a no-op for arrays already placed so)."""
    specs = param_specs(params, mesh, cfg)
    return jax.tree.map(lambda x, s: place(x, NamedSharding(mesh, s)), params, specs)


def place(x: Any, where: NamedSharding) -> Any:
    """`x` (a numpy or jax array) placed by `where`. Multi-host: a whole array in this process (read from a
    file, or restored onto one device; every process holds the same) goes into this process's shards from
    its own copy, with no transfer between processes."""
    if where.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, where)
    return jax.make_array_from_callback(x.shape, where, lambda index: x[index])


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def zeros(shape: tuple[int, ...], dtype: Any, where: NamedSharding | None = None) -> jax.Array:
    """Zeros placed by `where` (None: the default device), each shard created on its device (`jnp.zeros(device=)`
    fills one device and copies: a whole KV cache would have to fit on one device first). Made on the device,
    they pass a `jax.transfer_guard("disallow")` that eager `jnp.zeros` (a host scalar moved over) does not."""
    out = jnp.zeros(shape, dtype)
    return out if where is None else jax.lax.with_sharding_constraint(out, where)


def batch_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """Rows `[B, ...]` split along "data" (replicated when the mesh does not divide B)."""
    return NamedSharding(mesh, _split(shape, 0, "data", mesh))


def cache_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """A stacked cache `[L, B, Hkv, S, D]`: rows along "data", KV heads along "model"."""
    spec = list(_split(shape, 1, "data", mesh))
    spec[2] = _split(shape, 2, "model", mesh)[2]
    return NamedSharding(mesh, P(*spec))


def constrain_kv(x: jax.Array, heads_axis: int) -> jax.Array:
    """In jit under a context mesh of our axes (`jax.set_mesh`, as `generate` runs; else `x` unchanged): K/V `x`
    (rows at `heads_axis - 1`, KV heads at `heads_axis`) held as `cache_sharding` places caches."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or tuple(mesh.axis_names) != AXES or any(t != "Auto" for t in _axis_types(mesh)):
        return x
    rows, heads = attention_axes(mesh, x.shape[heads_axis - 1], x.shape[heads_axis])
    spec = [None] * x.ndim
    spec[heads_axis - 1], spec[heads_axis] = rows, heads
    return jax.lax.with_sharding_constraint(x, P(*spec))


def attention_axes(mesh: Any, batch: int, kv_heads: int) -> tuple[str | None, str | None]:
    """The mesh axes an attention kernel's rows and KV heads split along (None: not split), by the rule
    `cache_sharding` places caches with; a mesh without our axis names splits nothing."""
    def axis(name: str, size: int) -> str | None:
        return name if name in mesh.axis_names and size % mesh.shape[name] == 0 else None

    return axis("data", batch), axis("model", kv_heads)
