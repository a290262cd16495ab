"""EAGLE-3 head training with training-time test (TTT), and the YaRN long-context fine-tune.

Training-time test unrolls the head on its own outputs for `unroll` steps, as
drafting does. Step j at slot i stands for the pair at position i + j: its
hidden input is the target feature of position i (j = 0) or the head's step
j - 1 output at slot i; its token is `ids[i + j + 1]`; it predicts token
i + j + 2. It attends to the step-0 keys of slots <= i (the committed context)
and to its own slot's keys of steps 1..j (its drafted ancestors), exactly the
attention a tree node gets at inference. The loss at step j is the
cross-entropy against the target's next-token distribution restricted to the
draft vocabulary, at the positions whose target argmax the draft vocabulary
holds, weighted 0.8^j (the EAGLE-3 recipe).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from specpv_jax import model
from specpv_jax.config import DraftConfig, ModelConfig, RopeConfig
from specpv_jax.draft import eagle3
from specpv_jax.model import Params
from specpv_jax.speculative import flat_features
from specpv_jax.train import corpus
from specpv_jax.train.lm import positions_for
from specpv_jax.train.trainer import TrainConfig, digest, fit, params_digest

STEP_WEIGHT = 0.8
WORK_DIRS = ("eagle3", "eagle3_long")  # under `train_eagle3(work=)`: the TTT phase's checkpoints, the YaRN one's


def draft_vocabulary(token_docs: list[np.ndarray], vocab_size: int, draft_vocab_size: int) -> np.ndarray:
    """The `draft_vocab_size` most frequent target ids in the corpus, sorted (ties: lower id first)."""
    counts = np.bincount(np.concatenate(token_docs), minlength=vocab_size)[:vocab_size]
    top = np.argsort(-counts, kind="stable")[:draft_vocab_size]
    return np.sort(top).astype(np.int32)


def _shift(x: jax.Array, by: int) -> jax.Array:
    """x[:, i + by] at slot i, zero-padded past the end (axis 1)."""
    if by == 0:
        return x
    pad = jnp.zeros((x.shape[0], by) + x.shape[2:], x.dtype)
    return jnp.concatenate([x[:, by:], pad], axis=1)


def unroll(head: Params, dcfg: DraftConfig, embed: jax.Array, features: jax.Array, ids: jax.Array,
           steps: int) -> list[jax.Array]:
    """The head's outputs `[B, T, H]` at each TTT step (see the module docstring).

    features: `[B, T, n_feat * Ht]` target features at positions 0..T-1; ids: `[B, T]`.
    Slot i of step j holds the head's state for the pair at position i + j.
    """
    b, t = ids.shape
    slot = jnp.arange(t)
    causal = slot[:, None] >= slot[None, :]
    diagonal = jnp.eye(t, dtype=bool)
    hidden, keys, values, outputs = features, [], [], []
    for j in range(steps):
        seen = causal  # step 0's keys: the committed pairs, at positions = slots
        if dcfg.sliding_window is not None:  # by position, as drafting reads the cache (step j: i + j)
            seen = causal & (slot[:, None] + j - slot[None, :] < dcfg.sliding_window)
        mask = jnp.broadcast_to(jnp.concatenate([seen] + [diagonal] * j, axis=1), (b, t, t * (j + 1)))
        k_extra = jnp.concatenate(keys, axis=2) if keys else None
        v_extra = jnp.concatenate(values, axis=2) if values else None
        hidden, k, v, _ = eagle3.head_forward(head, dcfg, embed, _shift(ids, j + 1), hidden, positions_for(ids) + j,
                                              None, mask, k_extra, v_extra)
        keys.append(k)
        values.append(v)
        outputs.append(hidden)
    return outputs


def ttt_loss(head: Params, dcfg: DraftConfig, target: Params, tcfg: ModelConfig, draft_ids: jax.Array,
             ids: jax.Array, steps: int) -> tuple[jax.Array, dict]:
    """Weighted TTT loss over `ids [B, T]`; metrics `acc{j}`: the share of step j's positions where the
    draft's argmax is the target's (over the whole vocabulary: one outside the draft's is a miss).

    Positions whose target argmax lies outside the draft vocabulary are left out of the loss (as in EAGLE-3:
    no draft token could be accepted there)."""
    b, t = ids.shape
    out = model.forward(target, tcfg, ids, positions_for(ids), None, capture_layers=dcfg.feature_layers)
    features = jax.lax.stop_gradient(flat_features(out.features))
    full_logits = jax.lax.stop_gradient(model.logits(target, tcfg, out.hidden))
    target_p = jax.nn.softmax(full_logits[..., draft_ids], axis=-1)  # [B, T, Vd]: distribution of token pos + 1
    target_top = jnp.argmax(full_logits, axis=-1)  # [B, T], a target id
    in_draft = jnp.zeros((tcfg.vocab_size,), bool).at[draft_ids].set(True)[target_top]
    outputs = unroll(head, dcfg, target["embed_tokens"]["embedding"], features, ids, steps)
    total, weights, metrics = 0.0, 0.0, {}
    for j, hidden in enumerate(outputs):
        logp = eagle3.head_logprobs(head, dcfg, hidden)
        valid = jnp.broadcast_to((jnp.arange(t) + j + 1 < t).astype(jnp.float32), (b, t))  # predicted token exists
        counted = valid * _shift(in_draft, j + 1)
        ce = -(_shift(target_p, j + 1) * logp).sum(-1)
        hit = (draft_ids[jnp.argmax(logp, -1)] == _shift(target_top, j + 1)).astype(jnp.float32)
        metrics[f"acc{j}"] = (hit * valid).sum() / valid.sum()
        total += STEP_WEIGHT ** j * (ce * counted).sum() / valid.sum()
        weights += STEP_WEIGHT ** j
    return total / weights, metrics


def train_head(head: eagle3.Eagle3, target: Params, tcfg: ModelConfig, draft_ids: np.ndarray,
               batches: Iterator[np.ndarray], tc: TrainConfig, steps: int = 5, checkpoint_dir=None,
               progress: bool = True, desc: str = "eagle3", run: dict | None = None,
               restart_on: tuple[str, ...] = ()) -> tuple[eagle3.Eagle3, list[dict]]:
    """Trains `head` on `[tc.batch, tc.length]` windows with TTT (`steps` unrolled); the target is frozen.
    run: facts identifying the run beyond the head, its vocabulary, the target ("target") and `tc`;
    restart_on: see `trainer.fit`."""
    draft_ids = jnp.asarray(draft_ids, jnp.int32)
    if draft_ids.shape != (head.cfg.draft_vocab_size,):
        raise ValueError(f"draft_ids has shape {draft_ids.shape}, expected ({head.cfg.draft_vocab_size},)")
    run = None if checkpoint_dir is None else {  # (no digests to take without checkpoints)
        "head": head.cfg.to_dict(), "draft_ids": digest(np.asarray(draft_ids)), "unroll": steps,
        "target": params_digest(target), **(run or {})}
    params, history = fit(lambda p, ids, frozen: ttt_loss(p, head.cfg, frozen[0], tcfg, frozen[1], ids, steps),
                          head.params, batches, tc, desc, checkpoint_dir, progress, run, restart_on,
                          frozen=(target, draft_ids))
    return dataclasses.replace(head, params=params), history


def yarn_config(dcfg: DraftConfig, trained_length: int, context: int) -> DraftConfig:
    """The head's config with YaRN RoPE stretching `trained_length` to `context` positions (SpecPV's recipe)."""
    factor = context / trained_length
    if factor <= 1:
        raise ValueError(f"context {context} must exceed the trained length {trained_length} for YaRN")
    rope = RopeConfig(theta=dcfg.rope.theta, kind="yarn", factor=float(factor),
                      original_max_position_embeddings=trained_length)
    return dataclasses.replace(dcfg, rope=rope, max_position_embeddings=context)


def new_head(target_cfg: ModelConfig, draft_ids: np.ndarray, seed: int = 0) -> eagle3.Eagle3:
    """A randomly initialised head for `target_cfg` whose draft vocabulary is `draft_ids` (sorted target ids)."""
    dcfg = DraftConfig.for_target(target_cfg, int(np.asarray(draft_ids).size))
    return eagle3.Eagle3(dcfg, eagle3.init_params(dcfg, jax.random.key(seed)),
                         jnp.asarray(eagle3.d2t_from_token_ids(draft_ids)), source="trained")


def train_eagle3(target: Params, tcfg: ModelConfig, token_docs: list[np.ndarray], draft_vocab_size: int,
                 short: TrainConfig, long: TrainConfig | None = None, context: int | None = None, steps: int = 5,
                 work=None, progress: bool = True, restart_on: tuple[str, ...] = ()) -> tuple[eagle3.Eagle3, dict]:
    """The whole head recipe: draft vocabulary from token frequencies, TTT at `short.length`, then
    (with `long` and `context`) SpecPV's YaRN fine-tune at `long.length` stretching RoPE to `context`.

    The head starts from the target's RoPE without any scaling the target may carry.
    work: directory for resumable checkpoints (`WORK_DIRS`: `eagle3/`, `eagle3_long/`); the YaRN phase starts over when
    the first one was trained further. restart_on: ("target",) where the target comes from an earlier phase
    of the caller's recipe (see `trainer.fit`). Returns (head, last metrics).
    """
    work = pathlib.Path(work) if work is not None else None
    data = {"data": digest(*token_docs)}
    draft_ids = draft_vocabulary(token_docs, tcfg.vocab_size, draft_vocab_size)
    head = new_head(tcfg, draft_ids, short.seed)
    head = dataclasses.replace(head, cfg=dataclasses.replace(head.cfg, rope=RopeConfig(theta=tcfg.rope.theta)))
    stretch = long is not None and context is not None
    short_batches = corpus.batches(token_docs, short.batch, short.length, short.seed + 2)
    long_batches = corpus.batches(token_docs, long.batch, long.length, long.seed + 3) if stretch else None
    head, hist = train_head(head, target, tcfg, draft_ids, short_batches, short, steps,
                            work / WORK_DIRS[0] if work else None, progress, run=data, restart_on=restart_on)
    if stretch:
        head = dataclasses.replace(head, cfg=yarn_config(head.cfg, short.length, context))
        head, more = train_head(head, target, tcfg, draft_ids, long_batches, long, steps,
                                work / WORK_DIRS[1] if work else None, progress, desc="eagle3-yarn",
                                run=None if work is None else {**data, "start": params_digest(head.params)},
                                restart_on=(*restart_on, "start"))
        hist = hist + more
    return head, (hist[-1] if hist else {})
