"""What the bundled demo models can do: long-context use and EAGLE-3 acceptance on held-out text.

    python benchmarks/demo_models.py [--contexts 2048 16384] [--docs 3]

1. Held-out next-token loss (nats) and perplexity of the target by position
   bucket, over every held-out standard-library document of at least 16K
   tokens, each read once from its start with the full context (the inference
   path: KV cache, chunked). A target that uses long context is no worse at
   12K-16K than at 1K-2K.
2. Mean accepted length (tokens emitted per target verification; greedy,
   default tree) of `eagle` continuing held-out documents at each context
   length, `--new-tokens` per prompt.
"""

from __future__ import annotations

import argparse

import numpy as np

import specpv_jax as sj
from specpv_jax.train import corpus, lm

EDGES = (0, 1024, 2048, 4096, 8192, 12288, 16384)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 16384])
    p.add_argument("--docs", type=int, default=3, help="held-out documents per context for acceptance")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--tree", type=int, nargs=3, metavar=("DEPTH", "TOP_K", "NODES"),
                   help="tree shape (default: SpecConfig's 7 10 60)")
    args = p.parse_args(argv)

    models = sj.demo_models()
    _, heldout = corpus.split(corpus.documents())
    docs = sorted(corpus.encode_documents(models.tokenizer, heldout), key=len, reverse=True)
    long_docs = [d for d in docs if d.size > EDGES[-1]]
    losses = lm.loss_by_position(models.target.params, models.target.cfg, long_docs, EDGES)
    print(f"held-out loss by position ({len(long_docs)} documents of > {EDGES[-1]} tokens)")
    print("| positions | loss (nats) | perplexity |\n|---|---|---|")
    for a, b, loss in zip(EDGES[:-1], EDGES[1:], losses):
        print(f"| {a}-{b} | {loss:.3f} | {np.exp(loss):.2f} |")

    spec = sj.SpecConfig(**dict(zip(("tree_depth", "tree_top_k", "tree_nodes"), args.tree))) if args.tree \
        else sj.SpecConfig()
    print(f"\neagle mean accepted length (greedy, tree {spec.tree_depth}/{spec.tree_top_k}/{spec.tree_nodes}, "
          f"{args.new_tokens} new tokens per prompt)")
    print("| context | documents | mean accepted length | per document |\n|---|---|---|---|")
    for context in args.contexts:
        usable = [d for d in docs if d.size >= context][: args.docs]
        accepts = [sj.generate(models.target, d[:context], args.new_tokens, mode="eagle", draft=models.eagle3,
                               spec=spec, eos_token_ids=()).stats["mean_accept_len"] for d in usable]
        print(f"| {context} | {len(usable)} | {np.mean(accepts):.2f} | {' '.join(f'{a:.2f}' for a in accepts)} |")


if __name__ == "__main__":
    main()
