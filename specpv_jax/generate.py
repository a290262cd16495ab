"""Generation: jitted chunked prefill, then one jitted `lax.while_loop` per call.

`generate` is the public entry point; modes other than "ar" plug their step
function into the same prefill / loop / stats scaffolding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from specpv_jax import model as M
from specpv_jax import prompts, specpv, speculative
from specpv_jax.attention import resolve_implementation
from specpv_jax.cache import KVCache
from specpv_jax.config import ModelConfig, SpecConfig
from specpv_jax.draft import eagle3
from specpv_jax.loading import Model
from specpv_jax.loop import Output, Run, output_bucket, prefill, timed_call
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


@functools.lru_cache(maxsize=None)
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


def ar_step(params: M.Params, run: Run, eos: jax.Array, s: ARState) -> ARState:
    """One target forward over each row's last token; finished rows keep their cache length."""
    out = M.forward(params, run.cfg, s.last[:, None], s.cache.length[:, None], s.cache, attention=run.attention)
    key, sub = jax.random.split(s.key)
    nxt = run.sampler.sample(M.logits(params, run.cfg, out.hidden[:, 0]), sub)
    live = ~s.out.done
    return ARState(cache=out.cache.replace(length=s.cache.length + live),
                   out=s.out.append(nxt[:, None], jnp.ones_like(nxt), eos),
                   last=jnp.where(live, nxt, s.last), key=key)


@functools.lru_cache(maxsize=None)
def _ar_decode_fn(run: Run):
    def fn(params, cache, logits, key, eos, limit):
        key, sub = jax.random.split(key)
        first = run.sampler.sample(logits, sub)
        state = ARState(cache=cache, out=Output.start(first, eos, run.buffer, run.pad_id, limit), last=first, key=key)
        state = lax.while_loop(lambda s: ~jnp.all(s.out.done), functools.partial(ar_step, params, run, eos), state)
        return state.out, state.cache  # returning the cache lets it be donated
    return jax.jit(fn, donate_argnums=(1,))


# --------------------------------------------------------------------------- public API


def _eos_ids(cfg: ModelConfig, eos_token_ids) -> np.ndarray:
    ids = cfg.eos_token_ids if eos_token_ids is None else tuple(
        [eos_token_ids] if isinstance(eos_token_ids, int) else eos_token_ids)
    # An id no token can have keeps the array non-empty when nothing stops generation.
    return np.array(ids or (-1,), np.int32)


def _check_draft(target: Model, draft: Any, mode: str) -> None:
    if mode == "ar":
        return
    if draft is None:
        raise ValueError(f"mode {mode!r} needs a draft: pass draft=sj.load_draft(path, target)")
    if getattr(draft, "kind", None) != "eagle3":
        raise ValueError(f"mode {mode!r} needs an EAGLE-3 draft, got {type(draft).__name__}")
    if draft.cfg.target_hidden_size != target.cfg.hidden_size or draft.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError("the draft was loaded for a different target (hidden size or vocabulary differ); "
                         "load it with sj.load_draft(path, target)")


def generate(target: Model, input_ids: Any, max_new_tokens: int = 256, *, draft: Any = None, mode: str = "ar",
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, spec: SpecConfig | None = None,
             attention_mask: Any = None, eos_token_ids: int | tuple[int, ...] | None = None,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK, attention: str = "auto") -> GenerateOutput:
    """Generates up to `max_new_tokens` tokens after each prompt.

    input_ids: a list of ids, a ragged list of lists, or an int array `[T]` / `[B, T]`
    (with an optional 0/1 `attention_mask` for left- or right-padded rows).
    mode: "ar" (one target step per token) or "eagle" (tree speculation with an
    EAGLE-3 `draft`, lossless). Rows stop at any of `eos_token_ids` (default: the
    model's EOS ids; `()` never stops). attention: "auto" (Pallas kernels on GPU,
    XLA elsewhere), "xla" or "pallas".
    Returns `GenerateOutput(tokens [B, n_new], lengths [B], stats)`.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (modes: {', '.join(MODES)})")
    if mode not in ("ar", "eagle", "specpv", "exact"):
        raise NotImplementedError(f"mode {mode!r} is not implemented yet")
    _check_draft(target, draft, mode)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise prompts.PromptError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
    spec = spec or SpecConfig()
    cfg = target.cfg
    batch = prompts.prepare(input_ids, cfg, max_new_tokens, prefill_chunk, attention_mask)
    eos = jnp.asarray(_eos_ids(cfg, eos_token_ids))
    speculative_mode = mode != "ar"
    run = Run(cfg=cfg, sampler=Sampler(float(temperature), float(top_p)), buffer=output_bucket(max_new_tokens),
              pad_id=cfg.pad_token_id if cfg.pad_token_id is not None else int(max(int(eos[0]), 0)),
              chunk=min(prefill_chunk, batch.ids.shape[1]), mode=mode, attention=resolve_implementation(attention),
              spec=spec if speculative_mode else None, dcfg=draft.cfg if speculative_mode else None)
    # Room for the prompt bucket, the new tokens, and the scratch of one verification beyond them.
    scratch = {"ar": 1, "eagle": spec.tree_nodes + 1}.get(mode, spec.max_missing + spec.tree_nodes + 1)
    max_len = batch.ids.shape[1] + run.buffer + scratch
    if mode in ("specpv", "exact"):  # block retrieval needs at least a partial cache's worth of blocks
        max_len = max(max_len, spec.static_tokens + spec.block_size)
    ids, lengths, key = jnp.asarray(batch.ids), jnp.asarray(batch.lengths), jax.random.key(seed)
    limit = jnp.asarray(max_new_tokens, jnp.int32)
    cache = KVCache.zeros(cfg, batch.batch, max_len, target.dtype)

    counters = None
    if mode == "ar":
        (cache, logits), prefill_s = timed_call(_prefill_fn(run.prefill_key), target.params, ids, lengths, cache)
        (out, _), decode_s = timed_call(_ar_decode_fn(run), target.params, cache, logits, key, eos, limit)
    else:
        draft_cache = eagle3.empty_cache(draft.cfg, batch.batch, cache.max_len, draft.params)
        (cache, draft_cache, logits, feats), prefill_s = timed_call(
            speculative.eagle_prefill_fn(run.prefill_key), target.params, draft.params, ids, lengths, cache,
            draft_cache)
        args = (target.params, draft.params, draft.d2t, cache, draft_cache, logits, feats, key, eos, limit)
        if mode == "eagle":
            (out, _, _), decode_s = timed_call(speculative.eagle_decode_fn(run), *args)
        else:
            (out, counters, _, _), decode_s = timed_call(specpv.specpv_decode_fn(run), *args)

    num_out = np.asarray(out.num_out)
    stats = {"mode": mode, "new_tokens": int(num_out.sum()), **_step_stats(out, counters, speculative_mode),
             "prefill_s": prefill_s, "time_s": decode_s,
             # The first token of each row comes from prefill.
             "tokens_per_s": int(out.emitted) / decode_s if decode_s > 0 else 0.0}
    return GenerateOutput(tokens=np.asarray(out.tokens)[:, : int(num_out.max())], lengths=num_out, stats=stats)


def _step_stats(out: Output, counters, speculative_mode: bool) -> dict[str, Any]:
    """Verification counts and mean accepted lengths (tokens per verification and row)."""
    if counters is None:  # ar and eagle: every step is one target pass per live row
        rows = int(out.row_steps)
        mean = int(out.emitted) / rows if rows else 0.0
        full = int(out.steps) if speculative_mode else 0
        return {"steps": int(out.steps), "mean_accept_len": mean, "mean_accept_len_full": mean if full else 0.0,
                "mean_accept_len_partial": 0.0, "full_verifications": full, "partial_verifications": 0,
                "rollbacks": 0}
    c = jax.tree.map(int, counters)

    def ratio(a, b):
        return a / b if b else 0.0

    return {"steps": c.full + c.partial,
            "mean_accept_len": ratio(c.full_accepted + c.partial_accepted, c.full_rows + c.partial_rows),
            "mean_accept_len_full": ratio(c.full_accepted, c.full_rows),
            "mean_accept_len_partial": ratio(c.partial_accepted, c.partial_rows),
            "full_verifications": c.full, "partial_verifications": c.partial, "rollbacks": c.rollbacks}


@functools.lru_cache(maxsize=None)
def _chunk_fn(cfg: ModelConfig, attention: str, argmax: bool):
    def fn(params, ids, start, cache):
        b, t = ids.shape
        pos = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        out = M.forward(params, cfg, ids, pos, cache.replace(length=jnp.full((b,), start, jnp.int32)),
                        attention=attention)
        logits = M.logits(params, cfg, out.hidden)
        return out.cache, jnp.argmax(logits, -1).astype(jnp.int32) if argmax else logits
    return jax.jit(fn, donate_argnums=(3,))


def _full_context_pass(target: Model, input_ids: Any, chunk: int, attention: str, argmax: bool) -> np.ndarray:
    batch = prompts.prepare(input_ids, target.cfg, 0, chunk)
    if len(set(batch.lengths.tolist())) != 1:
        raise prompts.PromptError("all prompts must have the same length here")
    t = int(batch.lengths[0])
    chunk = min(chunk, batch.ids.shape[1])
    cache = KVCache.zeros(target.cfg, batch.batch, batch.ids.shape[1], target.dtype)
    fn = _chunk_fn(target.cfg, resolve_implementation(attention), argmax)
    out = []
    for start in range(0, t, chunk):
        cache, part = fn(target.params, jnp.asarray(batch.ids[:, start:start + chunk]), start, cache)
        out.append(np.asarray(part))
    return np.concatenate(out, axis=1)[:, :t]


def forward_logits(target: Model, input_ids: Any, chunk: int = DEFAULT_PREFILL_CHUNK,
                   attention: str = "auto") -> np.ndarray:
    """Full-context reference logits `[B, T, V]` float32 for equal-length prompts `[B, T]` (or `[T]`)."""
    return _full_context_pass(target, input_ids, chunk, attention, argmax=False)


def fidelity(target: Model, input_ids: Any, output: GenerateOutput, attention_mask: Any = None,
             chunk: int = DEFAULT_PREFILL_CHUNK) -> float:
    """Fraction of generated tokens equal to the full-context target's argmax given the same prefix.

    Teacher-forced: each row's prompt + generated tokens go through the target in
    one pass. 1.0 for any lossless greedy generation; `specpv` trades some for speed.
    """
    batch = prompts.prepare(input_ids, target.cfg, 0, chunk, attention_mask)
    matched = total = 0
    for b, n in enumerate(batch.lengths):
        generated = output.tokens[b, : output.lengths[b]]
        if generated.size == 0:
            continue
        sequence = np.concatenate([batch.ids[b, :n], generated])[None]
        predicted = _full_context_pass(target, sequence, chunk, "auto", argmax=True)[0, n - 1: n - 1 + generated.size]
        matched += int((predicted == generated).sum())
        total += generated.size
    return matched / total if total else 1.0
