"""Verification steps of `exact` mode against `eagle`, per partial-cache budget, on the demo models.

    python benchmarks/exact_steps.py [--context 4096] [--new-tokens 128] [--prompts 4]

Each prompt is the start of a different held-out document (`demo.heldout_prompts`;
before 2026-12-07, slices of one document at offsets 0, 500, 1000, ...); both
modes run greedy on the same prompts. Prints, summed over the prompts, eagle's
full steps and exact's full steps, partial steps and rollbacks, and checks that
the tokens are the same (exact is lossless). Counts, not times: a full step's
cost over a partial one's depends on the device and the context, so the totals
are given at two ratios.
"""

from __future__ import annotations

import argparse

import numpy as np

import specpv_jax as sj
from specpv_jax.demo import heldout_prompts

BUDGETS = ((0, 0, 16), (16, 256, 64), (32, 1024, 128))  # (sink, retrieval, window) tokens


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=4)
    args = p.parse_args(argv)
    models = sj.demo_models()
    prompts = heldout_prompts(models.tokenizer, args.context, args.prompts, option="--prompts")
    print(f"{'sink+retrieval+window':>22} {'eagle full':>10} {'exact full':>10} {'partial':>8} {'rollbacks':>9} "
          f"{'cost F=1.5P':>12} {'F=3P':>6}  (eagle: {'F=1.5P':>6} {'F=3P':>6})")
    for sink, retrieval, window in BUDGETS:
        spec = sj.SpecConfig(sink_tokens=sink, retrieval_tokens=retrieval, window_tokens=window)
        eagle_full, exact = 0, np.zeros(3, int)
        for i, ids in enumerate(prompts):
            runs = {mode: sj.generate(models.target, ids, args.new_tokens, draft=models.eagle3, mode=mode, spec=spec,
                                      eos_token_ids=(), progress=False) for mode in ("eagle", "exact")}
            if not np.array_equal(runs["exact"].tokens, runs["eagle"].tokens):
                raise AssertionError(f"exact and eagle differ on prompt {i} at budgets {sink, retrieval, window}")
            eagle_full += runs["eagle"].stats["full_verifications"]
            s = runs["exact"].stats
            exact += (s["full_verifications"], s["partial_verifications"], s["rollbacks"])
        full, partial, rollbacks = exact
        print(f"{f'{sink}+{retrieval}+{window}':>22} {eagle_full:>10} {full:>10} {partial:>8} {rollbacks:>9} "
              f"{1.5 * full + partial:>12.1f} {3 * full + partial:>6}  (eagle: {1.5 * eagle_full:>6.1f} "
              f"{3 * eagle_full:>6})", flush=True)


if __name__ == "__main__":
    main()
