"""Buffers the compiled generate loops copy every step, read off the optimized HLO (nothing runs).

    python benchmarks/hlo_audit.py                    # Llama-3.1-8B widths at 2 layers, bf16, every mode
    python benchmarks/hlo_audit.py --layers 32 --out audit.json

Compiles `make_generate_fn` for each mode on the default backend from abstract
weights (no weights allocated) and lists what `specpv_jax.hlo.loop_copies`
finds inside its loops (see that module for why it matters), labelled
"weights" (a layer's slice of the stacked `[L, ...]` parameters), "kv"
(cache-shaped: a layer's cache, or a block of it the XLA attention reads) or
"other". Run it on each backend that matters: the CPU's answer need not be the
GPU's (on a CPU, for one, bf16 weights are sliced and converted to f32 per
layer).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json

import jax
import jax.numpy as jnp

import specpv_jax as sj
from specpv_jax import hlo, presets
from specpv_jax.bench import budget_for
from specpv_jax import model as M
from specpv_jax.config import DraftConfig, ModelConfig
from specpv_jax.draft import eagle3

MODES = ("ar", "eagle", "specpv", "exact")


def label(finding: hlo.Finding, weight_shapes: set, cfg: ModelConfig) -> str:
    """"weights" (one layer's slice of a stacked parameter), "kv" (cache-shaped) or "other"."""
    dims = finding.dims
    if tuple(d for d in dims if d != 1) in weight_shapes:
        return "weights"
    if dims and dims[-1] == cfg.head_dim and cfg.num_kv_heads in dims[:-2]:
        return "kv"
    return "other"


def abstract_models(name: str, layers: int, dtype) -> tuple[ModelConfig, DraftConfig, dict, dict]:
    """Preset `name`'s config at `layers` layers, an EAGLE-3 head's, and both parameter trees as shapes."""
    hf = presets.hf_config(name)
    hf["num_hidden_layers"] = layers
    cfg = ModelConfig.from_hf(hf)
    dcfg = DraftConfig.for_target(cfg, draft_vocab_size=32000)
    params = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0), dtype))
    dparams = jax.eval_shape(lambda: eagle3.init_params(dcfg, jax.random.key(1), dtype))
    d2t = jax.ShapeDtypeStruct((dcfg.draft_vocab_size,), jnp.int32)
    return cfg, dcfg, params, {"params": dparams, "d2t": d2t}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b", choices=sorted(presets.HF_CONFIGS))
    parser.add_argument("--layers", type=int, default=2, help="layers (copies per step scale with them)")
    parser.add_argument("--context", type=int, default=8192, help="prompt tokens")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--min-mb", type=float, default=1.0, help="smallest buffer listed (MiB)")
    parser.add_argument("--out", help="write the findings as JSON here")
    args = parser.parse_args(argv)

    cfg, dcfg, params, draft = abstract_models(args.model, args.layers, jnp.bfloat16)
    spec = budget_for(args.context, sj.SpecConfig(bounded_draft=True), 0.25)
    ids = jax.ShapeDtypeStruct((1, args.context), jnp.int32)
    print(f"{args.model} at {args.layers} layers, bf16, {args.context}-token prompt, backend "
          f"{jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
    weight_shapes = {tuple(d for d in leaf.shape[1:] if d != 1) for leaf in jax.tree.leaves(params["layers"])}
    report = {}
    for mode in args.modes:
        fn = sj.make_generate_fn(cfg, spec, mode=mode, draft_cfg=dcfg if mode != "ar" else None, max_new_tokens=64,
                                 eos_token_ids=())
        text = jax.jit(fn).lower(params, draft if mode != "ar" else None, ids, jax.random.key(0)).compile().as_text()
        found = hlo.loop_copies(text, int(args.min_mb * 2 ** 20))
        report[mode] = [dict(dataclasses.asdict(f), label=label(f, weight_shapes, cfg)) for f in found]
        print(f"{mode}: {len(found) or 'no'} copies or materialized slices of >= {args.min_mb:g} MiB inside loops")
        groups = collections.defaultdict(list)
        for f, entry in zip(found, report[mode]):
            groups[(entry["label"], f.kind, f.shape)].append(f)
        for (what, kind, shape), fs in sorted(groups.items()):
            print(f"  {what:7s} {kind:5s} {shape:24s} x{len(fs):<3d} {fs[0].nbytes / 2 ** 20:8.2f} MiB each, in "
                  f"{len({f.computation for f in fs})} loop bodies")
        if args.out:  # after each mode, so a run cut short keeps what it found
            with open(args.out, "w") as fh:
                json.dump({"model": args.model, "layers": args.layers, "backend": jax.default_backend(),
                           "device": jax.devices()[0].device_kind, "jax": jax.__version__, "findings": report}, fh,
                          indent=1)
    return report


if __name__ == "__main__":
    main()
