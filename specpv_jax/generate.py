"""Generation: jitted chunked prefill, then one jitted `lax.while_loop` per call.

`generate` is the public entry point; modes other than "ar" plug their step
function into the same prefill / loop / stats scaffolding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from specpv_jax import checkpoint, host, longspec, memory, offload, prompts, sharding, specextend, specpv, speculative
from specpv_jax import xla_cpu
from specpv_jax import model as M
from specpv_jax.attention import resolve_implementation
from specpv_jax.cache import KVCache
from specpv_jax.config import (EAGLE3_MODES, MODES, PARTIAL_MODES, DraftConfig, LongSpecConfig, ModelConfig, SpecConfig,
                               is_integer)
from specpv_jax.draft import eagle3, small
from specpv_jax.host import prefill_progress, stage_factory, timed_call
from specpv_jax.jax_settings import under_defaults
from specpv_jax.loading import Model, check_model, draft_param_shapes, param_shapes
from specpv_jax.loop import Output, Run, decode_loop, output_bucket, prefill
from specpv_jax.sampling import Sampler
from specpv_jax.warning import warn

DEFAULT_PREFILL_CHUNK = 512
EOS_SLOTS = 8  # EOS ids fill a list of this length (or a power of two above), so its length never recompiles
PROGRESS_CHUNKS = 16  # prompts of this many prefill chunks (8K tokens by default) show a progress bar


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """tokens: `[B, n_new]` int32, n_new = max(lengths); after a row's end, the model's pad id (else the first
    of the call's `eos_token_ids`, 0 if none): read each row up to `lengths [B]` (EOS included); stats:
    counters and timings."""

    tokens: np.ndarray
    lengths: np.ndarray
    stats: dict[str, Any]


@stage_factory
def _prefill_fn(run: Run):
    def fn(params, ids, lengths, cache):
        cache, last, _, _ = prefill(params, run, ids, lengths, cache)
        return cache, M.logits(params, run.cfg, last)
    return jax.jit(fn, donate_argnums=(3,))


@flax.struct.dataclass
class ARState:
    """AR loop carry: the cache, the output buffer, the last emitted token `[B]` (not yet in the cache)."""

    cache: KVCache
    out: Output
    last: jax.Array
    key: jax.Array


def ar_step(params: M.Params, run: Run, sampler: Sampler, eos: jax.Array, s: ARState) -> ARState:
    """One target forward over each row's last token; finished rows keep their cache length."""
    out = M.forward(params, run.cfg, s.last[:, None], s.cache.length[:, None], s.cache, attention=run.attention)
    key, sub = jax.random.split(s.key)
    logits = M.logits(params, run.cfg, out.hidden[:, 0])
    nxt = sampler.sample(logits, sub)
    live = ~s.out.done
    return ARState(cache=out.cache.replace(length=s.cache.length + live),
                   out=s.out.append(nxt[:, None], jnp.ones_like(nxt), eos, jnp.isfinite(logits).all()),
                   last=jnp.where(live, nxt, s.last), key=key)


@stage_factory
def _ar_decode_fn(run: Run):
    def fn(params, cache, logits, key, sampler, eos, limit):
        params = M.for_decode_loop(params, run.cfg)
        first, out, key = Output.first_token(run, sampler, logits, key, eos, limit)
        state = ARState(cache=cache, out=out, last=first, key=key)
        state = decode_loop(run, functools.partial(ar_step, params, run, sampler, eos), state)
        return state.out, state.cache  # returning the cache lets it be donated
    return jax.jit(fn, donate_argnums=(1,))


# --------------------------------------------------------------------------- public API


def check_seed(seed) -> None:
    """Raises unless `seed` is a 64-bit signed integer (a bool is not one)."""
    if not is_integer(seed) or not -2 ** 63 <= seed < 2 ** 63:
        raise ValueError(f"seed must be a 64-bit signed integer, got {seed!r}")


def _positive_int(name: str, value) -> int:
    if not is_integer(value) or value < 1:
        raise prompts.PromptError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _eos_ids(cfg: ModelConfig, eos_token_ids) -> np.ndarray:
    """`eos_token_ids` (None: the model's) checked against the vocabulary, as an int32 array padded with -1
    (an id no token has) to `EOS_SLOTS` or the next power of two: a compiled loop serves every list that fits."""
    if isinstance(eos_token_ids, jax.Array):
        eos_token_ids = np.asarray(eos_token_ids)
    if isinstance(eos_token_ids, np.ndarray) and eos_token_ids.ndim == 0:
        eos_token_ids = eos_token_ids[()]
    if eos_token_ids is None:
        ids = cfg.eos_token_ids
    else:
        ids = (eos_token_ids,) if is_integer(eos_token_ids) else eos_token_ids
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple, np.ndarray)) or not all(
                is_integer(i) and 0 <= i < cfg.vocab_size for i in ids):
            raise ValueError(f"eos_token_ids must be a token id or a sequence of them, each in "
                             f"[0, {cfg.vocab_size}); got {eos_token_ids!r}")
    ids = [int(i) for i in ids]
    return np.array(ids + [-1] * (max(EOS_SLOTS, 1 << (len(ids) - 1).bit_length()) - len(ids)), np.int32)


DRAFT_KINDS = {"eagle": "eagle3", "specpv": "eagle3", "exact": "eagle3", "specextend": "small",
               "longspec": "longspec"}
_DRAFT_NAMES = {"eagle3": "an EAGLE-3 head", "small": "a small draft model (a plain LLaMA/Qwen directory)",
                "longspec": "a LongSpec draft"}
_CONFIG_KINDS = {DraftConfig: "eagle3", ModelConfig: "small", LongSpecConfig: "longspec"}


def check_params(cfg: ModelConfig, params: Any) -> None:
    """Raises naming the leaves where `params` is not the tree a model of `cfg` has: an embedding resized for
    added tokens under the old vocab_size (it drafted and emitted ids past it, or read past the table), a
    missing or wrongly shaped weight, an extra leaf no layer reads (a LoRA adapter would be silently ignored),
    a flax {"params": ...} wrapper."""
    _check_tree("the target's params", "target.params", params, param_shapes(M.init_params, cfg))


def check_draft_params(dcfg: Any, params: Any, d2t: Any = None) -> None:
    """`check_params` for a draft of config `dcfg` (an EAGLE-3 head's, a LongSpec draft's or a small draft
    model's): its weights, and an EAGLE-3 head's `d2t` table `[draft_vocab_size]`."""
    if isinstance(dcfg, DraftConfig) and dcfg.hidden_size != dcfg.target_hidden_size and hasattr(params, "keys") \
            and "embed_tokens" not in params:
        raise ValueError(f"this EAGLE-3 head has hidden size {dcfg.hidden_size}, the target {dcfg.target_hidden_size}, "
                         f"and its params hold no embed_tokens of its own to embed tokens with")
    _check_tree("the draft's params", "draft.params", params, *draft_param_shapes(dcfg))
    if not isinstance(dcfg, DraftConfig):
        return
    if np.shape(d2t) != (dcfg.draft_vocab_size,):
        raise ValueError(f"the draft's d2t has shape {np.shape(d2t)}, its config implies "
                         f"({dcfg.draft_vocab_size},) (draft_vocab_size)")
    problem = None if isinstance(d2t, jax.core.Tracer) else eagle3.d2t_problem(jax.device_get(d2t), dcfg.vocab_size)
    if problem:
        raise ValueError(f"the draft's {problem}")


def _check_tree(what: str, attribute: str, params: Any, expected: dict, optional: dict | None = None) -> None:
    if not hasattr(params, "keys"):
        raise TypeError(f"{what} must be a parameter tree ({attribute}), got {type(params).__name__}")
    if set(params.keys()) == {"params"}:
        raise ValueError(f"{what} are flax's variables {{'params': ...}}: pass the tree inside, "
                         f"variables['params']")
    not_float = [checkpoint.key_name(path) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                 if not jnp.issubdtype(getattr(leaf, "dtype", np.dtype(object)), jnp.floating)]
    if not_float:
        raise ValueError(f"{what} must be floating-point arrays; not so: {', '.join(not_float[:5])}"
                         + (f" and {len(not_float) - 5} more" if len(not_float) > 5 else ""))
    problems = checkpoint.shape_problems(checkpoint.flat_shapes(params), expected, optional)
    if problems:
        raise ValueError(f"{what} do not match its config: {problems}")


def _check_untraced(fn: str, input_ids: Any, params: Any) -> None:
    if isinstance(input_ids, jax.core.Tracer) or any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(params)):
        raise TypeError(f"{fn} runs its own compiled programs and takes concrete arrays, not values traced by "
                        f"jit, vmap or grad: sj.make_generate_fn makes a function to jit or vmap, and "
                        f"model.forward(params, cfg, ids, positions, None) is differentiable")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (modes: {', '.join(MODES)})")


def _check_draft(draft: Any, mode: str) -> None:
    """Raises unless `draft` (a loaded draft) is the kind `mode` needs (`_check_settings` checks its fit)."""
    _check_mode(mode)
    if mode == "ar":
        return
    if draft is None:
        raise ValueError(f"mode {mode!r} needs a draft: pass draft=sj.load_draft(path, target)")
    if isinstance(draft, (str, os.PathLike)):
        raise ValueError(f"draft is a path ({draft}); load it first: draft=sj.load_draft(path, target)")
    kind = getattr(draft, "kind", None)
    if kind != DRAFT_KINDS[mode]:
        modes = ", ".join(m for m, k in DRAFT_KINDS.items() if k == kind) or "none"
        raise ValueError(f"mode {mode!r} needs {_DRAFT_NAMES[DRAFT_KINDS[mode]]}, got {type(draft).__name__} "
                         f"(modes for it: {modes})")


def _check_draft_config(target_cfg: ModelConfig, dcfg: Any, mode: str, spec: SpecConfig) -> None:
    """Raises unless the draft config `dcfg` is the kind `mode` needs, fits the target and its vocabulary
    has the `spec.tree_branching` tokens a node expands to."""
    kind = _CONFIG_KINDS.get(type(dcfg))
    if kind != DRAFT_KINDS[mode]:
        got = f"that of {_DRAFT_NAMES[kind]}" if kind else type(dcfg).__name__
        raise ValueError(f"mode {mode!r} needs the config of {_DRAFT_NAMES[DRAFT_KINDS[mode]]}, got {got}")
    problems = small.fit_problems(dcfg, target_cfg) if kind == "small" else dcfg.fit_problems(target_cfg)
    if problems:
        raise ValueError(f"the draft does not fit this target: {'; '.join(problems)}; "
                         "load it with sj.load_draft(path, target)")
    vocab = draft_vocab_size(target_cfg, dcfg)
    if spec.tree_branching > vocab:
        what = (f"a beam tree's tree_top_k**2={spec.tree_branching} (tree_top_k={spec.tree_top_k})" if spec.tree_beam
                else f"tree_top_k={spec.tree_top_k}")
        raise ValueError(f"SpecConfig: {what} exceeds the draft's vocabulary of {vocab} tokens")
    if isinstance(dcfg, DraftConfig) and dcfg.sliding_window is not None and spec.bounded_draft and \
            mode in PARTIAL_MODES:
        raise ValueError(f"SpecConfig(bounded_draft=True) does not combine with this EAGLE-3 head's sliding window "
                         f"({dcfg.sliding_window} positions): it reads only its window already (leave bounded_draft "
                         f"off)")


def draft_vocab_size(target_cfg: ModelConfig, dcfg: Any) -> int:
    """The tokens a draft proposes from: a tree's `tree_top_k` is at most this many."""
    if isinstance(dcfg, DraftConfig):
        return dcfg.draft_vocab_size
    return dcfg.vocab_size if isinstance(dcfg, ModelConfig) else target_cfg.vocab_size  # LongSpec: the target's


def check_mode_and_draft(target_cfg: ModelConfig, mode: str, dcfg: Any, spec: SpecConfig) -> None:
    """Raises unless `mode` runs on a target of `target_cfg` with a draft of config `dcfg` (its kind and fit;
    `loading.draft_config` reads one without its weights) under `spec` (offload's modes, the tree's width):
    what the CLI checks before loading any weights."""
    _check_mode(mode)
    _check_spec_for_mode(spec, mode)
    if mode != "ar":
        _check_draft_config(target_cfg, dcfg, mode, spec)


def _check_settings(target_cfg: ModelConfig, mode: str, dcfg: Any, spec: SpecConfig | None, max_new_tokens,
                    temperature, top_p, top_k, prefill_chunk, attention: str) -> tuple[SpecConfig, Sampler]:
    """Raises naming the first setting `generate` / `make_generate_fn` cannot run with; returns the SpecConfig
    and the Sampler."""
    spec = SpecConfig() if spec is None else spec
    if not isinstance(spec, SpecConfig):
        raise TypeError(f"spec must be a SpecConfig, got {type(spec).__name__}")
    _positive_int("max_new_tokens", max_new_tokens)
    _positive_int("prefill_chunk", prefill_chunk)
    sampler = Sampler.create(temperature, top_p, top_k)
    for name, value, default in (("top_p", top_p, 1), ("top_k", top_k, 0)):
        if sampler.greedy and value != default:
            warn(f"{name}={value} has no effect with temperature=0 (greedy decoding)")
    resolve_implementation(attention)
    check_mode_and_draft(target_cfg, mode, dcfg, spec)
    if mode == "ar" and dcfg is not None:
        warn("mode='ar' decodes with the target alone: the draft has no effect (the modes that use it: "
             f"{', '.join(m for m, k in DRAFT_KINDS.items() if k == _CONFIG_KINDS.get(type(dcfg)))})")
    if spec.bounded_draft and mode not in PARTIAL_MODES:
        warn(f"SpecConfig(bounded_draft=True) has no effect in mode {mode!r}: it bounds the EAGLE-3 head's "
             f"partial steps ({' and '.join(PARTIAL_MODES)})")
    return spec, sampler


@under_defaults
def generate(target: Model, input_ids: Any, max_new_tokens: int = 256, *, draft: Any = None, mode: str = "ar",
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             spec: SpecConfig | None = None, attention_mask: Any = None,
             eos_token_ids: int | tuple[int, ...] | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
             attention: str = "auto",
             stream: Callable[[list[np.ndarray]], None] | None = None, mesh: Any = None,
             progress: bool | None = None) -> GenerateOutput:
    """Generates up to `max_new_tokens` tokens after each prompt.

    input_ids: a list of ids, a ragged list of lists, or an int array `[T]` / `[B, T]`
    (with an optional 0/1 `attention_mask` for left- or right-padded rows; equal-length lists too).
    mode: "ar" (one target step per token); with an EAGLE-3 `draft`: "eagle"
    (tree speculation, lossless), "specpv" (partial verification, the paper),
    "exact" (partial verification, lossless); with a small draft model:
    "specextend" (Cross-model Retrieval, lossless); with a LongSpec draft: "longspec"
    (constant-memory draft, lossless; `longspec.LONGSPEC_TREE` is the paper's tree). Rows stop at any of
    `eos_token_ids` (default: the model's EOS ids; `()` never stops).
    temperature: 0 for greedy decoding, else sampling with PRNG `seed`, from the `top_k` most likely tokens
    (0: all) and of those the smallest set whose mass reaches `top_p` (1: all), as transformers' warpers.
    spec: the tree and partial-cache settings of the speculative modes (default `SpecConfig()`).
    attention: "auto" (the Pallas kernel for 16-bit weights on NVIDIA GPUs of compute capability 8.0 and up,
    XLA elsewhere: `attention.resolve_implementation`), "xla" or "pallas".
    prefill_chunk: prompt tokens per prefill pass (bounds the activations of long prompts).
    stream: called on the host with each row's newly emitted tokens as
    generation goes (exact mode: confirmed tokens only; a new function needs no recompilation, and
    streaming calls from several threads take turns). mesh: a
    `sharding.make_mesh` mesh to run on (tensor parallel over "model", rows over
    "data"); default: the mesh the target was loaded onto (`load_target(mesh=)`),
    else `sharding.default_mesh` when there is more than one device (`stats["mesh"]`: its (data, model) shape).
    progress: a progress bar over prefill chunks (default: for prompts of
    `PROGRESS_CHUNKS` chunks or more). Returns `GenerateOutput(tokens [B, n_new], lengths [B], stats)`.
    """
    check_model(target)
    _check_untraced("generate", input_ids, target.params)
    check_params(target.cfg, target.params)
    xla_cpu.check_backend()
    _check_draft(draft, mode)
    spec, sampler = _check_settings(target.cfg, mode, getattr(draft, "cfg", None), spec, max_new_tokens,
                                    temperature, top_p, top_k, prefill_chunk, attention)
    draft = None if mode == "ar" else draft  # "ar" ignores a draft (`_check_settings` warned)
    if draft is not None:
        check_draft_params(draft.cfg, draft.params, getattr(draft, "d2t", None))
    check_seed(seed)
    if stream is not None and not callable(stream):
        raise TypeError(f"stream must be a function of the new tokens per row, got {type(stream).__name__}")
    mesh = _call_mesh(target, draft, mesh, spec)
    cfg = target.cfg
    batch = prompts.prepare(input_ids, cfg, max_new_tokens, prefill_chunk, attention_mask)
    eos = _eos_ids(cfg, eos_token_ids)
    chunk = min(prefill_chunk, batch.ids.shape[1])
    chunks = batch.ids.shape[1] // chunk
    if progress is not None and not isinstance(progress, (bool, np.bool_)):  # "no" is truthy
        raise TypeError(f"progress must be True, False or None (by the prompt's length), got {progress!r}")
    progress = chunks >= PROGRESS_CHUNKS if progress is None else bool(progress)
    run, max_len = _plan(cfg, spec, mode, draft.cfg if mode != "ar" else None, max_new_tokens, batch.ids.shape[1],
                         chunk, attention, stream is not None, progress, target.dtype)
    _check_memory(target, draft, batch, max_new_tokens, mode, spec, chunk, (temperature, top_p, top_k), mesh)
    params, draft_params = target.params, draft.params if draft is not None else None
    d2t = draft.d2t if draft is not None else None
    # Every transfer explicit (here and the result's), as a caller's `jax.transfer_guard("disallow")` requires.
    rows = scalars = None
    if mesh is not None:
        params = sharding.shard_params(params, mesh, cfg)
        draft_params = None if draft is None else sharding.shard_params(draft_params, mesh, draft.cfg)
        rows = tuple(sharding.batch_sharding(x.shape, mesh) for x in (batch.ids, batch.lengths))
        scalars = NamedSharding(mesh, P())
    ids, lengths = jax.device_put((batch.ids, batch.lengths), rows)
    sampler, eos, limit, d2t = jax.device_put((sampler, np.asarray(eos, np.int32), np.int32(max_new_tokens), d2t),
                                              scalars)
    # The run's mesh in the context: the Pallas kernel reads it to run per shard (see `attention._tree_kernel`),
    # and it replaces any mesh the caller set (whose axes our arrays do not use).
    run_mesh = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    streaming = host.streaming_to(stream) if stream is not None else contextlib.nullcontext(host.StreamCall())
    with prefill_progress(chunks) if progress else contextlib.nullcontext(), run_mesh, streaming as call:
        out, counters, prefill_s, decode_s = _prefill_and_decode(
            run, max_len, timed_call, params, draft_params, d2t, ids, lengths,
            _prng_key(seed, scalars), sampler, eos, limit, mesh)  # the key made on the run's mesh, in its context
    if stream is not None and _stream_failed(call.error):
        # The stream function raised (and was not called again): its error, not the runtime's.
        raise call.error or RuntimeError("generate's stream function raised in process 0 (see its error there)")
    out, counters = jax.device_get(_readable((out, counters)))
    if not bool(out.finite):
        raise _nonfinite_logits(target)
    steps = _step_stats(out, counters, mode != "ar")
    if int(out.draft_nan_steps):
        dtype = jax.tree.leaves(draft.params)[0].dtype
        where = f", from {draft.source}" if getattr(draft, "source", "") else ""
        warn(f"the draft's log-probabilities were NaN in {int(out.draft_nan_steps)} of {steps['steps']} steps (its "
             f"weights in {dtype.name}{where}): it overflows its dtype, so it proposed arbitrary tokens and decoding "
             f"ran about as fast as ar or slower (the tokens are still the target's); load it in float32: "
             f"sj.load_draft(path, target, dtype=\"float32\")")
    num_out = np.asarray(out.num_out)
    stats = {"mode": mode, "mesh": None if mesh is None else (mesh.shape["data"], mesh.shape["model"]),
             "new_tokens": int(num_out.sum()), **steps,
             "draft_nan_steps": int(out.draft_nan_steps),
             "prefill_s": prefill_s, "time_s": decode_s,
             # The first token of each row comes from prefill.
             "tokens_per_s": int(out.emitted) / decode_s if decode_s > 0 else 0.0}
    return GenerateOutput(tokens=np.asarray(out.tokens)[:, : int(num_out.max())], lengths=num_out, stats=stats)


def _call_mesh(target: Model, draft: Any, mesh: Any, spec: SpecConfig) -> Any:
    """The mesh a generate call runs on (None: one device): `mesh`, else the target's, else the default."""
    placed = sharding.mesh_of(target.params)
    if mesh is None:
        mesh = placed or sharding.default_mesh(target.cfg)
    else:
        sharding.check_mesh(mesh)
    if spec.offload and mesh is not None and mesh.size > 1:
        raise NotImplementedError("SpecConfig(offload=True) runs on one device: load the target with (or pass) "
                                  "mesh=sharding.make_mesh(devices=jax.local_devices()[:1])")
    remedies = {"target": "sj.load_target(..., mesh=mesh) or sj.Model(target.cfg, "
                          "sj.sharding.shard_params(target.params, mesh, target.cfg))",
                "draft": "sj.load_draft(path, target) with the target on it (a draft follows its target), or "
                         "dataclasses.replace(draft, params=sj.sharding.shard_params(draft.params, mesh, draft.cfg))"}
    for who, weights in (("target", target.params), ("draft", getattr(draft, "params", None))):
        at = None if weights is None else sharding.mesh_of(weights)
        if weights is not None and mesh is not None and at != mesh and (at is not None or mesh.size > 1):
            where = f"on a {_named(at)} mesh" if at is not None else "not on a mesh"
            warn(f"the {who}'s weights are {where} and generate runs on a {_named(mesh)} mesh: they are copied "
                 f"there on every call; place them once with {remedies[who]}")
    note = None if mesh is None else sharding.unsplit_cache_note(target.cfg, mesh, getattr(draft, "cfg", None))
    if note:
        warn(note)
    return mesh


def _check_memory(target: Model, draft: Any, batch: prompts.PromptBatch, max_new_tokens: int, mode: str,
                  spec: SpecConfig, chunk: int, sampling: tuple[float, float, int], mesh: Any) -> None:
    """Refuses a call whose estimated peak does not fit one device's memory (or, offloaded, the host's), before
    allocating anything (nothing to check where the backend reports no limit)."""
    limit = memory.device_bytes_limit()
    host_limit = memory.host_bytes_limit() if spec.offload else None
    if limit is None and host_limit is None:
        return
    mesh_shape = (1, 1) if mesh is None else (mesh.shape["data"], mesh.shape["model"])

    def estimate(spec: SpecConfig) -> memory.Estimate:
        return memory.estimate(target.cfg, batch.ids.shape[1], max_new_tokens, batch.batch, mode, spec,
                               target.dtype, None if draft is None else draft.cfg, chunk, *sampling,
                               mesh_shape=mesh_shape, draft_params=None if draft is None else draft.params)

    est, offloaded = estimate(spec), None
    held = 0 if limit is None else memory.device_bytes_held_beside((target.params, getattr(draft, "params", None)))
    if limit is not None and est.total > limit - held and not spec.offload and mode in PARTIAL_MODES and \
            mesh_shape == (1, 1):  # would offload fit?
        offloaded, host_limit = estimate(dataclasses.replace(spec, offload=True)), memory.host_bytes_limit()
    memory.check_fits(est, limit, spec.offload, host_limit, wide=jnp.dtype(target.dtype).itemsize > 2,
                      offloaded=offloaded, held=held)


def _nonfinite_logits(target: Model) -> FloatingPointError:
    """The error for a target whose logits came out NaN or infinite (tokens chosen from them would be
    meaningless: NaN's argmax is token 0)."""
    hint = ("; float16's range is too narrow for many models' activations: load it with dtype=\"bfloat16\" or "
            "\"float32\"" if target.dtype == jnp.float16 else "; its weights or activations overflow")
    where = f", from {target.source}" if target.source else ""
    return FloatingPointError(f"the target's logits are NaN or infinite ({target.cfg.arch} in {target.dtype}{where})"
                              f"{hint}")


def _stream_failed(error: BaseException | None) -> bool:
    """Whether the stream function raised `error`. Multi-host: as process 0, where its calls run, saw it, so
    that every process raises instead of the others going on to wait for process 0 in the next collective."""
    if jax.process_count() == 1:
        return error is not None
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.bool_(error is not None)))


def _prng_key(seed: int, where: Any = None) -> jax.Array:
    """The key of a 64-bit `seed`, placed by `where` (None: the default device). `jax.random.key` keeps 32 bits
    of it (without x64: 2**32 + 5 would sample as 5), so a seed outside [0, 2**32) folds in its high half; one
    inside has the key it always had. Made from seed halves placed there: multi-host, `device_put` moves no
    key array onto a mesh."""
    low, high = jax.device_put((np.uint32(seed & 0xFFFFFFFF), np.uint32((seed >> 32) & 0xFFFFFFFF)), where)
    key = jax.random.key(low)
    return key if 0 <= seed < 2 ** 32 else jax.random.fold_in(key, high)


def _readable(tree: Any) -> Any:
    """`tree` with each array split over several processes' devices (multi-host: rows along "data") gathered
    into every process, so that numpy can read it; unchanged in one process."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: x if x.is_fully_addressable or x.is_fully_replicated
                        else multihost_utils.process_allgather(x, tiled=True), tree)


def _named(mesh) -> str:
    """A mesh's sizes as DATAxMODEL."""
    return "x".join(str(n) for n in mesh.shape.values())


def _check_spec_for_mode(spec: SpecConfig, mode: str) -> None:
    if mode in PARTIAL_MODES:
        spec.check_partial()
    if spec.offload and mode not in PARTIAL_MODES:
        raise ValueError(f"SpecConfig(offload=True) works with modes {' and '.join(PARTIAL_MODES)} (a partial cache "
                         f"on the device), not {mode!r}")


def _plan(cfg: ModelConfig, spec: SpecConfig, mode: str, dcfg, max_new_tokens: int, prompt_len: int, chunk: int,
          attention: str, stream: bool = False, progress: bool = False, dtype=None) -> tuple[Run, int]:
    """The static settings of a call (target weights of `dtype`, for "auto" attention) and the cache length it
    needs."""
    speculative_mode = mode != "ar"
    mode = memory.loop_mode(spec, mode, prompt_len, max_new_tokens)
    run = Run(cfg=cfg, out_slots=output_bucket(max_new_tokens), chunk=chunk, mode=mode,
              attention=resolve_implementation(attention, dtype),
              spec=spec if speculative_mode else None, dcfg=dcfg if speculative_mode else None, stream=stream,
              progress=progress, offload=spec.offload and mode in PARTIAL_MODES)  # not in the eagle loop
    return run, memory.cache_length(spec, mode, prompt_len, max_new_tokens)


def _prefill_and_decode(run: Run, max_len: int, call, params, draft_params, d2t, ids, lengths, key, sampler, eos,
                        limit, mesh=None):
    """Prefill then the decode loop; `call(fn, *args) -> (result, seconds)` runs each jitted stage.
    Caches are placed on `mesh` when given. Returns (Output, SpecPV counters or None, prefill seconds,
    decode seconds)."""
    b = ids.shape[0]
    decode = run.decode_key

    def empty(make: Callable[[], KVCache]) -> KVCache:
        """`make()`'s empty cache; on `mesh`, its K/V created in their shards."""
        if mesh is None:
            return make()
        shapes = jax.eval_shape(make)
        where = sharding.cache_sharding(shapes.k.shape, mesh)
        return KVCache(k=sharding.zeros(shapes.k.shape, shapes.k.dtype, where),
                       v=sharding.zeros(shapes.v.shape, shapes.v.dtype, where),
                       length=sharding.zeros(shapes.length.shape, shapes.length.dtype))

    if run.offload:
        cache = offload.empty_cache(run.cfg, b, max_len, M.param_dtype(params), mesh)
    else:
        cache = empty(lambda: KVCache.for_model(run.cfg, b, max_len, M.param_dtype(params)))
    if run.mode == "ar":
        (cache, logits), prefill_s = call(_prefill_fn(run.prefill_key), params, ids, lengths, cache)
        (out, _), decode_s = call(_ar_decode_fn(decode), params, cache, logits, key, sampler, eos, limit)
        return out, None, prefill_s, decode_s
    if run.mode == "specextend":
        draft_cache = empty(lambda: KVCache.for_model(run.dcfg, b, max_len, M.param_dtype(draft_params)))
        prefill_fn = specextend.specextend_prefill_fn(run.prefill_key, specextend.prefill_spec(run.spec))
        (cache, draft_state, logits), prefill_s = call(prefill_fn, params, draft_params, ids, lengths, cache,
                                                       draft_cache)
        (out, _, _), decode_s = call(specextend.specextend_decode_fn(decode), params, draft_params, cache, draft_state,
                                     logits, key, sampler, eos, limit)
        return out, None, prefill_s, decode_s
    if run.mode == "longspec":
        (cache, ring, logits), prefill_s = call(longspec.longspec_prefill_fn(run.prefill_key), params, draft_params,
                                                ids, lengths, cache)
        (out, _, _), decode_s = call(longspec.longspec_decode_fn(decode), params, draft_params, cache, ring, logits,
                                     key, sampler, eos, limit)
        return out, None, prefill_s, decode_s
    draft_cache = empty(lambda: eagle3.empty_cache(run.dcfg, b, max_len, draft_params))
    (cache, draft_cache, logits, feats), prefill_s = call(
        speculative.eagle_prefill_fn(run.prefill_key), params, draft_params, ids, lengths, cache, draft_cache)
    args = (params, draft_params, d2t, cache, draft_cache, logits, feats, key, sampler, eos, limit)
    if run.mode == "eagle":
        (out, _, _), decode_s = call(speculative.eagle_decode_fn(decode), *args)
        return out, None, prefill_s, decode_s
    if run.offload:
        args += (offload.empty_summary(cache, run.spec.block_size),)
    (out, counters, *_), decode_s = call(specpv.specpv_decode_fn(decode), *args)
    return out, counters, prefill_s, decode_s


def make_generate_fn(target_cfg: ModelConfig, spec_cfg: SpecConfig | None = None, *, mode: str = "ar",
                     draft_cfg=None, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                     top_k: int = 0, eos_token_ids: int | tuple[int, ...] | None = None,
                     prefill_chunk: int = DEFAULT_PREFILL_CHUNK, attention: str = "auto"):
    """A pure, jittable `generate_fn(params, draft_params, ids, key) -> (tokens [B, max_new_tokens], lengths [B])`.

    For research code that jits (or vmaps) generation itself. The sampling settings (temperature, top_p,
    top_k), eos_token_ids, prefill_chunk and attention mean what they mean in `generate`. ids: `[B, T]`
    integer equal-length prompts (no padding); draft_params: `{"params": draft.params,
    "d2t": draft.d2t}` for the speculative modes (ignored by "ar"; a small or LongSpec
    draft has no d2t: `{"params": draft.params}`); key: a PRNG key.
    Settings are static and fixed here; output equals `generate` with the same
    settings (which also raises where the target's logits are NaN or infinite; a traced function cannot,
    so check `sj.forward_logits` on a sample prompt once when using a new checkpoint or dtype). Example::

        fn = jax.jit(sj.make_generate_fn(target.cfg, sj.SpecConfig(), mode="eagle", draft_cfg=draft.cfg,
                                         max_new_tokens=64))
        tokens, lengths = fn(target.params, {"params": draft.params, "d2t": draft.d2t}, ids, jax.random.key(0))
        # several samples of one prompt at once (a greedy function gives the same tokens for every key):
        sampler = jax.jit(sj.make_generate_fn(target.cfg, sj.SpecConfig(), mode="eagle", draft_cfg=draft.cfg,
                                              max_new_tokens=64, temperature=0.8))
        sample = jax.vmap(sampler, in_axes=(None, None, None, 0))

    On several devices with attention="pallas", call it under `with jax.set_mesh(mesh):`
    (a `sharding.make_mesh` mesh) so the kernel runs per shard, as in `generate`. Weights placed on
    another mesh than the one traced under can fail to compile (JAX's IndivisibleError): place them on it
    (`sharding.shard_params(params, mesh, cfg)`).
    """
    _check_mode(mode)
    if not isinstance(target_cfg, ModelConfig):
        raise TypeError(f"target_cfg must be the target's ModelConfig (target.cfg), got {type(target_cfg).__name__}")
    xla_cpu.check_backend()
    if mode != "ar" and draft_cfg is None:
        raise ValueError(f"mode {mode!r} needs draft_cfg (the draft's config: draft.cfg)")
    spec, sampler = _check_settings(target_cfg, mode, draft_cfg, spec_cfg, max_new_tokens, temperature, top_p,
                                    top_k, prefill_chunk, attention)
    if spec.offload:
        raise NotImplementedError("SpecConfig(offload=True) needs generate (it allocates the cache in host memory "
                                  "outside jit); make_generate_fn keeps the cache on the device")
    eos = _eos_ids(target_cfg, eos_token_ids)

    def untimed(fn, *args):
        return fn(*args), 0.0

    @under_defaults
    def generate_fn(params, draft_params, ids, key):
        check_params(target_cfg, params)
        _check_call(target_cfg, mode, max_new_tokens, draft_params, ids, key)
        if mode != "ar":
            check_draft_params(draft_cfg, draft_params["params"], draft_params.get("d2t"))
        return traced(params, draft_params if isinstance(draft_params, dict) else {}, ids, key)

    @jax.jit  # a call outside the user's jit is one program too (and makes no implicit transfers of its own)
    def traced(params, draft_params, ids, key):
        ids = jnp.asarray(ids, jnp.int32)
        b, t = ids.shape
        chunk = min(prefill_chunk, t)
        padded = jnp.pad(ids, ((0, 0), (0, -t % chunk)))
        run, max_len = _plan(target_cfg, spec, mode, draft_cfg, max_new_tokens, padded.shape[1], chunk, attention,
                             dtype=M.param_dtype(params))
        out, _, _, _ = _prefill_and_decode(run, max_len, untimed, params, draft_params.get("params"),
                                           draft_params.get("d2t"), padded, jnp.full((b,), t, jnp.int32), key,
                                           sampler, jnp.asarray(eos), jnp.asarray(max_new_tokens, jnp.int32))
        return out.tokens[:, :max_new_tokens], out.num_out

    return generate_fn


def _check_call(cfg: ModelConfig, mode: str, max_new_tokens: int, draft_params, ids, key) -> None:
    """A `make_generate_fn` function's arguments, checked while tracing (shapes, dtypes) or, for concrete
    ids, by value too; traced ids must be in the vocabulary (the caller's part of the contract)."""
    if mode != "ar" and (not isinstance(draft_params, dict) or draft_params.get("params") is None
                         or (mode in EAGLE3_MODES and draft_params.get("d2t") is None)):
        wanted = '{"params": draft.params, "d2t": draft.d2t}' if mode in EAGLE3_MODES else '{"params": draft.params}'
        raise ValueError(f"mode {mode!r} needs draft_params={wanted}")
    shape, dtype = np.shape(ids), ids.dtype if hasattr(ids, "dtype") else np.asarray(ids).dtype
    if len(shape) != 2 or 0 in shape or not jnp.issubdtype(dtype, jnp.integer):
        raise prompts.PromptError(f"ids must be a non-empty integer array [B, T], got shape {shape}, dtype {dtype}")
    if shape[1] + max_new_tokens > cfg.max_position_embeddings:
        raise prompts.PromptError(f"{shape[1]} prompt tokens + max_new_tokens={max_new_tokens} exceed the model's "
                                  f"max_position_embeddings={cfg.max_position_embeddings}")
    values = None if isinstance(ids, jax.core.Tracer) else np.asarray(jax.device_get(ids))
    if values is not None and ((values < 0) | (values >= cfg.vocab_size)).any():
        raise prompts.PromptError(f"ids hold token ids outside the vocabulary [0, {cfg.vocab_size})")
    if not (isinstance(key, jax.Array) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                            or (key.dtype == jnp.uint32 and key.shape[-1:] == (2,)))):
        raise ValueError(f"key must be a PRNG key (jax.random.key(seed)), got {type(key).__name__}")
    if key.shape != (() if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else (2,)):
        raise ValueError(f"key must be one PRNG key, got a batch of shape {key.shape}: vmap the function over keys "
                         f"for several samples")


def _step_stats(out: Output, counters, speculative_mode: bool) -> dict[str, Any]:
    """Verification counts and mean accepted lengths (tokens per verification and row)."""
    if counters is None:  # all but specpv and exact: every step is one target pass per live row
        rows = int(out.row_steps)
        mean = int(out.emitted) / rows if rows else 0.0
        full = int(out.steps) if speculative_mode else 0
        return {"steps": int(out.steps), "mean_accept_len": mean, "mean_accept_len_full": mean if full else 0.0,
                "mean_accept_len_partial": 0.0, "full_verifications": full, "partial_verifications": 0,
                "rollbacks": 0}
    c = jax.tree.map(int, counters)

    def ratio(a, b):
        return a / b if b else 0.0

    # Overall: tokens emitted (in exact mode, confirmed) per row verification; per kind: tokens each accepted.
    return {"steps": c.full + c.partial,
            "mean_accept_len": ratio(int(out.emitted), c.full_rows + c.partial_rows),
            "mean_accept_len_full": ratio(c.full_accepted, c.full_rows),
            "mean_accept_len_partial": ratio(c.partial_accepted, c.partial_rows),
            "full_verifications": c.full, "partial_verifications": c.partial, "rollbacks": c.rollbacks}


@stage_factory
def _chunk_fn(cfg: ModelConfig, attention: str, argmax: bool):
    def fn(params, ids, start, lengths, cache):
        b, t = ids.shape
        pos = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        out = M.forward(params, cfg, ids, pos, cache.replace(length=jnp.full((b,), start, jnp.int32)),
                        attention=attention)
        logits = M.logits(params, cfg, out.hidden)
        finite = (jnp.isfinite(logits).all(-1) | (pos >= lengths[:, None])).all()  # padding's logits are dropped
        return out.cache, jnp.argmax(logits, -1).astype(jnp.int32) if argmax else logits, finite
    return jax.jit(fn, donate_argnums=(4,))


def _full_context_pass(target: Model, batch: prompts.PromptBatch, chunk: int, attention: str,
                       argmax: bool) -> np.ndarray:
    """The target's logits (or their argmax) `[B, max(lengths), ...]` at every position of right-padded prompts
    (past a row's length: the padding's, to drop); raises where a row's own are not finite."""
    t = int(batch.lengths.max())
    chunk = min(chunk, batch.ids.shape[1])
    cache = KVCache.for_model(target.cfg, batch.batch, batch.ids.shape[1], target.dtype)
    fn = _chunk_fn(target.cfg, resolve_implementation(attention, target.dtype), argmax)
    lengths = jax.device_put(batch.lengths)
    out, finite, pending = [], [], None  # each chunk's result is read while the next runs
    for start in range(0, t, chunk):  # transfers explicit, as a caller's `jax.transfer_guard("disallow")` requires
        cache, part, part_finite = fn(target.params, *jax.device_put((batch.ids[:, start:start + chunk],
                                                                      np.int32(start))), lengths, cache)
        part.copy_to_host_async()
        finite.append(part_finite)
        if pending is not None:
            out.append(jax.device_get(pending))
        pending = part
    out.append(jax.device_get(pending))
    if not all(jax.device_get(finite)):
        raise _nonfinite_logits(target)
    return np.concatenate(out, axis=1)[:, :t]


@under_defaults
def forward_logits(target: Model, input_ids: Any, chunk: int = DEFAULT_PREFILL_CHUNK,
                   attention: str = "auto", attention_mask: Any = None) -> np.ndarray:
    """Full-context reference logits `[B, T, V]` float32, computed `chunk` tokens at a time with `attention`
    ("auto", "xla" or "pallas", as in `generate`).

    input_ids and attention_mask: as `generate` takes them. The logits are laid out as the ids were given:
    with a mask, `[B, T, V]` of input_ids' shape, zero where the mask is 0; ragged rows, right-padded with
    zeros to the longest.
    """
    check_model(target)
    _positive_int("chunk", chunk)
    _check_untraced("forward_logits", input_ids, target.params)
    check_params(target.cfg, target.params)
    batch = prompts.prepare(input_ids, target.cfg, 0, chunk, attention_mask)
    logits = _full_context_pass(target, batch, chunk, attention, argmax=False)
    if attention_mask is None:
        ragged = len(set(batch.lengths.tolist())) > 1
        return np.where(_within(batch.lengths, logits.shape[1])[..., None], logits, 0) if ragged else logits
    mask = np.asarray(jax.device_get(attention_mask)).astype(bool).reshape(-1, np.shape(attention_mask)[-1])
    laid_out = np.zeros(mask.shape + logits.shape[2:], logits.dtype)
    laid_out[mask] = logits[_within(batch.lengths, logits.shape[1])]  # row by row, in order: the runs of ones
    return laid_out


def _within(lengths: np.ndarray, t: int) -> np.ndarray:
    """`[B, t]` bool: the positions below each row's length."""
    return np.arange(t)[None, :] < lengths[:, None]


@under_defaults
def fidelity(target: Model, input_ids: Any, output: GenerateOutput, attention_mask: Any = None,
             chunk: int = DEFAULT_PREFILL_CHUNK) -> float:
    """Fraction of generated tokens equal to the full-context target's argmax given the same prefix.

    Teacher-forced: every row's prompt + generated tokens go through the target in
    one pass (`chunk` tokens at a time). 1.0 for any lossless greedy generation; `specpv` trades some for
    speed. input_ids and attention_mask: as given to `generate` for `output`.
    """
    _positive_int("chunk", chunk)
    batch = prompts.prepare(input_ids, target.cfg, 0, chunk, attention_mask)
    if batch.batch != output.tokens.shape[0]:
        raise prompts.PromptError(f"{batch.batch} prompts for an output of {output.tokens.shape[0]} rows")
    generated = [output.tokens[b, :n] for b, n in enumerate(output.lengths)]
    total = sum(g.size for g in generated)
    if not total:
        return 1.0
    sequences = [np.concatenate([batch.ids[b, :n], g]) for b, (n, g) in enumerate(zip(batch.lengths, generated))]
    predicted = _full_context_pass(target, prompts.prepare(sequences, target.cfg, 0, chunk), chunk, "auto",
                                   argmax=True)
    matched = sum(int((predicted[b, n - 1: n - 1 + g.size] == g).sum())
                  for b, (n, g) in enumerate(zip(batch.lengths, generated)))
    return matched / total
