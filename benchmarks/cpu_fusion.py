"""XLA:CPU with and without its YNNPACK fusions, side by side in one process: the demo models, `generate`'s
programs from `make_generate_fn`, each mode lowered once and compiled three ways.

    python benchmarks/cpu_fusion.py                     # 4096-token prompt, 32 new tokens
    python benchmarks/cpu_fusion.py --context 8192 --modes ar specpv

jaxlib 0.10.2-0.11.x fuse some dots and reductions into YNNPACK calls that compute wrong values for some
shapes (specpv_jax/xla_cpu.py), so `import specpv_jax` turns them off. This prints what that costs on this
CPU: seconds per call (prefill and decode together, best of a few) with XLA's default fusions, with YNNPACK
dots alone (the reductions are what went wrong), and with none (the library's setting); the ratio to the
default; whether all three wrote the same tokens.
"""

from __future__ import annotations

import os

os.environ["SPECPV_JAX_CPU_YNN"] = "1"  # XLA's default for the first peer (the others set the flag per compile)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import specpv_jax as sj  # noqa: E402
from specpv_jax import xla_cpu  # noqa: E402
from specpv_jax.demo import DEMO_SPEC, demo_models, demo_prompt, draft_for  # noqa: E402


def seconds(fn, args, repeats: int) -> tuple[float, np.ndarray]:
    """Best wall time of `repeats` calls, and the tokens."""
    best, tokens = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = np.asarray(jax.block_until_ready(fn(*args))[0])
        best = min(best, time.perf_counter() - start)
    return best, tokens


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--modes", nargs="+", default=["ar", "eagle", "specpv", "exact"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    models = demo_models()
    ids = demo_prompt(models.tokenizer, args.context)[None].astype(np.int32)
    spec = dataclasses.replace(DEMO_SPEC, retrieval_tokens=args.context // 4)  # partial steps too
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, demo models, context {args.context}, "
          f"{args.new_tokens} new tokens, best of {args.repeats} (seconds per call)")
    peers = {"xla default": {}, "dots only": {xla_cpu.FLAG: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
             "no ynn": {xla_cpu.FLAG: ""}}
    print(f"{'mode':>8} " + " ".join(f"{name:>12}" for name in peers) + "  (ratio to the default)  same tokens")
    for mode in args.modes:
        draft = draft_for(models, mode)
        fn = sj.make_generate_fn(models.target.cfg, spec, mode=mode, draft_cfg=None if draft is None else draft.cfg,
                                 max_new_tokens=args.new_tokens, eos_token_ids=())
        dparams = {} if draft is None else {"params": draft.params, **({"d2t": draft.d2t} if draft.d2t is not None
                                                                       else {})}
        call = (models.target.params, dparams, ids, jax.random.key(0))
        lowered = jax.jit(fn).lower(*call)
        timed = [seconds(lowered.compile(options), call, args.repeats) for options in peers.values()]
        base = timed[0][0]
        print(f"{mode:>8} " + " ".join(f"{t:>5.2f} ({t / base:.2f}x)" for t, _ in timed)
              + f"  {all(np.array_equal(timed[0][1], tokens) for _, tokens in timed)}")


if __name__ == "__main__":
    main()
