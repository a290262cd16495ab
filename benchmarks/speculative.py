"""AR vs EAGLE-3 tree speculation, side by side in one process.

    python benchmarks/speculative.py                              # random demo-sized models, CPU
    python benchmarks/speculative.py --target DIR --draft DIR     # converted checkpoints
    python benchmarks/speculative.py --profile                    # plus per-step draft / verify times

Prints tokens/s of each mode, the speedup over AR and the mean accepted length
(tokens emitted per target verification). Random weights show the machinery's
cost; acceptance needs a trained head.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import specpv_jax as sj
from specpv_jax import model as M
from specpv_jax import verify
from specpv_jax.cache import KVCache
from specpv_jax.demo import random_demo_model, random_head
from specpv_jax.draft import eagle3
from specpv_jax.sampling import Sampler


def median_seconds(fn, *args, runs: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_step(target: sj.Model, head: eagle3.Eagle3, spec: sj.SpecConfig, context: int) -> dict[str, float]:
    """Seconds for one AR step, one draft (head catch-up + tree) and one verification, at `context`."""
    cfg, dcfg = target.cfg, head.cfg
    rng = np.random.default_rng(0)
    cache = KVCache.for_model(cfg, 1, context + spec.tree_nodes + 1, target.dtype)
    cache = cache.replace(k=jnp.asarray(rng.standard_normal(cache.k.shape), target.dtype),
                          v=jnp.asarray(rng.standard_normal(cache.v.shape), target.dtype),
                          length=jnp.array([context], jnp.int32))
    dcache = eagle3.empty_cache(dcfg, 1, cache.max_len, head.params).replace(length=jnp.array([context - 1]))
    p = spec.tree_depth + 1
    feats = jnp.zeros((1, p, len(dcfg.feature_layers) * cfg.hidden_size), target.dtype)
    tokens = jnp.zeros((1, p), jnp.int32)
    embed = eagle3.embed_table(head.params, target.params)

    @jax.jit
    def ar(params, cache):
        return M.logits(params, cfg, M.forward(params, cfg, tokens[:, :1], cache.length[:, None], cache).hidden)

    @jax.jit
    def draft(params, dcache):
        dcache, state, _, _ = eagle3.advance(params, dcfg, embed, dcache, feats, tokens, jnp.array([p]))
        return eagle3.draft_tree(params, dcfg, spec, embed, head.d2t, dcache, state, tokens[:, 0])

    tree = draft(head.params, dcache)

    @jax.jit
    def check(params, cache):
        out = M.forward(params, cfg, tree.tokens, cache.length[:, None] + tree.depth, cache, tree.mask,
                        dcfg.feature_layers)
        return verify.accept(tree, M.logits(params, cfg, out.hidden), Sampler.create(), None).count

    return {"ar_step_s": median_seconds(ar, target.params, cache),
            "draft_s": median_seconds(draft, head.params, dcache),
            "verify_s": median_seconds(check, target.params, cache)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="target model directory (default: random demo-sized model)")
    parser.add_argument("--draft", help="EAGLE-3 head directory (default: random head)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--profile", action="store_true", help="also time one draft and one verification")
    args = parser.parse_args(argv)

    target = sj.load_target(args.target, dtype=args.dtype) if args.target else random_demo_model()
    head = sj.load_draft(args.draft, target) if args.draft else random_head(target)
    spec = sj.SpecConfig(tree_depth=args.depth, tree_top_k=args.top_k, tree_nodes=args.nodes)
    print(f"device: {jax.devices()[0].device_kind}; target {target.cfg.arch} {target.cfg.num_layers} layers "
          f"hidden {target.cfg.hidden_size}; tree depth {spec.tree_depth} top-k {spec.tree_top_k} "
          f"nodes {spec.tree_nodes}")
    print(f"{'context':>8} {'mode':>6} {'tok/s':>9} {'speedup':>8} {'accept':>7} {'steps':>6}")
    rng = np.random.default_rng(0)
    for context in args.contexts:
        prompt = rng.integers(0, target.cfg.vocab_size, context)
        for _ in range(2):  # the second run of each is timed: a first run of an executable is slower
            ar = sj.generate(target, prompt, args.new_tokens, eos_token_ids=())
            eg = sj.generate(target, prompt, args.new_tokens, draft=head, mode="eagle", spec=spec,
                             eos_token_ids=())
        for name, out in (("ar", ar), ("eagle", eg)):
            s = out.stats
            print(f"{context:>8} {name:>6} {s['tokens_per_s']:>9.1f} "
                  f"{s['tokens_per_s'] / ar.stats['tokens_per_s']:>8.2f} {s['mean_accept_len']:>7.2f} "
                  f"{s['steps']:>6}")
        if args.profile:
            t = profile_step(target, head, spec, context)
            print(f"{'':>8} per step: AR {t['ar_step_s'] * 1e3:.1f} ms | draft {t['draft_s'] * 1e3:.1f} ms + "
                  f"verify {t['verify_s'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
