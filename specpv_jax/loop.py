"""Pieces every generation loop shares: static settings, chunked prefill, the emitted-token buffer, the loop.

Their host side (compiled executables, progress bar, streaming) is in `host`."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from specpv_jax import model as M
from specpv_jax import host, offload
from specpv_jax.cache import KVCache
from specpv_jax.config import DraftConfig, LongSpecConfig, ModelConfig, SpecConfig
from specpv_jax.sampling import Sampler


@dataclasses.dataclass(frozen=True)
class Run:
    """The static settings of one generate call; hashable, so it keys the compiled loop.

    Per-call values are arguments of the compiled functions instead: the `Sampler`'s temperature, top_p and
    top_k, the EOS ids (a bucketed length) and the row limit.

    mode: the generate mode; out_slots: output slots per row (max_new_tokens rounded
    up to a bucket, so nearby lengths share one compiled loop; the exact limit is
    a traced value); chunk: prefill chunk;
    attention: "xla" or "pallas" (resolved); spec/dcfg: speculative modes only;
    stream: the decode loop reports each row's newly emitted tokens to the host function
    `host.streaming_to` registers (see `decode_loop`; one compiled loop serves every function);
    progress: prefill reports each chunk to the active progress bar (see `host.prefill_progress`);
    offload: the target's full cache lives in host memory (see `offload`).
    """

    cfg: ModelConfig
    out_slots: int
    chunk: int
    mode: str = "ar"
    attention: str = "xla"
    spec: SpecConfig | None = None
    dcfg: DraftConfig | ModelConfig | LongSpecConfig | None = None
    stream: bool = False
    progress: bool = False
    offload: bool = False

    @property
    def decode_key(self) -> "Run":
        """The settings the decode loop depends on (the progress bar is prefill's: it recompiles no loop)."""
        return dataclasses.replace(self, progress=False)

    @property
    def prefill_key(self) -> "Run":
        """The settings prefill depends on (so other changes do not recompile it)."""
        return Run(cfg=self.cfg, out_slots=0, chunk=self.chunk, attention=self.attention, dcfg=self.dcfg,
                   progress=self.progress, offload=self.offload)


def output_bucket(max_new: int) -> int:
    """Output buffer size for `max_new` tokens: the next power of two, at least 16."""
    return max(16, 1 << (int(max_new) - 1).bit_length())


def prefill(params: M.Params, run: Run, ids: jax.Array, lengths: jax.Array, cache: KVCache,
            capture_layers: tuple[int, ...] = (), consume: Callable | None = None,
            extra: Any = None, window: int | None = None) -> tuple[KVCache, jax.Array, jax.Array, Any]:
    """Feeds right-padded prompts `ids [B, T]` (T a multiple of `run.chunk`) in chunks (each token seeing the
    `window` latest positions only, itself included, if given: `model.forward`'s).

    `consume(extra, start, next_ids [B, C], features [n, B, C, H]) -> extra` sees
    each chunk's captured features with the token that follows each position
    (the draft's own prefill). Returns the cache with `length = lengths`, the
    final hidden state `[B, H]` and captured features `[n, B, H]` of each row's
    last prompt token, and `extra`.

    With `run.offload` the cache is in host memory, which the target fills a
    layer at a time (`model.forward_by_layer`, every chunk of a layer before the
    next): each layer's K/V are written there once and never read back. The
    prompt's hidden states and captured features `[1 + n, B, T, H]` stay on the
    device meanwhile; `consume` then takes the chunks in order.
    """
    cfg, chunk = run.cfg, run.chunk
    b, t = ids.shape
    next_ids = jnp.concatenate([ids[:, 1:], jnp.zeros((b, 1), ids.dtype)], axis=1)
    if run.offload:
        if window is not None:
            raise ValueError("prefill: window= needs the cache on the device, not offloaded")
        return _prefill_by_layer(params, run, ids, next_ids, lengths, cache, capture_layers, consume, extra)

    def body(c, carry):
        cache, last, last_feats, extra = carry
        start = c * chunk
        ids_c = lax.dynamic_slice_in_dim(ids, start, chunk, axis=1)
        pos = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (b, chunk))
        out = M.forward(params, cfg, ids_c, pos, cache.replace(length=jnp.full((b,), start, jnp.int32)),
                        capture_layers=capture_layers, attention=run.attention, window=window)
        if consume is not None:
            extra = consume(extra, start, lax.dynamic_slice_in_dim(next_ids, start, chunk, axis=1), out.features)
        if run.progress:
            jax.debug.callback(host.tick, c)  # unordered: a count needs no order, and works on any mesh
        idx = lengths - 1 - start
        here = (idx >= 0) & (idx < chunk)
        pick = jnp.clip(idx, 0, chunk - 1)
        h = jnp.take_along_axis(out.hidden, pick[:, None, None], axis=1)[:, 0]
        f = jnp.take_along_axis(out.features, pick[None, :, None, None], axis=2)[:, :, 0]
        return (out.cache, jnp.where(here[:, None], h, last), jnp.where(here[None, :, None], f, last_feats), extra)

    dtype = M.param_dtype(params)
    init = (cache, jnp.zeros((b, cfg.hidden_size), dtype),
            jnp.zeros((len(capture_layers), b, cfg.hidden_size), dtype), extra)
    cache, last, last_feats, extra = lax.fori_loop(0, t // chunk, body, init)
    return cache.replace(length=lengths.astype(jnp.int32)), last, last_feats, extra


def _prefill_by_layer(params: M.Params, run: Run, ids: jax.Array, next_ids: jax.Array, lengths: jax.Array,
                      cache: KVCache, capture_layers: tuple[int, ...], consume: Callable | None, extra: Any):
    """`prefill` into a host-memory cache (`run.offload`), a layer at a time."""
    chunk, n_layers, t = run.chunk, run.cfg.num_layers, ids.shape[1]

    def store(cache, layer, k, v):
        return cache.replace(k=offload.write_rows(cache.k, k[None], 0, layer),
                             v=offload.write_rows(cache.v, v[None], 0, layer))

    def tick(step):  # the bar counts chunks: L layer-chunk steps make one, advanced in whole chunks
        jax.debug.callback(host.tick, step, (step + 1) // n_layers - step // n_layers)

    x, feats, cache = M.forward_by_layer(params, run.cfg, ids, chunk, cache.max_len, store, cache, capture_layers,
                                         run.attention, tick if run.progress else None)
    if consume is not None:
        def feed(c, extra):
            start = c * chunk
            return consume(extra, start, lax.dynamic_slice_in_dim(next_ids, start, chunk, axis=1),
                           lax.dynamic_slice_in_dim(feats, start, chunk, axis=2))

        extra = lax.fori_loop(0, t // chunk, feed, extra)
    last = lengths - 1
    hidden = M.final_norm(params, run.cfg, jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0])
    return (cache.replace(length=lengths.astype(jnp.int32)), hidden,
            jnp.take_along_axis(feats, last[None, :, None, None], axis=2)[:, :, 0], extra)


@flax.struct.dataclass
class Output:
    """The part of the loop carry that collects results. tokens: `[B, N]`; num_out, done: `[B]`;
    limit: tokens wanted per row (traced, <= N); steps: `append` calls (the loop's iterations, except in
    exact mode, whose partial steps hold tokens back: `specpv.Counters` counts its steps); row_steps: the
    appends' live rows; emitted: tokens they emitted; finite: whether every target logit that chose a token
    was finite (a model overflowing its dtype gives NaN, whose argmax is token 0); draft_nan_steps: speculative
    steps whose tree came from NaN draft log-probabilities in a live row (`Tree.draft_nan`)."""

    tokens: jax.Array
    num_out: jax.Array
    done: jax.Array
    limit: jax.Array
    steps: jax.Array
    row_steps: jax.Array
    emitted: jax.Array
    finite: jax.Array
    draft_nan_steps: jax.Array

    @classmethod
    def start(cls, run: Run, first: jax.Array, eos: jax.Array, limit: jax.Array, logits: jax.Array) -> "Output":
        """The buffer after each row's first token `[B]` (sampled from the prefill `logits [B, V]`); slots after
        a row's end hold the model's pad id, else the first EOS id (0 if none)."""
        b = first.shape[0]
        zero = jnp.zeros((), jnp.int32)
        pad = run.cfg.pad_token_id if run.cfg.pad_token_id is not None else jnp.maximum(eos[0], 0)
        return cls(tokens=jnp.full((b, run.out_slots), pad, jnp.int32).at[:, 0].set(first),
                   num_out=jnp.ones((b,), jnp.int32), done=jnp.isin(first, eos) | (limit <= 1),
                   limit=jnp.asarray(limit, jnp.int32), steps=zero, row_steps=zero, emitted=zero,
                   finite=jnp.isfinite(logits).all(), draft_nan_steps=zero)

    @classmethod
    def first_token(cls, run: Run, sampler: Sampler, logits: jax.Array, key: jax.Array, eos: jax.Array,
                    limit: jax.Array) -> tuple[jax.Array, "Output", jax.Array]:
        """Samples each row's first token `[B]` from the prefill `logits [B, V]`, as every mode does (the same
        seed, the same first token); returns it, the buffer holding it (`start`) and the key to go on with."""
        key, sub = jax.random.split(key)
        first = sampler.sample(logits, sub)
        return first, cls.start(run, first, eos, limit, logits), key

    def kept(self, new: jax.Array, count: jax.Array, eos: jax.Array, ahead: Any = 0) -> tuple[jax.Array, jax.Array]:
        """How many of `new [B, P]`'s first `count [B]` tokens a row keeps after `ahead [B]` tokens not yet
        appended (exact mode's provisional ones): up to its first EOS, within `limit`, none once done; and
        whether it keeps an EOS. Both `[B]`."""
        slot = jnp.arange(new.shape[1])[None, :]
        is_eos = jnp.isin(new, eos) & (slot < count[:, None])
        hit_eos = is_eos.any(1)
        count = jnp.where(hit_eos, jnp.argmax(is_eos, axis=1) + 1, count)
        return jnp.where(self.done, 0, jnp.minimum(count, self.limit - self.num_out - ahead)), hit_eos

    def append(self, new: jax.Array, count: jax.Array, eos: jax.Array, finite: jax.Array,
               draft_nan: jax.Array | None = None) -> "Output":
        """Appends `new [B, P]` (first `count [B]` valid) to live rows, stopping at EOS and at `limit`; `finite`:
        whether the target's logits that chose them were all finite; `draft_nan [B]`: the tree's
        `Tree.draft_nan`, for speculative steps."""
        b, p = new.shape
        live = ~self.done
        slot = jnp.arange(p)[None, :]
        count, hit_eos = self.kept(new, count, eos)
        dest = jnp.where(slot < count[:, None], self.num_out[:, None] + slot, self.tokens.shape[1])
        tokens = self.tokens.at[jnp.arange(b)[:, None], dest].set(new, mode="drop")
        num_out = self.num_out + count
        out = self if draft_nan is None else self.count_draft_nan(draft_nan)
        return out.replace(tokens=tokens, num_out=num_out,
                           done=self.done | (live & (hit_eos | (num_out >= self.limit))),
                           steps=self.steps + 1, row_steps=self.row_steps + live.sum(),
                           emitted=self.emitted + count.sum(), finite=self.finite & finite)

    def count_draft_nan(self, draft_nan: jax.Array) -> "Output":
        """Counts a step whose tree came from NaN draft log-probabilities (`draft_nan [B]`, `Tree.draft_nan`) in a
        live row; `append` calls it, exact mode's partial steps (which append nothing) too."""
        return self.replace(draft_nan_steps=self.draft_nan_steps + jnp.any(~self.done & draft_nan).astype(jnp.int32))


def run_if(pred: jax.Array, fn: Callable[[Any], Any], operand: Any) -> Any:
    """`fn(operand)` where the scalar bool `pred` holds, else `operand` (`fn` keeps its structure and types).

    A `lax.cond` whose other side is the identity, written as a while loop of zero or one trips: the XLA of JAX
    0.10.2 never lets a conditional's result share its operand's buffers, so `lax.cond` copies every buffer a
    branch updates (in the SpecPV loop: the whole KV cache, every step), while a loop updates its carry in
    place. (JAX 0.11's XLA elides such copies in simple cases; a loop needs no such luck.)
    """
    return lax.while_loop(lambda c: c[0], lambda c: (jnp.zeros_like(c[0]), fn(c[1])), (pred, operand))[1]


def decode_loop(run: Run, step: Callable, state: Any, out_of: Callable[[Any], Output] = lambda s: s.out) -> Any:
    """Runs `step` until every row is done.

    With `run.stream`, the function `host.streaming_to` registered receives, after the first token and
    after each step, a list with each row's newly emitted tokens (`np.ndarray`, possibly
    empty): only tokens in the output buffer, so exact mode streams confirmed tokens.
    """
    # Ordered effects exist for one device only, and their token does not compile beside offload's host-memory
    # outputs (JAX 0.10-0.11); unordered reports may arrive out of order, which `host.deliver` absorbs.
    ordered = jax.device_count() == 1 and not run.offload

    def reporting_step(s):
        s = step(s)
        _report(out_of(s), ordered)
        return s

    if run.stream:
        _report(out_of(state), ordered)
    return lax.while_loop(lambda s: ~jnp.all(out_of(s).done), reporting_step if run.stream else step, state)


def _report(out: Output, ordered: bool) -> None:
    jax.debug.callback(host.deliver, out.tokens, out.num_out, ordered=ordered)
