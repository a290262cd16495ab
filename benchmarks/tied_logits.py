"""Decode loops of a tied model with and without `model.for_decode_loop`'s [H, V] kernel, side by side.

    python benchmarks/tied_logits.py [--context 4096] [--new-tokens 64] [--rounds 5]

The demo target ties its embedding to its LM head. Inside a decode loop, XLA:CPU
multiplies the hidden states by the embedding's transpose slower than by a
[H, V] kernel, so on a CPU `model.for_decode_loop` gives each decode loop a
transposed copy, made once per call before the loop. This times, in one
process and in alternating rounds, each mode's decode (`stats["time_s"]`) on
the demo target as it is loaded (tied: the copy made) and with the copy left
out (each loop multiplying by the transpose), and prints the best of each and
the ratio. Greedy, the same prompt (a held-out document's start), 32 + 1/4 of
the context + 128 tokens of partial cache.
"""

from __future__ import annotations

import argparse
import dataclasses

import specpv_jax as sj
from specpv_jax import model as M
from specpv_jax.demo import DEMO_SPEC, heldout_prompts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    models = sj.demo_models()
    ids = heldout_prompts(models.tokenizer, args.context)[0]
    spec = dataclasses.replace(DEMO_SPEC, retrieval_tokens=args.context // 4 // 16 * 16)
    drafts = {"ar": None, "eagle": models.eagle3, "exact": models.eagle3, "specextend": models.small_draft,
              "longspec": models.longspec}
    # The two variants must be two compiled loops: the copy-free one traces under its own Run (another chunk).
    variants = {"with copy": 512, "without": 256}

    def decode_seconds(mode: str, chunk: int) -> float:
        return sj.generate(models.target, ids, args.new_tokens, draft=drafts[mode], mode=mode, spec=spec,
                           eos_token_ids=(), prefill_chunk=chunk, progress=False).stats["time_s"]

    real = M.for_decode_loop
    for name, chunk in variants.items():  # compile each variant once
        M.for_decode_loop = real if name == "with copy" else (lambda params, cfg: params)
        for mode in drafts:
            decode_seconds(mode, chunk)
    M.for_decode_loop = real
    times = {(mode, name): [] for mode in drafts for name in variants}
    for _ in range(args.rounds):
        for mode in drafts:
            for name, chunk in variants.items():
                times[mode, name].append(decode_seconds(mode, chunk))
    print(f"decode ms (best of {args.rounds}), {args.context}-token prompt, {args.new_tokens} new tokens")
    print(f"{'mode':>11} {'with copy':>10} {'without':>10} {'ratio':>6}")
    for mode in drafts:
        best = [min(times[mode, name]) * 1e3 for name in variants]
        print(f"{mode:>11} {best[0]:>10.1f} {best[1]:>10.1f} {best[0] / best[1]:>6.2f}")


if __name__ == "__main__":
    main()
