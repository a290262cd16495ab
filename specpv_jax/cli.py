"""The `specpv-jax` console script."""

from __future__ import annotations

import argparse
import pathlib
import sys


def _cmd_convert(args) -> int:
    from specpv_jax.loading import load_target, save_target

    model = load_target(args.hf_dir, dtype=args.dtype)
    out = save_target(model, args.out_dir, overwrite=args.force)
    print(f"wrote {out} ({model.cfg.arch}, {model.cfg.num_layers} layers, {args.dtype})")
    return 0


def _cmd_generate(args) -> int:
    from specpv_jax import text
    from specpv_jax.generate import generate
    from specpv_jax.loading import load_draft, load_target

    model = load_target(args.model, dtype=args.dtype)
    draft = load_draft(args.draft, model) if args.draft else None
    prompt = pathlib.Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    ids = text.encode_prompt(model.tokenizer, prompt, chat=not args.no_chat)
    out = generate(model, ids, max_new_tokens=args.max_new_tokens, mode=args.mode, draft=draft,
                   temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(text.decode(model.tokenizer, out.tokens[0, : out.lengths[0]].tolist()))
    if args.stats:
        for k, v in out.stats.items():
            print(f"{k:>24}: {v:.4g}" if isinstance(v, float) else f"{k:>24}: {v}", file=sys.stderr)
    return 0


def _cmd_demo(args) -> int:
    from specpv_jax.demo import run_demo

    return run_demo()


def _not_yet(name):
    def run(args) -> int:
        print(f"specpv-jax {name}: not implemented yet", file=sys.stderr)
        return 2
    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specpv-jax", description="Long-context speculative decoding in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a Hugging Face LLaMA/Qwen directory to an orbax checkpoint")
    c.add_argument("hf_dir")
    c.add_argument("out_dir")
    c.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    c.set_defaults(run=_cmd_convert)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("model", help="HF directory or orbax checkpoint")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-file")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--mode", default="ar", help="ar | eagle | specpv | exact (the last three need --draft)")
    g.add_argument("--draft", help="EAGLE-3 head directory or orbax export")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--stats", action="store_true", help="print counters and timings to stderr")
    g.set_defaults(run=_cmd_generate)

    d = sub.add_parser("demo", help="run the bundled demo")
    d.set_defaults(run=_cmd_demo)
    for name in ("bench", "train-draft"):
        sub.add_parser(name).set_defaults(run=_not_yet(name))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"specpv-jax {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
