"""Static-shape draft trees: EAGLE-3's top-k tree (`topK_genrate`) and LongSpec's beam tree.

Candidates arrive level by level, `top_k` children of the root first. A top-k
tree then expands the `top_k` best nodes of each level (its frontier) by
`top_k` children each, all `top_k**2` of them candidates. A beam tree expands
every node of a level and keeps the level's `top_k**2` best children overall
(LongSpec's static tree [4, 16, 16, 16, 16] is top_k 4, depth 5). Both propose
`top_k + (depth - 1) * top_k**2` candidates. Every candidate carries its
cumulative log-probability, which only decreases along a path, so keeping the
`n` best candidates keeps a valid tree. Node 0 is the root (the last emitted
token); nodes 1..n follow in candidate order, so parents precede children.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@flax.struct.dataclass
class Tree:
    """A batch of trees over `N = n + 1` nodes (root first).

    tokens: `[B, N]` int32; parents: `[B, N]` (the root is its own parent);
    depth: `[B, N]` (root 0); mask: `[B, N, N]` bool, row i = i and its ancestors;
    children: `[B, N, W]` child nodes in index order, -1 padded (W: `tree.branching`, top_k, or top_k**2 in a
    beam tree); max_depth: the deepest a node can be
    (static); draft_nan: `[B]` bool (`grow_tree`'s trees), whether the drafter's log-probabilities held NaN
    (a draft overflowing its dtype: its tokens are then arbitrary).
    """

    tokens: jax.Array
    parents: jax.Array
    depth: jax.Array
    mask: jax.Array
    children: jax.Array
    max_depth: int = flax.struct.field(pytree_node=False)
    draft_nan: jax.Array | None = None

    @property
    def size(self) -> int:
        """N, the nodes per tree (root included)."""
        return self.tokens.shape[-1]


def candidate_layout(top_k: int, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Static per-candidate facts: depth `[C]` and the first candidate index of each level `[depth]`."""
    sizes = [top_k] + [top_k * top_k] * (depth - 1)
    starts = np.cumsum([0] + sizes[:-1])
    cand_depth = np.concatenate([np.full(s, lvl + 1, np.int32) for lvl, s in enumerate(sizes)])
    return cand_depth, starts.astype(np.int32)


def branching(top_k: int, depth: int, beam: bool) -> int:
    """The most children a node can have: `top_k`, or `top_k**2` in a beam tree deeper than one level."""
    return top_k * top_k if beam and depth > 1 else top_k


def frontier_widths(top_k: int, depth: int, beam: bool) -> list[int]:
    """Nodes expanded at each level 1..depth-1 (the drafter runs on them; they fill its level buffers)."""
    return [top_k] + [branching(top_k, depth, beam)] * (depth - 2) if depth > 1 else []


def frontier_slots(top_k: int, depth: int, beam: bool) -> int:
    """Slots a drafter's level buffers need: every expanded node's K/V, level after level."""
    return sum(frontier_widths(top_k, depth, beam))


def ancestor_mask(parents: jax.Array, max_depth: int) -> jax.Array:
    """`[N, N]` bool: row i marks i and all its ancestors (parents `[N]`, root its own parent)."""
    eye = jnp.eye(parents.shape[0], dtype=bool)
    return lax.fori_loop(0, max_depth, lambda _, m: eye | m[parents], eye)


def child_lists(parents: jax.Array, width: int) -> jax.Array:
    """`[N, width]`: each node's children in index order, padded with -1."""
    n = parents.shape[0]
    is_child = (parents[None, 1:] == jnp.arange(n)[:, None])  # [N, N-1]
    return jax.vmap(lambda row: jnp.nonzero(row, size=width, fill_value=-2)[0] + 1)(is_child)


def select_tree(root: jax.Array, cand_tokens: jax.Array, cand_scores: jax.Array, cand_parent: jax.Array,
                n: int, top_k: int, max_depth: int, beam: bool = False) -> Tree:
    """Builds a batch of trees from the `n` best candidates.

    root: `[B]`; cand_tokens, cand_scores: `[B, C]`; cand_parent: `[B, C]` candidate
    index of each candidate's parent (-1 = root). Ties keep the lower index (the
    parent), so the selection is always closed under ancestors. `beam`: the candidates
    came from a beam tree (a node may have `top_k**2` children).
    """
    cand_depth, _ = candidate_layout(top_k, max_depth)

    def one(root, tokens, scores, parent):
        _, chosen = lax.top_k(scores, n)
        chosen = jnp.sort(chosen)
        node_of = jnp.full(scores.shape, -1, jnp.int32).at[chosen].set(jnp.arange(1, n + 1, dtype=jnp.int32))
        p = parent[chosen]
        parents = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.where(p < 0, 0, node_of[jnp.maximum(p, 0)])])
        depth = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.asarray(cand_depth)[chosen]])
        return Tree(tokens=jnp.concatenate([root[None], tokens[chosen]]).astype(jnp.int32), parents=parents,
                    depth=depth, mask=ancestor_mask(parents, max_depth),
                    children=child_lists(parents, branching(top_k, max_depth, beam)), max_depth=max_depth)

    return jax.vmap(one)(root, cand_tokens, cand_scores, cand_parent)


def path_nodes(tree_mask_row: jax.Array, depth: jax.Array, max_depth: int) -> jax.Array:
    """Node ids by depth along the path marked in `tree_mask_row [B, N]` → `[B, max_depth + 1]`
    (entries past the path's end are 0, the root; callers mask them by count)."""
    hit = tree_mask_row[:, :, None] & (depth[:, :, None] == jnp.arange(max_depth + 1)[None, None, :])
    return jnp.argmax(hit, axis=1).astype(jnp.int32)


def expected_length(cand_scores: list[jax.Array], nodes: int) -> jax.Array:
    """The expected accepted length `[B]` of the best `nodes`-node tree from the candidates so far (each
    `[B, n]`, cumulative log-probabilities): the sum of their path probabilities (OPT-tree's weight)."""
    scores = jnp.concatenate(cand_scores, 1)
    best, _ = lax.top_k(scores, min(nodes, scores.shape[1]))
    return jnp.exp(best.astype(jnp.float32)).sum(1)


# expand(level, slot, tokens [B, f], parent [B, f], mask [B, f, slots + f], carry) -> (logprobs [B, f, V_d], carry)
Expand = Callable[[int, int, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def grow_tree(root: jax.Array, first_logprobs: jax.Array, expand: Expand, carry: Any, top_k: int, depth: int,
              nodes: int, threshold: float = 0.0, to_target: Callable[[jax.Array], jax.Array] = lambda i: i,
              beam: bool = False) -> Tree:
    """Grows a batch of top-k (EAGLE-3 `topK_genrate`) or beam trees below `root [B]`, whatever the drafter.

    Level 1 takes the `top_k` best tokens of `first_logprobs [B, V_d]` (the drafter
    at the root). Each further level calls `expand` on the previous level's f
    frontier nodes (`frontier_widths`): it runs the drafter on their `tokens`, each
    attending to the committed context, to the earlier levels' buffer slots its
    ancestors hold (`mask[..., :slots]`, slots = `frontier_slots`; this level's
    nodes go to slots [slot, slot + f)) and to itself (`mask[..., slots:]`);
    `parent` is each node's index in the previous frontier (0 at level 1).
    Children are scored by cumulative log-probability. A top-k tree keeps all
    f x top_k of them as candidates and expands the best top_k; a beam tree keeps
    and expands the best top_k**2 of f x top_k**2. With `threshold > 0` (OPT-tree's
    rule) a row stops drafting once a level raised its expected accepted length
    (`expected_length`) by no more than `threshold`; its later levels propose
    nothing, and `expand` runs while any row goes on. The `nodes` best
    candidates make the tree; `to_target` maps drafter ids to target ids.
    """
    k = top_k
    b = root.shape[0]
    widths = frontier_widths(k, depth, beam)
    first_slot = np.cumsum([0] + widths).tolist()
    slots = first_slot[-1]
    branch = branching(k, depth, beam)
    _, level_start = candidate_layout(k, depth)
    scores, ids = lax.top_k(first_logprobs, k)  # [B, k]
    tokens = to_target(ids)
    cand_tokens, cand_scores, cand_parent = [tokens], [scores], [jnp.full((b, k), -1, jnp.int32)]
    frontier = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, k))  # candidate ids
    expected = jnp.zeros((b,), jnp.float32)
    parent = jnp.zeros((b, k), jnp.int32)
    ancestors = jnp.zeros((b, k, slots), bool)  # frontier-chain ancestors' slots in the level buffers
    for level in range(1, depth):
        f = widths[level - 1]
        mask = jnp.concatenate([ancestors, jnp.broadcast_to(jnp.eye(f, dtype=bool), (b, f, f))], axis=-1)
        expand_level = functools.partial(expand, level, first_slot[level - 1], tokens, parent, mask)
        if threshold > 0:  # OPT-tree: on while the last level added more than `threshold` to the expected length
            expected, before = expected_length(cand_scores, nodes), expected
            go = expected - before > threshold  # [B]; a row that stopped gains nothing after
            nothing = jnp.full((b, f, first_logprobs.shape[-1]), -jnp.inf, first_logprobs.dtype)
            logprobs, carry = lax.cond(jnp.any(go), expand_level, lambda c: (nothing, c), carry)
            logprobs = jnp.where(go[:, None, None], logprobs, -jnp.inf)
        else:
            logprobs, carry = expand_level(carry)
        child_scores, child_ids = lax.top_k(logprobs, branch)  # [B, f, branch]
        flat_scores = (scores[:, :, None] + child_scores).reshape(b, f * branch)
        flat_tokens = to_target(child_ids).reshape(b, f * branch)
        flat_parent = jnp.repeat(frontier, branch, axis=1)
        scores, best = lax.top_k(flat_scores, branch)  # the next frontier, best first (unused after the last level)
        tokens = jnp.take_along_axis(flat_tokens, best, axis=1)
        if beam:  # the level's candidates are its frontier
            cand_tokens.append(tokens)
            cand_scores.append(scores)
            cand_parent.append(jnp.take_along_axis(flat_parent, best, axis=1))
            frontier = level_start[level] + jnp.broadcast_to(jnp.arange(branch, dtype=jnp.int32), (b, branch))
        else:
            cand_tokens.append(flat_tokens)
            cand_scores.append(flat_scores)
            cand_parent.append(flat_parent)
            frontier = level_start[level] + best
        parent = best // branch  # frontier index of each new frontier node's parent
        parent_slot = first_slot[level - 1] + parent
        ancestors = (jnp.take_along_axis(ancestors, parent[:, :, None], axis=1)
                     | (jnp.arange(slots)[None, None] == parent_slot[:, :, None]))
    cand_scores = jnp.concatenate(cand_scores, 1)
    # A drafter's inf or NaN logit (not an -inf one) makes its whole log_softmax row NaN, and so the scores of
    # the candidates it proposes. (Checked here, not on each level's [B, f, V] log-probabilities: XLA then kept
    # every level's alive to the end, 2 MB a level at 2 x 8 x 32K.)
    nan = jnp.isnan(cand_scores).any(1)
    return select_tree(root, jnp.concatenate(cand_tokens, 1), cand_scores, jnp.concatenate(cand_parent, 1), nodes,
                       k, depth, beam).replace(draft_nan=nan)
