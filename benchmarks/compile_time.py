"""Compile time of each mode's generate, side by side in one process.

    python benchmarks/compile_time.py                   # random demo-sized models, paper and demo trees
    python benchmarks/compile_time.py --context 4096

A mode's first `generate` call traces and compiles its prefill and decode loop;
the second call with the same shapes reuses them. The difference of the two
wall times is the compile (and trace) cost a user waits for once per shape.
Printed in seconds and as a ratio to `ar` (which has no tree: measured once).
`eagle`, `specpv` and `exact` share one prefill program, counted in `eagle`'s
figure (the first of them to run).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

import specpv_jax as sj
from specpv_jax.demo import DEMO_SPEC, random_demo_model, random_head

MODES = ("eagle", "specpv", "exact")
TREES = {"paper 7/10/60": sj.SpecConfig(), "demo 3/3/6": DEMO_SPEC}


def wall(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compile_seconds(target, head, prompt, mode: str, spec: sj.SpecConfig, new_tokens: int) -> float:
    """First call minus second call of the same `generate` (seconds)."""
    def call():
        sj.generate(target, prompt, new_tokens, draft=None if mode == "ar" else head, mode=mode, spec=spec,
                    eos_token_ids=())
    return wall(call) - wall(call)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    target = random_demo_model()
    head = random_head(target)
    prompt = np.random.default_rng(0).integers(0, target.cfg.vocab_size, args.context)
    print(f"compile + trace seconds, context {args.context}, random demo-sized target and head")
    ar = compile_seconds(target, head, prompt, "ar", sj.SpecConfig(), args.new_tokens)
    print(f"ar: {ar:.1f} s")
    print(f"{'tree':>14} " + " ".join(f"{m:>14}" for m in MODES))
    for name, tree in TREES.items():
        # A retrieval budget below the context, so specpv and exact compile their partial branch too.
        spec = dataclasses.replace(tree, retrieval_tokens=args.context // 4)
        seconds = {m: compile_seconds(target, head, prompt, m, spec, args.new_tokens) for m in MODES}
        print(f"{name:>14} " + " ".join(f"{s:>6.1f} ({s / ar:>4.1f}x)" for s in seconds.values()))


if __name__ == "__main__":
    main()
