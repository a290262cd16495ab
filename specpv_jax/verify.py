"""Tree acceptance: which drafted path the target keeps, and its bonus token.

Greedy: a node is accepted when its token equals the target's argmax at its
parent and its parent is accepted; siblings carry distinct tokens, so the
accepted nodes form one root-to-node path, and the bonus token is the argmax at
its end.

Sampling (lossless): at the current node with target distribution p, try the
children in order; accept child x with probability p(x), otherwise set
p(x) = 0 and renormalise. Draft tokens are deterministic proposals, so this
emits exactly p: P(x) = p(x) for the first child, and by induction for the
rest; if every child is rejected the bonus token is drawn from the residual p.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from specpv_jax.sampling import Sampler, sample_from
from specpv_jax.tree import Tree, path_nodes


@flax.struct.dataclass
class Acceptance:
    """path: `[B, D + 1]` node ids from the root, valid for `count + 1` entries;
    count: `[B]` accepted draft nodes (beyond the root); bonus: `[B]` the target's next token;
    finite: whether the logits it was decided on were all finite (scalar bool; see `Output.finite`)."""

    path: jax.Array
    count: jax.Array
    bonus: jax.Array
    finite: Any = True

    def emitted(self, tree: Tree) -> jax.Array:
        """Tokens this step emits, `[B, D + 1]`: accepted draft tokens then the bonus token (valid `count + 1`)."""
        tokens = jnp.take_along_axis(tree.tokens, self.path, axis=1)
        shifted = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
        slot = jnp.arange(tokens.shape[1])[None]
        return jnp.where(slot == self.count[:, None], self.bonus[:, None], shifted)

    def along_path(self, x: jax.Array) -> jax.Array:
        """Per-node values `x [B, N, ...]` at the path's nodes: `[B, D + 1, ...]`."""
        return jnp.take_along_axis(x, self.path.reshape(self.path.shape + (1,) * (x.ndim - 2)), axis=1)


def accept(tree: Tree, logits: jax.Array, sampler: Sampler, key: jax.Array) -> Acceptance:
    """Acceptance for target `logits [B, N, V]` at every tree node."""
    acc = accept_greedy(tree, logits) if sampler.greedy else accept_sampling(tree, sampler.probs(logits), key)
    return acc.replace(finite=jnp.isfinite(logits).all())


def accept_greedy(tree: Tree, logits: jax.Array) -> Acceptance:
    """Acceptance for target `logits [B, N, V]` under greedy decoding (siblings are distinct: one path matches)."""
    max_depth = tree.max_depth
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    match = tree.tokens == jnp.take_along_axis(pred, tree.parents, axis=1)
    match = match.at[:, 0].set(True)
    accepted = lax.fori_loop(0, max_depth, lambda _, a: match & jnp.take_along_axis(a, tree.parents, axis=1), match)
    deepest = jnp.argmax(jnp.where(accepted, tree.depth, -1), axis=1)
    row = jnp.take_along_axis(tree.mask, deepest[:, None, None], axis=1)[:, 0]
    return Acceptance(path=path_nodes(row, tree.depth, max_depth),
                      count=jnp.take_along_axis(tree.depth, deepest[:, None], axis=1)[:, 0],
                      bonus=jnp.take_along_axis(pred, deepest[:, None], axis=1)[:, 0])


def accept_sampling(tree: Tree, probs: jax.Array, key: jax.Array) -> Acceptance:
    """Recursive rejection over siblings; `probs [B, N, V]` are the target's sampling distributions."""
    max_depth = tree.max_depth
    width = tree.children.shape[-1]

    def one(tokens, children, probs, key):
        def try_child(level, j, carry):
            node, p, chosen, stopped = carry
            child = children[node, j]
            token = tokens[jnp.maximum(child, 0)]
            live = (child >= 0) & (chosen < 0) & ~stopped
            u = jax.random.uniform(jax.random.fold_in(key, level * width + j))
            take = live & (u < p[token])
            rejected = p.at[token].set(0.0)
            total = rejected.sum()
            residual = jnp.where(total > 0, rejected / jnp.maximum(total, 1e-30), p)
            p = jnp.where(live & ~take, residual, p)
            return node, p, jnp.where(take, child, chosen), stopped

        def level_step(level, carry):
            node, p, path, count, stopped = carry
            _, p, chosen, _ = lax.fori_loop(0, width, lambda j, c: try_child(level, j, c),
                                            (node, p, jnp.int32(-1), stopped))
            advance = chosen >= 0
            node = jnp.where(advance, chosen, node)
            p = jnp.where(advance, probs[jnp.maximum(chosen, 0)], p)
            count = count + advance
            path = jnp.where(advance, path.at[count].set(chosen), path)
            return node, p, path, count, stopped | ~advance

        init = (jnp.int32(0), probs[0], jnp.zeros(max_depth + 1, jnp.int32), jnp.int32(0), jnp.bool_(False))
        _, p, path, count, _ = lax.fori_loop(0, max_depth, level_step, init)
        bonus = sample_from(p, jax.random.fold_in(key, max_depth * width))
        return path, count, bonus

    keys = jax.random.split(key, probs.shape[0])
    path, count, bonus = jax.vmap(one)(tree.tokens, tree.children, probs, keys)
    return Acceptance(path=path, count=count, bonus=bonus)
