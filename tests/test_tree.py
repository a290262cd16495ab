"""Property tests of the static-shape draft tree and greedy acceptance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

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
