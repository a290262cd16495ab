"""Top-k (EAGLE-3) vs beam (LongSpec) trees of the same size, per draft, on the bundled demo models.

    python benchmarks/tree_shapes.py [--context 4096] [--docs 3] [--new-tokens 96] [--tree 5 4 68]

For each draft (the EAGLE-3 head in `eagle` mode, the LongSpec draft in
`longspec` mode, the small draft model in `specextend` mode) it continues the
same held-out documents greedily with both tree shapes, side by side in one
process, and prints the mean accepted length (tokens emitted per target
verification) and decode speed of each, and the beam/top-k ratios. The tokens
are the same either way (lossless modes); only the work per token differs.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

import specpv_jax as sj
from specpv_jax.bench import TREE_FIELDS
from specpv_jax.train import corpus

MODES = (("eagle", "eagle3"), ("longspec", "longspec"), ("specextend", "small_draft"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--docs", type=int, default=3, help="held-out documents")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--tree", type=int, nargs=3, default=(5, 4, 68), metavar=("DEPTH", "TOP_K", "NODES"),
                   help="tree size (default: LongSpec's [4, 16, 16, 16, 16], depth 5, top-k 4, 68 nodes)")
    args = p.parse_args(argv)

    models = sj.demo_models()
    _, heldout = corpus.split(corpus.documents())
    docs = [d[: args.context] for d in corpus.encode_documents(models.tokenizer, heldout) if d.size >= args.context]
    docs = docs[: args.docs]
    top_k = sj.SpecConfig(**dict(zip(TREE_FIELDS, args.tree)))
    beam = dataclasses.replace(top_k, tree_beam=True)
    print(f"tree depth {top_k.tree_depth}, top-k {top_k.tree_top_k}, {top_k.tree_nodes} nodes; {len(docs)} held-out "
          f"documents at {args.context} tokens, {args.new_tokens} new tokens each (greedy)")
    print("| mode | accepted top-k | accepted beam | beam/top-k | tok/s top-k | tok/s beam | beam/top-k |")
    print("|---|---|---|---|---|---|---|")
    for mode, name in MODES:
        draft = getattr(models, name)
        results = {}
        for label, spec in (("top-k", top_k), ("beam", beam)):
            # Compiles, and runs the executables once (a first run is slower): the same buckets as those timed.
            sj.generate(models.target, docs[0], args.new_tokens, mode=mode, draft=draft, spec=spec, eos_token_ids=())
            runs = [sj.generate(models.target, d, args.new_tokens, mode=mode, draft=draft, spec=spec,
                                eos_token_ids=()) for d in docs]
            results[label] = runs
        same = all(np.array_equal(a.tokens, b.tokens) for a, b in zip(results["top-k"], results["beam"]))
        accept = {k: np.mean([r.stats["mean_accept_len"] for r in v]) for k, v in results.items()}
        # Decode speed, as tokens_per_s counts it: the tokens after each row's first (the prefill's) over time_s.
        speed = {k: sum(r.stats["new_tokens"] - len(r.lengths) for r in v) / sum(r.stats["time_s"] for r in v)
                 for k, v in results.items()}
        print(f"| {mode} | {accept['top-k']:.2f} | {accept['beam']:.2f} | {accept['beam'] / accept['top-k']:.2f} "
              f"| {speed['top-k']:.1f} | {speed['beam']:.1f} | {speed['beam'] / speed['top-k']:.2f} |"
              + ("" if same else " (tokens differ!)"))


if __name__ == "__main__":
    main()
