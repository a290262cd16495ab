"""Memory estimates per mode, before anything is allocated (`specpv-jax plan`, and `generate`'s check).

Counts the arrays the engine allocates: weights, the target's full KV cache
(rounded up to whole attention blocks), SpecPV's partial cache and block
summaries, the drafts' caches (the EAGLE-3 head's bounded one too), and the
largest transient (verification logits, a prefill chunk's activations).
"host" is what SpecPV's offload (`SpecConfig(offload=True)`, see `offload`)
moves to host memory: the full cache and its block summaries, in the
partial-verification modes; with it the device holds `Estimate.device` (plus
"offload staging": two layers of the full cache, moved in during full
verification, and "offload kept": what that step keeps of each layer to rebuild
the partial cache). On a `data x model` mesh (`mesh_shape`) the parts are one
device's, as `sharding` places them: weights split along "model" where it
divides them, caches along "model" where it divides their KV heads and along
"data" where it divides the rows; activations only along "data" (how XLA splits
a step's temporaries along "model" is left uncounted: the estimate errs high).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any, Mapping

import jax
import numpy as np

from specpv_jax import offload, sharding
from specpv_jax.attention import read_block
from specpv_jax.cache import allocated_slots, blocks_spanned
from specpv_jax.config import (EAGLE3_MODES, MODES, PARTIAL_MODES, DraftConfig, LongSpecConfig, ModelConfig,
                               SpecConfig, is_integer)
from specpv_jax.loop import output_bucket
from specpv_jax.prompts import bucket_length
from specpv_jax.tree import frontier_widths


def param_count(cfg: ModelConfig, model: int = 1) -> int:
    """Parameters of a model of `cfg` (every tensor a checkpoint of it holds) that one device holds when
    `model` devices along "model" split them (`sharding.param_spec`: only where `model` divides)."""
    return sum(n * (cfg.num_layers if per_layer else 1) for n, per_layer in _tensor_sizes(cfg, model))


def placed_count(params: Any, cfg: Any, model: int = 1) -> int:
    """Elements of the parameter tree `params` (arrays or `jax.ShapeDtypeStruct`s) of a model of `cfg` that one
    device holds when `model` devices along "model" split them (`sharding.param_spec`)."""
    def on_one_device(path, x):
        return x.size // (model if sharding.model_splits(sharding.key_names(path), x.shape, model, cfg) else 1)

    return sum(jax.tree.leaves(jax.tree_util.tree_map_with_path(on_one_device, params)))


@functools.lru_cache(maxsize=32)
def draft_param_count(draft_cfg: ModelConfig | DraftConfig | LongSpecConfig, model: int = 1) -> int:
    """Parameters of a draft of `draft_cfg` (a small draft's, an EAGLE-3 head's or a LongSpec draft's) that one
    device holds when `model` devices along "model" split them. An EAGLE-3 head as wide as its target embeds
    tokens with the target's table; a narrower or wider one brings its own (`convert.eagle3.check_embedding`)."""
    from specpv_jax.draft import eagle3, longspec

    if isinstance(draft_cfg, ModelConfig):
        return param_count(draft_cfg, model)
    init = eagle3.init_params if isinstance(draft_cfg, DraftConfig) else longspec.init_params
    shapes = jax.eval_shape(lambda: init(draft_cfg, jax.random.key(0)))
    if isinstance(draft_cfg, DraftConfig) and draft_cfg.hidden_size != draft_cfg.target_hidden_size:
        table = (draft_cfg.vocab_size, draft_cfg.hidden_size)
        shapes["embed_tokens"] = {"embedding": jax.ShapeDtypeStruct(table, np.float32)}
    return placed_count(shapes, draft_cfg, model)


def layer_param_count(cfg: ModelConfig, model: int = 1) -> int:
    """Parameters of one decoder layer of `cfg` (on one of `model` devices along "model")."""
    return sum(n for n, per_layer in _tensor_sizes(cfg, model) if per_layer)


def _tensor_sizes(cfg: ModelConfig, model: int = 1) -> list[tuple[int, bool]]:
    """(elements on one device of `model` along "model", per layer) of each tensor of `cfg`."""
    from convert.hf import param_table

    return [(int(np.prod(e.shape)) // (model if sharding.model_splits(e.path, e.shape, model, cfg) else 1), e.per_layer)
            for e in param_table(cfg)]


def step_tokens(spec: SpecConfig, mode: str) -> int:
    """Tokens one verification feeds the target at most: the tree (root included), and in the
    partial-verification modes the re-fed tokens of a full step before it."""
    tree = 1 if mode == "ar" else spec.tree_nodes + 1
    return tree + (spec.max_missing if mode in PARTIAL_MODES else 0)


def loop_mode(spec: SpecConfig, mode: str, prompt_len: int, max_new_tokens: int) -> str:
    """The decode loop a call of `mode` runs: "specpv" and "exact" on a context that can never grow past
    `spec.partial_threshold` run the "eagle" loop (every step of theirs would be a full verification), without
    a partial cache, block summaries or retrieval to allocate and compile; with `offload` too, its cache on the
    device (smaller there than offload's partial cache, summaries and staging)."""
    if mode in PARTIAL_MODES and prompt_len + output_bucket(max_new_tokens) <= spec.partial_threshold:
        return "eagle"
    return mode


def cache_length(spec: SpecConfig, mode: str, prompt_len: int, max_new_tokens: int) -> int:
    """Positions the target's cache needs: the prompt (bucket), the output bucket, and the scratch of
    one verification beyond them."""
    length = prompt_len + output_bucket(max_new_tokens) + step_tokens(spec, mode)
    if mode in PARTIAL_MODES:  # block retrieval needs at least a partial cache's worth of blocks
        length = max(length, spec.static_tokens + spec.block_size)
    return length


def kv_bytes(layers: int, batch: int, kv_heads: int, slots: int, head_dim: int, itemsize: int) -> int:
    return 2 * layers * batch * kv_heads * allocated_slots(slots) * head_dim * itemsize


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes by part; `device` and `host` totals (host: what offload keeps in host memory)."""

    mode: str
    parts: dict[str, int]
    host_parts: tuple[str, ...]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def host(self) -> int:
        return sum(v for k, v in self.parts.items() if k in self.host_parts)

    @property
    def device(self) -> int:
        """Device bytes with offload (the parts not in host memory)."""
        return self.total - self.host


def estimate(cfg: ModelConfig, context: int, new_tokens: int = 256, batch: int = 1, mode: str = "ar",
             spec: SpecConfig | None = None, dtype: str = "bfloat16",
             draft_cfg: ModelConfig | DraftConfig | LongSpecConfig | None = None, prefill_chunk: int = 512,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             mesh_shape: tuple[int, int] = (1, 1), draft_params: Any = None) -> Estimate:
    """Memory a `generate` call of `batch` prompts of `context` tokens needs, by part; on a `(data, model)`
    mesh (`mesh_shape`), what one device of it holds.

    draft_cfg: the draft's config: the small draft's for "specextend" (required), the EAGLE-3 head's for
    the EAGLE-3 modes (default `DraftConfig.for_target` with the target's vocabulary), the LongSpec draft's
    for "longspec" (default `LongSpecConfig.for_target`). Sampling (`temperature` > 0) holds probabilities
    beside the logits, a top-p or top-k filter (`top_p` < 1, `top_k` > 0) also their sorted copy and its sums.
    draft_params: the draft's parameter tree (arrays or `jax.ShapeDtypeStruct`s), where it is loaded: its
    weights and caches are then counted at its dtype (a float32 draft beside a bfloat16 target) and with the
    leaves it has (an EAGLE-3 head's own embedding table); default: a draft of `draft_cfg` in `dtype`.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (modes: {', '.join(MODES)})")
    counts = {"context": (context, 1), "new_tokens": (new_tokens, 0), "batch": (batch, 1),
              "prefill_chunk": (prefill_chunk, 1), "mesh_shape[0]": (mesh_shape[0], 1),
              "mesh_shape[1]": (mesh_shape[1], 1)}
    for name, (n, least) in counts.items():
        if not is_integer(n) or n < least:
            raise ValueError(f"estimate: {name} must be an integer >= {least}, got {n!r}")
    if not jax.numpy.issubdtype(jax.numpy.dtype(dtype), jax.numpy.floating):
        raise ValueError(f"estimate: dtype must be a floating type, got {dtype!r}")
    if mode == "specextend" and draft_cfg is None:
        raise ValueError("mode 'specextend' needs the small draft's config (draft_cfg)")
    spec = spec or SpecConfig()
    context = bucket_length(context, prefill_chunk)  # generate pads each prompt to its bucket and sizes for that
    label, mode = mode, loop_mode(spec, mode, context, new_tokens)
    size = np.dtype(jax.numpy.dtype(dtype)).itemsize
    h, v = cfg.hidden_size, cfg.vocab_size
    tree = step_tokens(spec, mode)
    slots = cache_length(spec, mode, context, new_tokens)
    data, model = mesh_shape
    rows = data if batch % data == 0 else 1

    draft_size = size if draft_params is None else np.dtype(jax.tree.leaves(draft_params)[0].dtype).itemsize

    def kv(layers: int, slots: int, kv_heads: int = cfg.num_kv_heads, head_dim: int = cfg.head_dim,
           itemsize: int = size) -> int:
        """One device's share of a stacked cache: rows along "data", KV heads along "model" where they divide."""
        heads = model if kv_heads % model == 0 else 1
        return kv_bytes(layers, batch, kv_heads, slots, head_dim, itemsize) // (rows * heads)

    def draft_weights(d) -> int:
        count = draft_param_count(d, model) if draft_params is None else placed_count(draft_params, d, model)
        return count * draft_size

    parts = {"weights": param_count(cfg, model) * size, "full cache": kv(cfg.num_layers, slots)}
    if mode in EAGLE3_MODES:
        d = draft_cfg or DraftConfig.for_target(cfg, v)
        parts["draft weights"] = draft_weights(d)
        parts["draft cache"] = kv(1, slots, d.num_kv_heads, d.head_dim, draft_size)
    if mode in PARTIAL_MODES:
        parts["partial cache"] = kv(cfg.num_layers, spec.static_tokens + spec.buffer_size)
        parts["block summaries"] = kv(cfg.num_layers, slots // spec.block_size)
        if spec.bounded_draft:  # the head's partial view: the partial cache's slots and one more path (`specpv`)
            parts["bounded draft cache"] = kv(1, spec.static_tokens + spec.buffer_size + spec.tree_depth + 1,
                                              d.num_kv_heads, d.head_dim, draft_size)
        if spec.offload:  # a full step's layer on the device and the next one prefetched, and what it keeps
            parts["offload staging"] = kv(2, slots)
            tail = offload.tail_width(spec, blocks_spanned(tree, spec.block_size), allocated_slots(slots))
            parts["offload kept"] = kv(cfg.num_layers, spec.sink_tokens + spec.retrieval_tokens + tail)
    if mode == "specextend":
        d = draft_cfg
        parts["draft weights"] = draft_weights(d)
        parts["draft cache"] = kv(d.num_layers, slots, d.num_kv_heads, d.head_dim, draft_size) + (
            kv(d.num_layers, spec.draft_working_slots(slots), d.num_kv_heads, d.head_dim, draft_size)
            if spec.draft_chunks else 0)
    if mode == "longspec":  # one layer plus a cross-attention's q/o; a ring of `window` slots at any context
        d = draft_cfg or LongSpecConfig.for_target(cfg)
        parts["draft weights"] = draft_weights(d)
        ring_heads = model if d.num_kv_heads % model == 0 else 1
        parts["draft cache"] = 2 * batch * d.num_kv_heads * d.window * d.head_dim * draft_size // (rows * ring_heads)
    if mode == "exact" and temperature > 0:  # each provisional token's partial distribution, for its re-check
        parts["provisional distributions"] = batch * spec.max_missing * v * 4 // rows
    t = max(tree, prefill_chunk)
    # The XLA path's attention holds float32 scores and their exp: the new tokens' [B, Hq, T, T] and, per row
    # and KV head, a prefix tile of the group's query rows x a block of keys (`attention.read_block`); the
    # layer loop slices one layer's weights out of the stacked parameters into a buffer of their own.
    group_rows = cfg.num_heads // cfg.num_kv_heads * t
    prefix_tile = cfg.num_kv_heads * group_rows * read_block(allocated_slots(slots), group_rows)
    scores = 2 * batch * (cfg.num_heads * t ** 2 + prefix_tile) * 4
    attention_io = 4 * batch * t * cfg.num_heads * cfg.head_dim * 4  # queries, grouped copy, float32 output sums
    # float32 logit buffers, measured on XLA CPU: greedy 1 and `isfinite`'s bool mask beside it; sampling 2.1;
    # filtered 4.2
    logit_buffers = 1.25 if temperature == 0 else 5 if top_p < 1 or top_k > 0 else 3
    # A draft level's logits and log-probabilities over its widest frontier (a beam tree's is tree_top_k**2)
    draft_rows = 0 if mode == "ar" else 2 * max(frontier_widths(spec.tree_top_k, spec.tree_depth, spec.tree_beam),
                                                default=spec.tree_top_k)
    # Offloaded, prefill goes a layer at a time: the prompt's hidden states (twice: XLA copies the loop's; CPU,
    # measured) and captured features stay resident.
    by_layer = (2 + len(d.feature_layers)) * batch * context * h * size if spec.offload and mode in PARTIAL_MODES else 0
    # Greedy exact mode's full step takes each provisional token's margin over the best other logit: a masked
    # copy of their logits (XLA CPU, measured; a fused reduction on GPUs).
    margin_rows = spec.max_missing if mode == "exact" and temperature == 0 else 0
    temporaries = max(int((logit_buffers * tree + margin_rows) * batch * v * 4), batch * draft_rows * v * 4,
                      batch * t * (2 * h + 2 * cfg.intermediate_size) * 4 + by_layer) + scores + attention_io
    temporaries += batch * v * 4  # the prompts' last logits, from prefill into the decode loop
    activations = temporaries // rows + layer_param_count(cfg, model) * size
    parts["activations"] = activations * 11 // 10  # 10% to spare: how XLA assigns buffers varies (CPU: 3-5% more)
    return Estimate(label, parts, ("full cache", "block summaries") if mode in PARTIAL_MODES else ())


def device_bytes_limit(device=None) -> int | None:
    """The device's memory limit in bytes, where the backend reports one (GPU, TPU; not CPU)."""
    stats = (device or jax.local_devices()[0]).memory_stats() or {}  # multi-host: one this process can ask
    return stats.get("bytes_limit")


def device_bytes_held_beside(own: Any, device=None) -> int:
    """Bytes the device holds in arrays other than those of the pytree `own` (another model, outputs kept
    alive), where the backend reports its use (GPU, TPU; else 0)."""
    device = device or jax.local_devices()[0]
    in_use = (device.memory_stats() or {}).get("bytes_in_use")
    return 0 if in_use is None else max(in_use - bytes_on(own, device), 0)


def bytes_on(tree: Any, device) -> int:
    """Bytes of the arrays of `tree` in `device`'s own memory (its shard of each; not host memory kinds)."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree)
               if isinstance(x, jax.Array) and device in x.sharding.device_set
               and getattr(x.sharding, "memory_kind", None) in (None, "device"))


# XLA's pool of pinned host memory on a GPU (what `memory_kind="pinned_host"` arrays come from): 64 GiB unless
# this variable, read once when the GPU client starts, gives another size in GiB.
PINNED_POOL_VARIABLE, PINNED_POOL_GIB = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", 64


@dataclasses.dataclass(frozen=True)
class HostLimit:
    """The host memory an offloaded cache may take (bytes), what sets it, and the variable that raises it (for
    messages)."""

    bytes: int
    source: str
    variable: str | None = None


def host_bytes_limit(platform: str | None = None, environ: Mapping[str, str] = os.environ,
                     meminfo: str | os.PathLike = "/proc/meminfo") -> HostLimit | None:
    """The host memory offload may fill: the memory available now (`meminfo`'s MemAvailable: pinned memory
    cannot be swapped out) and, on a GPU (`platform`, default JAX's), XLA's pinned pool; None where neither
    is known (no /proc/meminfo, not a GPU)."""
    limits = []
    try:
        fields = dict(line.split(":", 1) for line in pathlib.Path(meminfo).read_text().splitlines() if ":" in line)
        limits.append(HostLimit(int(fields["MemAvailable"].split()[0]) * 1024, "the host's available memory"))
    except (OSError, KeyError, ValueError):
        pass
    if (platform or jax.default_backend()) == "gpu":
        try:
            pool = int(environ.get(PINNED_POOL_VARIABLE, PINNED_POOL_GIB))
        except ValueError:  # XLA, too, falls back to its default
            pool = PINNED_POOL_GIB
        limits.append(HostLimit(pool << 30, f"XLA's pinned host memory pool ({PINNED_POOL_VARIABLE}={pool})",
                                PINNED_POOL_VARIABLE))
    return min(limits, key=lambda limit: limit.bytes, default=None)


def check_fits(est: Estimate, limit: int | None, offload: bool = False, host_limit: HostLimit | None = None,
               *, wide: bool = True, offloaded: Estimate | None = None, held: int = 0) -> None:
    """Raises `MemoryError` naming the parts when `est` exceeds `limit` bytes less the `held` bytes other
    arrays take (None: no check); with `offload`, only the device's parts (`est.device`) count there, and the
    host's (`est.host`) must fit `host_limit` (None: no check). The advice suggests bfloat16 where the weights
    are `wide` (wider than 16 bits), and offload where `offloaded` (the same call's estimate with it) fits."""
    need = est.device if offload else est.total
    if limit is not None and need > limit - held:
        parts = {k: v for k, v in est.parts.items() if not (offload and k in est.host_parts)}
        biggest = ", ".join(f"{k} {gib(v)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
        remedies = ["a shorter context", "a smaller batch"] + ["bfloat16"] * wide + ["several devices (mesh)"] * (
            not offload)
        if offloaded is not None and offloaded.device <= limit - held and (
                host_limit is None or offloaded.host <= host_limit.bytes):
            remedies.insert(0, f"SpecConfig(offload=True) (about {gib(offloaded.device)} on the device, "
                               f"{gib(offloaded.host)} in host memory)")
        # held: most often a model loaded twice, or the outputs of earlier runs still referenced
        has = f"{gib(limit)}, {gib(held)} of it taken by other arrays" if held else gib(limit)
        free = "free the other arrays (del the names that keep them), or " if held else ""
        raise MemoryError(f"mode {est.mode!r} needs about {gib(need)} of device memory, the device has {has} "
                          f"({biggest}); {free}use {', '.join(remedies[:-1])} or {remedies[-1]}")
    if offload and host_limit is not None and est.host > host_limit.bytes:
        parts = ", ".join(f"{k} {gib(est.parts[k])}" for k in est.host_parts)
        remedy = "" if host_limit.variable is None else f", or raise {host_limit.variable} (GiB; set before JAX starts)"
        raise MemoryError(f"mode {est.mode!r} with offload keeps about {gib(est.host)} in host memory ({parts}), "
                          f"more than {host_limit.source} allows: {gib(host_limit.bytes)}; use a shorter context or "
                          f"a smaller batch{remedy}")


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"
