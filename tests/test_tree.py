"""Property tests of the static-shape draft tree and greedy acceptance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specpv_jax import tree as tree_lib
from specpv_jax import verify
from specpv_jax.sampling import Sampler
from specpv_jax.tree import candidate_layout, select_tree


def simulate_candidates(rng, top_k: int, depth: int, vocab: int = 50, tie_prob: float = 0.0):
    """Candidates as the EAGLE-3 drafter emits them: per level the frontier's top-k children.

    With `tie_prob`, some log-probs are exactly 0 so children tie with their parents.
    """
    def logp(n):
        x = -rng.exponential(1.0, n)
        x[rng.random(n) < tie_prob] = 0.0
        return np.sort(x)[::-1]

    _, starts = candidate_layout(top_k, depth)
    tokens = [rng.choice(vocab, top_k, replace=False)]
    scores = [logp(top_k)]
    parents = [np.full(top_k, -1)]
    frontier = np.arange(top_k)
    frontier_scores = scores[0]
    for level in range(1, depth):
        child = np.stack([logp(top_k) for _ in range(top_k)])  # [k, k]
        flat = (frontier_scores[:, None] + child).reshape(-1)
        tokens.append(np.concatenate([rng.choice(vocab, top_k, replace=False) for _ in range(top_k)]))
        scores.append(flat)
        parents.append(np.repeat(frontier, top_k))
        best = np.argsort(-flat, kind="stable")[:top_k]
        frontier, frontier_scores = starts[level] + best, flat[best]
    return (np.concatenate(tokens).astype(np.int32), np.concatenate(scores).astype(np.float32),
            np.concatenate(parents).astype(np.int32))


# (top_k, depth, nodes): a few static shapes, so examples differ in data, not in what compiles.
SHAPES = [(1, 1, 1), (1, 4, 4), (3, 1, 2), (2, 3, 9), (3, 4, 20), (4, 5, 40), (5, 3, 55)]
select_tree_jit = jax.jit(select_tree, static_argnums=(4, 5, 6))


def build(rng, top_k, depth, n, batch=2, tie_prob=0.0):
    cands = [simulate_candidates(rng, top_k, depth, tie_prob=tie_prob) for _ in range(batch)]
    tok, sc, par = (np.stack(x) for x in zip(*cands))
    root = rng.integers(0, 50, batch).astype(np.int32)
    tree = select_tree_jit(jnp.asarray(root), jnp.asarray(tok), jnp.asarray(sc), jnp.asarray(par), n, top_k, depth)
    return tree, (tok, sc, par, root)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**16), tie_prob=st.sampled_from([0.0, 0.3]))
def test_tree_structure(shape, seed, tie_prob):
    rng = np.random.default_rng(seed)
    top_k, depth, n = shape
    tree, (tok, sc, par, root) = build(rng, top_k, depth, n, tie_prob=tie_prob)
    tree = jax.tree.map(np.asarray, tree)  # checked in numpy: eager jax indexing would compile per shape
    for b in range(2):
        parents, dep, mask = tree.parents[b], tree.depth[b], tree.mask[b]
        tokens, children = tree.tokens[b], tree.children[b]
        assert tokens[0] == root[b] and dep[0] == 0
        # The n best candidates (ties: lower index first) are the nodes, in candidate order.
        chosen = np.sort(np.argsort(-sc[b], kind="stable")[:n])
        assert tokens[1:].tolist() == tok[b][chosen].tolist()
        for i in range(1, n + 1):
            assert parents[i] < i and dep[i] == dep[parents[i]] + 1
            ancestors, j = {i}, i
            while j != 0:
                j = parents[j]
                ancestors.add(j)
            assert set(np.flatnonzero(mask[i]).tolist()) == ancestors
            assert i in children[parents[i]].tolist()
        assert set(np.flatnonzero(mask[0]).tolist()) == {0}
        # Children lists: exactly the nodes naming each parent, in index order, -1 padded.
        for i in range(n + 1):
            kids = [c for c in children[i].tolist() if c >= 0]
            assert kids == [c for c in range(1, n + 1) if parents[c] == i]


def reference_greedy(tokens, parents, pred):
    """Walk down from the root along children that match the target argmax."""
    node, path = 0, [0]
    while True:
        nxt = [c for c in range(1, len(tokens)) if parents[c] == node and tokens[c] == pred[node]]
        if not nxt:
            return path, pred[node]
        node = nxt[0]
        path.append(node)


accept_greedy = jax.jit(verify.accept_greedy)
accept_sampling = jax.jit(verify.accept_sampling)
emitted = jax.jit(lambda acceptance, tree: acceptance.emitted(tree))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**16))
def test_greedy_acceptance_matches_walk(shape, seed):
    rng = np.random.default_rng(seed)
    top_k, depth, n = shape
    tree, _ = build(rng, top_k, depth, n, batch=3)
    vocab = 50
    # Target predictions that often agree with a child so paths of several nodes get accepted.
    tree_tokens, tree_children = np.asarray(tree.tokens), np.asarray(tree.children)
    pred = tree_tokens.copy()
    for b in range(3):
        for i in range(n + 1):
            kids = [c for c in tree_children[b, i] if c >= 0]
            pred[b, i] = tree_tokens[b, kids[rng.integers(len(kids))]] if kids and rng.random() < 0.8 \
                else rng.integers(vocab)
    logits = jnp.asarray(np.eye(vocab, dtype=np.float32)[pred] * 5.0)
    acc = accept_greedy(tree, logits)
    sampled = accept_sampling(tree, Sampler.create(0.0).probs(logits), jax.random.key(seed))
    tokens = emitted(acc, tree)
    tree, acc, sampled, tokens = jax.tree.map(np.asarray, (tree, acc, sampled, tokens))
    for b in range(3):
        path, bonus = reference_greedy(tree.tokens[b], tree.parents[b], pred[b])
        count = int(acc.count[b])
        assert count == len(path) - 1 and acc.path[b, : count + 1].tolist() == path
        assert int(acc.bonus[b]) == bonus
        assert tokens[b, : count + 1].tolist() == [int(tree.tokens[b, p]) for p in path[1:]] + [bonus]
        # One-hot "sampling" is greedy acceptance.
        assert int(sampled.count[b]) == count and int(sampled.bonus[b]) == bonus
        assert sampled.path[b, : count + 1].tolist() == path


# A stand-in drafter whose distribution at a node depends on the node's whole path, so that
# `grow_tree`'s masks and buffer slots must be right for its trees to equal the reference's.
VOCAB, ROWS = 40, 101
TABLE = np.log(np.random.default_rng(0).dirichlet(np.full(VOCAB, 0.3), ROWS)).astype(np.float32)


def path_row(path_tokens):
    """The table row of a node whose path (root excluded) drafted `path_tokens`, level 1 first."""
    return sum((t + 1) * 31 ** d for d, t in enumerate(path_tokens, 1)) % ROWS


def reference_tree(root_row, top_k, depth, beam):
    """Every candidate path (a tuple of tokens) with its score, by EAGLE-3's or LongSpec's rule, in plain Python."""
    level = sorted(((TABLE[root_row, t], (t,)) for t in range(VOCAB)), reverse=True)[:top_k]
    cands = dict((p, s) for s, p in level)
    for _ in range(1, depth):
        width = top_k * top_k if beam else top_k
        frontier = level if beam else sorted(level, reverse=True)[:top_k]
        children = [(s + TABLE[path_row(p), t], p + (t,)) for s, p in frontier
                    for t in np.argsort(-TABLE[path_row(p)], kind="stable")[:width].tolist()]
        level = sorted(children, reverse=True)[:width] if beam else children
        cands.update((p, s) for s, p in level)
    return cands


def tree_paths(tree, row: int, nodes: int) -> set[tuple[int, ...]]:
    """The token paths (root excluded) of `tree`'s nodes 1..nodes in `row`."""
    tokens, parents = np.asarray(tree.tokens[row]), np.asarray(tree.parents[row])
    paths = {}
    for i in range(1, nodes + 1):
        paths[i] = (paths[parents[i]] if parents[i] else ()) + (int(tokens[i]),)
    return set(paths.values())


def fake_drafter(top_k, depth, beam):
    """An `Expand` over TABLE: each node reads its ancestors' tokens from the buffer slots its mask marks."""
    slots = tree_lib.frontier_slots(top_k, depth, beam)
    weights_of_slot = np.concatenate([np.full(w, 31 ** lvl) for lvl, w in
                                      enumerate(tree_lib.frontier_widths(top_k, depth, beam), 1)])

    def expand(level, slot, tokens, parent, mask, buf):
        f = tokens.shape[1]
        assert mask.shape == (tokens.shape[0], f, slots + f) and buf.shape[1] == slots
        ancestors = jnp.sum(jnp.where(mask[..., :slots], (buf[:, None, :] + 1) * weights_of_slot, 0), axis=-1)
        own = mask[..., slots:]
        if not isinstance(own, jax.core.Tracer):  # (a dynamic tree expands under lax.cond)
            assert np.all(np.asarray(own) == np.eye(f, dtype=bool))
        rows = (ancestors + (tokens + 1) * 31 ** level) % ROWS
        return jnp.asarray(TABLE)[rows], buf.at[:, slot: slot + f].set(tokens)

    return expand, jnp.zeros((1, slots), jnp.int32)


@pytest.mark.parametrize("beam", [False, True], ids=["top-k", "beam"])
@pytest.mark.parametrize("top_k, depth", [(1, 3), (2, 4), (3, 3), (4, 5)])
def test_grow_tree_follows_eagle3_and_longspec_rules(top_k, depth, beam):
    """All candidates kept: the tree's root-to-node paths and scores are the rule's candidates; fewer nodes:
    the best of them."""
    expand, buf = fake_drafter(top_k, depth, beam)
    reference = reference_tree(0, top_k, depth, beam)
    total = top_k + (depth - 1) * top_k * top_k
    assert len(reference) == total
    for nodes in (total, max(total // 3, 1)):
        tree = tree_lib.grow_tree(jnp.zeros(1, jnp.int32), jnp.asarray(TABLE[:1]), expand, buf, top_k, depth,
                                  nodes, beam=beam)
        paths = tree_paths(tree, 0, nodes)
        best = sorted(reference.values(), reverse=True)[:nodes]
        assert paths <= set(reference) and len(paths) == nodes
        np.testing.assert_allclose(sorted((reference[p] for p in paths), reverse=True), best, rtol=1e-6)
        assert np.asarray(tree.children).shape[-1] == (top_k * top_k if beam else top_k)


def reference_opt_tree(root_row, top_k, depth, nodes, threshold):
    """OPT-tree's rule over TABLE, in plain Python: levels are added (EAGLE-3's top-k rule) while the last one
    raised the expected accepted length (the sum of the `nodes` best path probabilities) by more than
    `threshold`; returns the tree's paths (the `nodes` best candidates then) and the levels drafted."""
    level = sorted(((TABLE[root_row, t], (t,)) for t in range(VOCAB)), reverse=True)[:top_k]
    cands = dict((p, s) for s, p in level)
    expected = lambda: sum(np.exp(sorted(cands.values(), reverse=True)[:nodes]))  # noqa: E731
    weight, levels = expected(), 1
    while levels < depth and weight > threshold:
        children = [(s + TABLE[path_row(p), t], p + (t,)) for s, p in sorted(level, reverse=True)[:top_k]
                    for t in np.argsort(-TABLE[path_row(p)], kind="stable")[:top_k].tolist()]
        level = children
        cands.update((p, s) for s, p in children)
        weight, gain, levels = expected(), expected() - weight, levels + 1
        if gain <= threshold:
            break
    best = sorted(cands, key=cands.get, reverse=True)[:nodes]
    return set(best), levels


@pytest.mark.parametrize("threshold, roots", [(0.03, [0, 1, 10, 12]), (0.3, [28, 29])])
def test_dynamic_trees_follow_opt_tree_row_by_row(threshold, roots):
    """`threshold`: each row's tree is OPT-tree's (levels while the last one added more than `threshold` to the
    expected accepted length, then the best `nodes`), whatever the other rows of the batch do (here they stop
    at different levels)."""
    top_k, depth, nodes = 3, 5, 20
    expand, buf = fake_drafter(top_k, depth, False)
    tree = tree_lib.grow_tree(jnp.zeros(len(roots), jnp.int32), jnp.asarray(TABLE[roots]), expand,
                              jnp.zeros((len(roots), buf.shape[1]), jnp.int32), top_k, depth, nodes,
                              threshold=threshold)
    levels = []
    for r, root_row in enumerate(roots):
        want, drafted = reference_opt_tree(root_row, top_k, depth, nodes, threshold)
        assert want <= tree_paths(tree, r, nodes), (threshold, root_row)
        assert max(len(p) for p in want) <= drafted
        levels.append(drafted)
    assert len(set(levels)) > 1 and max(levels) < depth
