"""AR, EAGLE-3, SpecPV and exact SpecPV side by side in one process, with `transformers` AR as an outside peer.

    python benchmarks/specpv.py                                  # random demo-sized models, CPU
    python benchmarks/specpv.py --target DIR --draft DIR         # converted checkpoints
    python benchmarks/specpv.py --tune                           # SpecConfig.tuned at the largest context

Per context: decode tokens/s of each mode (each run twice, the warm run
reported; prefill excluded), speedup over our AR and over `transformers` AR
(torch CPU, greedy `generate` from a prefilled cache, so decoding alone is timed), mean
accepted length in full and partial verifications, their counts, and fidelity
(fraction of tokens equal to the full-context target's argmax). `specpv-bd` is
`specpv` with the bounded draft cache. Random weights measure the machinery's
cost; acceptance needs trained models.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import specpv_jax as sj
from specpv_jax.demo import random_demo_model, random_head

MODES = ("ar", "eagle", "specpv", "specpv-bd", "exact")


def run_mode(target, head, prompt, new_tokens, mode, spec):
    name = mode
    if mode == "specpv-bd":
        name, spec = "specpv", dataclasses.replace(spec, bounded_draft=True)
    outs = [sj.generate(target, prompt, new_tokens, draft=head, mode=name, spec=spec, eos_token_ids=())
            for _ in range(2)]  # the first run of a fresh executable pays one-time costs
    return outs[1]


def hf_decode_tokens_per_s(hf_dir: Path, prompt: np.ndarray, new_tokens: int) -> float:
    """Greedy `transformers` generate from a prefilled cache (a copy per run), so only decoding is timed."""
    import copy

    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompt[None])
    with torch.no_grad():
        prefilled = model(ids[:, :-1], use_cache=True).past_key_values

    def timed():
        cache = copy.deepcopy(prefilled)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
        return time.perf_counter() - start

    timed()  # warm-up
    return new_tokens / timed()


def budget_for(context: int, base: sj.SpecConfig, fraction: float) -> sj.SpecConfig:
    retrieval = max(base.block_size, min(4096, int(context * fraction)) // base.block_size * base.block_size)
    return dataclasses.replace(base, retrieval_tokens=retrieval)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="target model directory (default: random demo-sized model)")
    parser.add_argument("--draft", help="EAGLE-3 head directory (default: random head)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--tree", type=int, nargs=3, default=(5, 6, 16), metavar=("DEPTH", "TOP_K", "NODES"))
    parser.add_argument("--budget-fraction", type=float, default=0.25,
                        help="retrieval budget as a fraction of the context (at most 4096 tokens)")
    parser.add_argument("--tune", action="store_true", help="pick tree and budget with SpecConfig.tuned")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    target = sj.load_target(args.target) if args.target else random_demo_model()
    head = sj.load_draft(args.draft, target) if args.draft else random_head(target)
    depth, top_k, nodes = args.tree
    base = sj.SpecConfig(tree_depth=depth, tree_top_k=top_k, tree_nodes=nodes)
    tuned = None
    if args.tune:
        tuned = sj.SpecConfig.tuned(target, head, max(args.contexts), verbose=True)
        print(f"tuned: {tuned}")

    hf_dir = None
    if not args.no_hf:
        if args.target and (Path(args.target) / "config.json").exists():
            hf_dir = Path(args.target)
        else:
            from convert.hf import export_hf
            hf_dir = export_hf(Path(tempfile.mkdtemp()) / "target", target.cfg, target.params)

    print(f"device: {jax.devices()[0].device_kind}; target {target.cfg.arch} {target.cfg.num_layers} layers, hidden "
          f"{target.cfg.hidden_size}, vocab {target.cfg.vocab_size}; {args.new_tokens} new tokens")
    header = (f"{'context':>7} {'mode':>10} {'tok/s':>8} {'vs ar':>6} {'vs hf':>6} {'accept':>6} {'full':>6} "
              f"{'partial':>7} {'#full':>5} {'#part':>5} {'fidelity':>8}")
    print(header)
    rows = []
    rng = np.random.default_rng(0)
    for context in args.contexts:
        spec = tuned or budget_for(context, base, args.budget_fraction)
        prompt = rng.integers(0, target.cfg.vocab_size, context)
        hf = hf_decode_tokens_per_s(hf_dir, prompt, args.new_tokens) if hf_dir else None
        ar_speed = None
        for mode in args.modes:
            out = run_mode(target, head, prompt, args.new_tokens, mode, spec)
            s = out.stats
            ar_speed = ar_speed or (s["tokens_per_s"] if mode == "ar" else None)
            row = dict(context=context, mode=mode, tokens_per_s=s["tokens_per_s"],
                       vs_ar=s["tokens_per_s"] / ar_speed if ar_speed else None,
                       vs_hf=s["tokens_per_s"] / hf if hf else None, accept=s["mean_accept_len"],
                       accept_full=s["mean_accept_len_full"], accept_partial=s["mean_accept_len_partial"],
                       full=s["full_verifications"], partial=s["partial_verifications"],
                       fidelity=sj.fidelity(target, prompt, out), retrieval_tokens=spec.retrieval_tokens)
            rows.append(row)
            fmt = lambda x, f: format(x, f) if x is not None else "-"  # noqa: E731
            print(f"{context:>7} {mode:>10} {row['tokens_per_s']:>8.1f} {fmt(row['vs_ar'], '6.2f'):>6} "
                  f"{fmt(row['vs_hf'], '6.2f'):>6} {row['accept']:>6.2f} {row['accept_full']:>6.2f} "
                  f"{row['accept_partial']:>7.2f} {row['full']:>5} {row['partial']:>5} {row['fidelity']:>8.3f}")
        if hf:
            rows.append(dict(context=context, mode="transformers-ar", tokens_per_s=hf))
            print(f"{context:>7} {'hf-ar':>10} {hf:>8.1f}")
    if args.out:
        args.out.write_text(json.dumps(dict(device=jax.devices()[0].device_kind, rows=rows), indent=2))


if __name__ == "__main__":
    main()
