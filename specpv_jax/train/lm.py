"""Causal-LM training of a target model, and held-out loss by position (does it use long context?)."""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from specpv_jax import model
from specpv_jax.cache import KVCache
from specpv_jax.config import ModelConfig
from specpv_jax.model import Params
from specpv_jax.train.trainer import TrainConfig, fit


def positions_for(ids: jax.Array) -> jax.Array:
    b, t = ids.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def lm_loss(params: Params, cfg: ModelConfig, ids: jax.Array) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy (nats) over `ids [B, T]`."""
    inputs = ids[:, :-1]
    out = model.forward(params, cfg, inputs, positions_for(inputs), None)
    ce = optax.softmax_cross_entropy_with_integer_labels(model.logits(params, cfg, out.hidden), ids[:, 1:])
    return ce.mean(), {}


def train_lm(params: Params, cfg: ModelConfig, batches: Iterator[np.ndarray], tc: TrainConfig,
             checkpoint_dir=None, progress: bool = True, desc: str = "target", run: dict | None = None,
             restart_on: tuple[str, ...] = ()) -> tuple[Params, list[dict]]:
    """Trains (or fine-tunes) a target on `[tc.batch, tc.length + 1]` token windows; run, restart_on: see
    `trainer.fit`."""
    return fit(lambda p, ids: lm_loss(p, cfg, ids), params, batches, tc, desc, checkpoint_dir, progress, run,
               restart_on)


@functools.partial(jax.jit, static_argnums=1)
def _chunk_losses(params, cfg, cache, ids, targets):
    out = model.forward(params, cfg, ids, positions_for(ids) + cache.length[:, None], cache)
    ce = optax.softmax_cross_entropy_with_integer_labels(model.logits(params, cfg, out.hidden), targets)
    return ce, out.cache.replace(length=out.cache.length + ids.shape[1])


def token_losses(params: Params, cfg: ModelConfig, ids: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Cross-entropy of each next token of `ids [N]` given everything before it, `[N - 1]` float32.

    Runs the inference path (KV cache, chunks of `chunk` tokens), so it measures
    what generation sees at long positions.
    """
    ids = np.asarray(ids, np.int32)
    n = ids.size - 1
    padded = -(-n // chunk) * chunk
    inputs = np.zeros(padded, np.int32)
    targets = np.zeros(padded, np.int32)
    inputs[:n], targets[:n] = ids[:-1], ids[1:]
    cache = KVCache.empty(cfg.num_layers, 1, cfg.num_kv_heads, padded, cfg.head_dim, model.param_dtype(params))
    losses = []
    for s in range(0, padded, chunk):
        ce, cache = _chunk_losses(params, cfg, cache, jnp.asarray(inputs[None, s:s + chunk]),
                                  jnp.asarray(targets[None, s:s + chunk]))
        losses.append(ce[0])  # read once at the end: no wait per chunk
    return np.asarray(jnp.concatenate(losses))[:n]


def context_gain(params: Params, cfg: ModelConfig, docs: list[np.ndarray], length: int, short: int = 1024,
                 scored: int = 1024) -> dict[str, float]:
    """How much a long context helps: mean loss on each document's tokens `[length - scored, length)`
    given the whole preceding document vs given only the `short` tokens before them.

    Returns {"long": nats, "short": nats, "gain": short - long} over documents with
    at least `length` tokens. A model that uses long context has gain > 0.
    """
    docs = [d[:length] for d in docs if d.size >= length]
    if not docs:
        raise ValueError(f"no document has {length} tokens")
    long_, short_ = [], []
    for d in docs:
        long_.append(token_losses(params, cfg, d)[-scored:].mean())
        short_.append(token_losses(params, cfg, d[-(scored + short):])[-scored:].mean())
    long_m, short_m = float(np.mean(long_)), float(np.mean(short_))
    return {"long": long_m, "short": short_m, "gain": short_m - long_m, "documents": len(docs)}


def loss_by_position(params: Params, cfg: ModelConfig, docs: list[np.ndarray], edges: tuple[int, ...]) -> list[float]:
    """Mean loss of next tokens in position buckets `[edges[i], edges[i+1])` over documents long enough."""
    docs = [d[: edges[-1] + 1] for d in docs if d.size > edges[-1]]
    if not docs:
        raise ValueError(f"no document has {edges[-1] + 1} tokens")
    losses = np.stack([token_losses(params, cfg, d) for d in docs])
    return [float(losses[:, a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]
