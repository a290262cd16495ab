"""Verification steps of `exact` mode against `eagle`, per partial-cache budget, on the demo models.

    python benchmarks/exact_steps.py [--context 4096] [--new-tokens 128] [--prompts 4]
        [--temperature 0 --seeds 1] [--full-step-cost 1.5]

Each prompt is the start of a different held-out document (`demo.heldout_prompts`;
before 2026-12-07, slices of one document at offsets 0, 500, 1000, ...); both
modes run on the same prompts, `--seeds` times each (seeds 0, 1, ...). Prints,
summed over the prompts and seeds, eagle's full steps and exact's full steps,
partial steps and rollbacks; greedy, it checks that the tokens are the same
(exact is lossless). Counts, not times: a full step's cost over a partial one's
depends on the device and the context, so the totals are given at three ratios
(sampling exact mode plans its phases for `--full-step-cost`, which those
totals should use to compare).
"""

from __future__ import annotations

import argparse

import numpy as np

import specpv_jax as sj
from specpv_jax.demo import heldout_prompts

BUDGETS = ((0, 0, 16), (16, 256, 64), (32, 1024, 128))  # (sink, retrieval, window) tokens
WEIGHTS = (1.5, 3, 7)  # a full step's cost in partial ones


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--full-step-cost", type=float, default=sj.SpecConfig().full_step_cost)
    args = p.parse_args(argv)
    models = sj.demo_models()
    prompts = heldout_prompts(models.tokenizer, args.context, args.prompts, option="--prompts")
    costs = " ".join(f"{f'F={w}P':>7}" for w in WEIGHTS)
    print(f"{'sink+retrieval+window':>22} {'eagle full':>10} {'exact full':>10} {'partial':>8} {'rollbacks':>9}  "
          f"exact: {costs}  eagle: {costs}")
    for sink, retrieval, window in BUDGETS:
        spec = sj.SpecConfig(sink_tokens=sink, retrieval_tokens=retrieval, window_tokens=window,
                             full_step_cost=args.full_step_cost)
        eagle_full, exact = 0, np.zeros(3, int)
        for i, ids in enumerate(prompts):
            for seed in range(args.seeds):
                runs = {mode: sj.generate(models.target, ids, args.new_tokens, draft=models.eagle3, mode=mode,
                                          spec=spec, temperature=args.temperature, seed=seed, eos_token_ids=(),
                                          progress=False) for mode in ("eagle", "exact")}
                if args.temperature == 0 and not np.array_equal(runs["exact"].tokens, runs["eagle"].tokens):
                    raise AssertionError(f"exact and eagle differ on prompt {i} at budgets {sink, retrieval, window}")
                eagle_full += runs["eagle"].stats["full_verifications"]
                s = runs["exact"].stats
                exact += (s["full_verifications"], s["partial_verifications"], s["rollbacks"])
        full, partial, rollbacks = exact
        print(f"{f'{sink}+{retrieval}+{window}':>22} {eagle_full:>10} {full:>10} {partial:>8} {rollbacks:>9}  "
              f"exact: {' '.join(f'{w * full + partial:>7.1f}' for w in WEIGHTS)}  "
              f"eagle: {' '.join(f'{w * eagle_full:>7.1f}' for w in WEIGHTS)}", flush=True)


if __name__ == "__main__":
    main()
