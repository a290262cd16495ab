"""Generation: jitted chunked prefill, then one jitted `lax.while_loop` per call.

`generate` is the public entry point; modes other than "ar" plug their step
function into the same prefill / loop / stats scaffolding.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from specpv_jax import model as M
from specpv_jax import prompts
from specpv_jax.cache import FullCache
from specpv_jax.config import ModelConfig
from specpv_jax.loading import Model
from specpv_jax.sampling import Sampler

MODES = ("ar", "eagle", "specpv", "exact", "specextend", "longspec")
DEFAULT_PREFILL_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """tokens: `[B, n_new]` int32, padded after a row's end; lengths: `[B]` tokens per row
    (EOS included); stats: counters and timings."""

    tokens: np.ndarray
    lengths: np.ndarray
    stats: dict[str, Any]


# --------------------------------------------------------------------------- timing


_EXECUTABLES: dict[Any, Any] = {}


def timed_call(fn: Callable, *args) -> tuple[Any, float]:
    """Runs a jitted `fn`, compiling ahead of time so the returned seconds exclude compilation."""
    leaves, treedef = jax.tree.flatten(args)
    key = (fn, treedef, tuple((x.shape, x.dtype) for x in leaves))
    exe = _EXECUTABLES.get(key)
    if exe is None:
        exe = _EXECUTABLES[key] = fn.lower(*args).compile()
    start = time.perf_counter()
    out = jax.block_until_ready(exe(*args))
    return out, time.perf_counter() - start


# --------------------------------------------------------------------------- prefill


def prefill(params: M.Params, cfg: ModelConfig, ids: jax.Array, lengths: jax.Array, cache: FullCache,
            chunk: int) -> tuple[FullCache, jax.Array]:
    """Feeds right-padded prompts `ids [B, T]` (T a multiple of `chunk`) in chunks.

    Returns the cache with `length = lengths` and the final hidden state of each
    row's last prompt token, `[B, H]`.
    """
    b, t = ids.shape
    n_chunks = t // chunk

    def body(c, carry):
        cache, last = carry
        start = c * chunk
        ids_c = lax.dynamic_slice_in_dim(ids, start, chunk, axis=1)
        pos = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (b, chunk))
        out = M.forward(params, cfg, ids_c, pos, cache.replace(length=jnp.full((b,), start, jnp.int32)))
        idx = lengths - 1 - start
        h = jnp.take_along_axis(out.hidden, jnp.clip(idx, 0, chunk - 1)[:, None, None], axis=1)[:, 0]
        last = jnp.where(((idx >= 0) & (idx < chunk))[:, None], h, last)
        return out.cache, last

    last = jnp.zeros((b, cfg.hidden_size), M.param_dtype(params))
    cache, last = lax.fori_loop(0, n_chunks, body, (cache, last))
    return cache.replace(length=lengths.astype(jnp.int32)), last


@functools.lru_cache(maxsize=None)
def _prefill_fn(cfg: ModelConfig, chunk: int):
    def fn(params, ids, lengths, cache):
        cache, last = prefill(params, cfg, ids, lengths, cache, chunk)
        return cache, M.logits(params, cfg, last)
    return jax.jit(fn, donate_argnums=(3,))


# --------------------------------------------------------------------------- AR decode


@flax.struct.dataclass
class DecodeState:
    """The while_loop carry. tokens: `[B, N]` output buffer; num_out: `[B]` tokens emitted;
    last: `[B]` last emitted token (not yet in the cache); done: `[B]`."""

    cache: FullCache
    tokens: jax.Array
    num_out: jax.Array
    last: jax.Array
    done: jax.Array
    steps: jax.Array
    key: jax.Array


def _emit_first(logits: jax.Array, cache: FullCache, key: jax.Array, sampler: Sampler, eos: jax.Array,
                max_new: int, pad_id: int) -> DecodeState:
    """The state after sampling the first new token from the prefill logits `[B, V]`."""
    key, sub = jax.random.split(key)
    first = sampler.sample(logits, sub)
    b = first.shape[0]
    tokens = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos) | (max_new <= 1)
    return DecodeState(cache=cache, tokens=tokens, num_out=jnp.ones((b,), jnp.int32), last=first,
                       done=done, steps=jnp.zeros((), jnp.int32), key=key)


def ar_step(params: M.Params, cfg: ModelConfig, sampler: Sampler, eos: jax.Array, max_new: int,
            s: DecodeState) -> DecodeState:
    """One target forward over each row's last token; rows that are done stay frozen."""
    b = s.last.shape[0]
    out = M.forward(params, cfg, s.last[:, None], s.cache.length[:, None], s.cache)
    key, sub = jax.random.split(s.key)
    nxt = sampler.sample(M.logits(params, cfg, out.hidden[:, 0]), sub)
    live = ~s.done
    slot = jnp.where(live, s.num_out, max_new)  # out of range for finished rows: dropped
    tokens = s.tokens.at[jnp.arange(b), slot].set(nxt, mode="drop")
    num_out = s.num_out + live
    return DecodeState(
        cache=out.cache.replace(length=s.cache.length + live),
        tokens=tokens, num_out=num_out, last=jnp.where(live, nxt, s.last),
        done=s.done | (live & (jnp.isin(nxt, eos) | (num_out >= max_new))),
        steps=s.steps + 1, key=key)


@functools.lru_cache(maxsize=None)
def _ar_decode_fn(cfg: ModelConfig, sampler: Sampler, max_new: int, pad_id: int):
    def fn(params, cache, logits, key, eos):
        state = _emit_first(logits, cache, key, sampler, eos, max_new, pad_id)
        step = functools.partial(ar_step, params, cfg, sampler, eos, max_new)
        state = lax.while_loop(lambda s: ~jnp.all(s.done), step, state)
        return state.tokens, state.num_out, state.steps, state.cache  # returning the cache lets it be donated
    return jax.jit(fn, donate_argnums=(1,))


# --------------------------------------------------------------------------- public API


def _eos_ids(cfg: ModelConfig, eos_token_ids) -> np.ndarray:
    ids = cfg.eos_token_ids if eos_token_ids is None else tuple(
        [eos_token_ids] if isinstance(eos_token_ids, int) else eos_token_ids)
    # An id no token can have keeps the array non-empty when nothing stops generation.
    return np.array(ids or (-1,), np.int32)


def generate(target: Model, input_ids: Any, max_new_tokens: int = 256, *, draft: Any = None, mode: str = "ar",
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, spec: Any = None,
             attention_mask: Any = None, eos_token_ids: int | tuple[int, ...] | None = None,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> GenerateOutput:
    """Generates up to `max_new_tokens` tokens after each prompt.

    input_ids: a list of ids, a ragged list of lists, or an int array `[T]` / `[B, T]`
    (with an optional 0/1 `attention_mask` for left- or right-padded rows).
    Rows stop at any of `eos_token_ids` (default: the model's EOS ids; `()` never stops).
    Returns `GenerateOutput(tokens [B, n_new], lengths [B], stats)`.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (modes: {', '.join(MODES)})")
    if mode != "ar":
        raise NotImplementedError(f"mode {mode!r} is not implemented yet")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise prompts.PromptError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    cfg = target.cfg
    sampler = Sampler(float(temperature), float(top_p))
    batch = prompts.prepare(input_ids, cfg, max_new_tokens, prefill_chunk, attention_mask)
    chunk = min(prefill_chunk, batch.ids.shape[1])
    max_len = batch.ids.shape[1] + max_new_tokens + 1
    eos = _eos_ids(cfg, eos_token_ids)
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else int(max(eos[0], 0))

    cache = FullCache.zeros(cfg, batch.batch, max_len, target.dtype)
    (cache, logits), prefill_s = timed_call(_prefill_fn(cfg, chunk), target.params, jnp.asarray(batch.ids),
                                            jnp.asarray(batch.lengths), cache)
    decode = _ar_decode_fn(cfg, sampler, int(max_new_tokens), pad_id)
    (tokens, num_out, steps, _), decode_s = timed_call(decode, target.params, cache, logits,
                                                    jax.random.key(seed), jnp.asarray(eos))
    num_out = np.asarray(num_out)
    new_tokens = int(num_out.sum())
    loop_tokens = new_tokens - batch.batch  # the first token of each row comes from prefill
    stats = {
        "mode": mode,
        "steps": int(steps),
        "new_tokens": new_tokens,
        "mean_accept_len": 1.0,
        "full_verifications": 0,
        "partial_verifications": 0,
        "rollbacks": 0,
        "prefill_s": prefill_s,
        "time_s": decode_s,
        "tokens_per_s": loop_tokens / decode_s if decode_s > 0 else 0.0,
    }
    return GenerateOutput(tokens=np.asarray(tokens)[:, : int(num_out.max())], lengths=num_out, stats=stats)


@functools.lru_cache(maxsize=None)
def _logits_chunk_fn(cfg: ModelConfig):
    def fn(params, ids, start, cache):
        b, t = ids.shape
        pos = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        out = M.forward(params, cfg, ids, pos, cache.replace(length=jnp.full((b,), start, jnp.int32)))
        return out.cache, M.logits(params, cfg, out.hidden)
    return jax.jit(fn, donate_argnums=(3,))


def forward_logits(target: Model, input_ids: Any, chunk: int = DEFAULT_PREFILL_CHUNK) -> np.ndarray:
    """Full-context reference logits `[B, T, V]` float32 for equal-length prompts `[B, T]` (or `[T]`)."""
    batch = prompts.prepare(input_ids, target.cfg, 0, chunk)
    if len(set(batch.lengths.tolist())) != 1:
        raise prompts.PromptError("forward_logits needs prompts of equal length")
    t = int(batch.lengths[0])
    chunk = min(chunk, batch.ids.shape[1])
    cache = FullCache.zeros(target.cfg, batch.batch, batch.ids.shape[1], target.dtype)
    fn = _logits_chunk_fn(target.cfg)
    out = []
    for start in range(0, t, chunk):
        cache, lg = fn(target.params, jnp.asarray(batch.ids[:, start:start + chunk]), start, cache)
        out.append(np.asarray(lg))
    return np.concatenate(out, axis=1)[:, :t]
