"""LongSpec draft training: anchor-offset position indices and a lagged view of the target's K/V.

Each training row is a window of at most ~1200 tokens. With anchor offsets its
positions are `[0..s-1, s+O..L-1+O]` (sink `s ~ U{0..4}`, offset
`O ~ U{0..max(min(30000, max_len - 1000) - L, 0)}`), so a draft trained on
short text meets the large position indices of long-context inference; the
target runs at the same positions, since the draft's cross-attention queries
meet the target's rotated keys. Token i's cross-attention sees the target's
last-layer K/V of tokens j <= i - lag, lag ~ U{1..4} per row: at inference a
tree node of depth d sees the target's cache d + 1 positions back. The loss is
the cross-entropy against the target's next-token distribution (distillation: the
draft is judged by agreeing with the target; LongSpec's reference trains on the
text's own next tokens, and keeps the tokens that see no target key in its loss).
"""

from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from specpv_jax import model
from specpv_jax.config import LongSpecConfig, ModelConfig
from specpv_jax.draft import longspec
from specpv_jax.model import Params
from specpv_jax.train import corpus
from specpv_jax.train.trainer import TrainConfig, digest, fit, params_digest

MAX_SINK = 4
MAX_OFFSET = 30000
OFFSET_MARGIN = 1000
MAX_LAG = 4


def anchor_offset_positions(rng: np.random.Generator, length: int, max_len: int) -> np.ndarray:
    """One row's positions `[length]` int32: a sink of `s ~ U{0..4}` tokens at 0.., the rest shifted by
    `O ~ U{0..max(min(30000, max_len - 1000) - length, 0)}`."""
    sink = int(rng.integers(0, MAX_SINK + 1))
    offset = int(rng.integers(0, max(min(MAX_OFFSET, max_len - OFFSET_MARGIN) - length, 0) + 1))
    positions = np.arange(length, dtype=np.int32)
    positions[sink:] += offset
    return positions


def batches(token_docs: list[np.ndarray], batch: int, length: int, max_len: int, seed: int,
            anchor_offset: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Endless (ids `[batch, length]`, positions `[batch, length]`, lag `[batch]`) training batches;
    positions plain `0..length-1` without `anchor_offset` (the ablation)."""
    rng = np.random.default_rng(seed + 1)
    for ids in corpus.batches(token_docs, batch, length, seed):
        if anchor_offset:
            positions = np.stack([anchor_offset_positions(rng, length, max_len) for _ in range(batch)])
        else:
            positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()
        yield ids, positions, rng.integers(1, MAX_LAG + 1, batch).astype(np.int32)


def loss(params: Params, cfg: LongSpecConfig, target: Params, tcfg: ModelConfig, ids: jax.Array,
         positions: jax.Array, lag: jax.Array) -> tuple[jax.Array, dict]:
    """Cross-entropy of the draft against the target's next-token distribution; metric `acc`
    (draft argmax == target argmax). Tokens that see no target key (i < lag) are left out."""
    b, t = ids.shape
    out = model.forward(target, tcfg, ids, positions, None, collect_kv=True)
    target_k, target_v = (jax.lax.stop_gradient(x[-1]) for x in out.new_kv)
    target_logits = jax.lax.stop_gradient(model.logits(target, tcfg, out.hidden))
    hidden = longspec.train_forward(params, cfg, target["embed_tokens"]["embedding"], ids, positions, target_k,
                                    target_v, lag)
    logp = longspec.logprobs(params, cfg, target, tcfg, hidden)
    valid = (jnp.arange(t)[None, :] >= lag[:, None]).astype(jnp.float32)
    ce = -(jax.nn.softmax(target_logits, axis=-1) * logp).sum(-1)
    hit = (jnp.argmax(logp, -1) == jnp.argmax(target_logits, -1)).astype(jnp.float32)
    return (ce * valid).sum() / valid.sum(), {"acc": (hit * valid).sum() / valid.sum()}


def train_longspec(target: Params, tcfg: ModelConfig, token_docs: list[np.ndarray], tc: TrainConfig,
                   anchor_offset: bool = True, window: int = 512, work=None, progress: bool = True,
                   desc: str = "longspec",
                   restart_on: tuple[str, ...] = ()) -> tuple[longspec.LongSpecDraft, list[dict]]:
    """Trains a LongSpec draft for a frozen target on `[tc.batch, tc.length]` windows (LongSpec trains on
    <= 1200 tokens). work: a directory for resumable checkpoints; restart_on: see `trainer.fit` (its run holds
    the target's digest as "target"). Returns (draft, metrics history)."""
    if tc.length > 1200:
        raise ValueError(f"LongSpec trains on short windows (<= 1200 tokens), got length {tc.length}")
    cfg = LongSpecConfig.for_target(tcfg, window)
    params = longspec.init_params(cfg, jax.random.key(tc.seed))
    data = batches(token_docs, tc.batch, tc.length, tcfg.max_position_embeddings, tc.seed + 5, anchor_offset)
    run = None if work is None else {"draft": cfg.to_dict(), "anchor_offset": anchor_offset,
                                     "data": digest(*token_docs), "target": params_digest(target)}
    params, history = fit(lambda p, batch, target: loss(p, cfg, target, tcfg, *batch), params, data, tc, desc,
                          work, progress, run=run, restart_on=restart_on, frozen=target)
    return longspec.LongSpecDraft(cfg, params, source="trained"), history
