"""End-to-end SpecPV generation with the full cache on the device and in host memory, at real model shapes.

Random bf16 weights of a preset model (default Llama-3.1-8B) and a random EAGLE-3 head (a 32K draft
vocabulary); one random prompt, generated greedily in `exact` mode by `sj.generate` with
`SpecConfig(offload=True)` first, then with the cache on the device:

    python benchmarks/offload_generate.py [--context 16384] [--new-tokens 16] [--out F]   # GPU
    python benchmarks/offload_generate.py --quick                                         # CPU smoke run

prints, for each, prefill and decode seconds (compilation excluded: `generate` compiles first), full and
partial verifications, the device's peak memory after it (cumulative: offload runs first), and whether the two runs
gave the same tokens (they should: both attend to device copies of the same cache).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # report what the runs need, not a pool

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scale import DTYPE, QUICK_SHAPES, peak_device_bytes  # noqa: E402

import specpv_jax as sj  # noqa: E402
from specpv_jax import model as M  # noqa: E402
from specpv_jax import presets  # noqa: E402
from specpv_jax.config import DraftConfig, ModelConfig  # noqa: E402
from specpv_jax.draft import eagle3  # noqa: E402

DRAFT_VOCAB = 32000  # the public Llama-3.1-8B EAGLE-3 heads'


def random_models(cfg: ModelConfig, seed: int = 0) -> tuple[sj.Model, eagle3.Eagle3]:
    """A target with random `DTYPE` weights and a random EAGLE-3 head for it."""
    target = sj.Model(cfg, M.init_params(cfg, jax.random.key(seed), DTYPE))
    dcfg = DraftConfig.for_target(cfg, min(DRAFT_VOCAB, cfg.vocab_size))
    ids = np.sort(np.random.default_rng(seed).choice(cfg.vocab_size, dcfg.draft_vocab_size, replace=False))
    head = eagle3.Eagle3(dcfg, eagle3.init_params(dcfg, jax.random.key(seed + 1), DTYPE),
                         jnp.asarray(eagle3.d2t_from_token_ids(ids)))
    return target, head


def run(target, head, prompt: np.ndarray, new_tokens: int, offload: bool, spec: sj.SpecConfig) -> dict:
    """One `generate` call's figures (or its error)."""
    row = dict(offload=offload)
    try:
        out = sj.generate(target, prompt, new_tokens, draft=head, mode="exact", eos_token_ids=(), progress=False,
                          spec=dataclasses.replace(spec, offload=offload))
        row.update(tokens=out.tokens[0].tolist(), prefill_s=out.stats["prefill_s"], decode_s=out.stats["time_s"],
                   **{k: out.stats[k] for k in ("full_verifications", "partial_verifications")})
    except Exception as e:  # report it and go on: the other run still says something
        row["error"] = "".join(traceback.format_exception_only(e)).strip()
    row["peak_device_gib"] = (peak_device_bytes() or 0) / 2 ** 30 or None
    print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b", choices=sorted(presets.HF_CONFIGS))
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke run: 2 narrow layers, a 2048-token prompt, a 6-node tree, small partial cache")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    hf_config = presets.hf_config(args.model)
    spec = sj.SpecConfig()
    if args.quick:  # the same code paths, sized for a CPU (a 6144-token prompt with the default budgets: 42 s)
        hf_config.update(QUICK_SHAPES)
        args.context = 2048
        spec = sj.SpecConfig(tree_depth=3, tree_top_k=3, tree_nodes=6, retrieval_tokens=256, window_tokens=64)
    cfg = ModelConfig.from_hf(hf_config)
    target, head = random_models(cfg)
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, args.context)
    rows = [run(target, head, prompt, args.new_tokens, offload, spec) for offload in (True, False)]
    same = all("tokens" in r for r in rows) and rows[0]["tokens"] == rows[1]["tokens"]
    print(f"{args.model} {'(quick) ' if args.quick else ''}context {args.context}, {args.new_tokens} new tokens, "
          f"exact, {jax.devices()[0].device_kind}: same tokens with and without offload: {same}")
    if args.out:
        meta = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(), jax=jax.__version__,
                    model=args.model, quick=args.quick, context=args.context, new_tokens=args.new_tokens)
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows, same_tokens=same), indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
