"""The `specpv-jax` console script."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import signal
import sys
import threading
import warnings
from typing import Callable

from specpv_jax.config import PARTIAL_MODES, SpecConfig, spec_fields_read
from specpv_jax.generate import MODES
from specpv_jax.jax_settings import under_defaults


def _cmd_convert(args) -> int:
    from specpv_jax.checkpoint import check_destination
    from specpv_jax.loading import load_target, save_target

    check_destination(args.out_dir, args.force, source=args.hf_dir)  # before the (long) load
    model = load_target(args.hf_dir, dtype=args.dtype)
    out = save_target(model, args.out_dir, overwrite=args.force)
    print(f"wrote {out} ({model.cfg.arch}, {model.cfg.num_layers} layers, {model.dtype}"
          f"{'' if args.dtype else ' as stored'})")
    if model.tokenizer is None:
        print(f"note: {args.hf_dir} has no tokenizer files, nor has {out}: text prompts (generate --prompt) need "
              f"them in {pathlib.Path(out) / 'tokenizer'}", file=sys.stderr)
    return 0


def at_least(minimum: int):
    """An argparse type: an integer >= `minimum`."""
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {raw!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def positive_number(raw: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {raw!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {raw}")
    return value


def _model_config(path: str):
    """The config of an HF directory, an orbax checkpoint or a preset name (`presets.HF_CONFIGS`)."""
    from convert.hf import read_config
    from specpv_jax import checkpoint, presets
    from specpv_jax.config import ModelConfig

    if pathlib.Path(path).is_file():
        raise NotADirectoryError(f"{path} is a file; pass the model directory")
    if not pathlib.Path(path).exists():
        if path in presets.HF_CONFIGS:
            return presets.model_config(path)
        raise FileNotFoundError(f"{path} is neither a model directory nor a preset "
                                f"({', '.join(presets.HF_CONFIGS)})")
    if checkpoint.is_checkpoint(path):
        return checkpoint.config_from_meta(path, checkpoint.read_meta(path), "model_config", ModelConfig.from_dict)
    return read_config(path)[0]


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _spec_names(assignments: list[str] | None) -> list[str]:
    """The fields `--spec FIELD=VALUE` strings name."""
    return [item.partition("=")[0].strip().replace("-", "_") for item in assignments or ()]


def parse_spec(assignments: list[str] | None, **fields):
    """A `SpecConfig` from `--spec FIELD=VALUE` strings, each value read as its field's type, and `fields`.

    `buffer_tokens=none` restores that field's automatic size; booleans take true/false (yes/no, on/off, 1/0).
    """
    defaults = {f.name: f.default for f in dataclasses.fields(SpecConfig)}
    values = {}
    for item, name in zip(assignments or (), _spec_names(assignments)):
        _, sep, raw = item.partition("=")
        raw = raw.strip()
        if not (sep and name):
            raise ValueError(f"--spec {item!r}: expected FIELD=VALUE, e.g. --spec tree_nodes=30")
        if name not in defaults:
            raise ValueError(f"--spec {item!r}: SpecConfig has no field {name!r}; fields: {', '.join(defaults)}")
        default = defaults[name]
        if isinstance(default, bool):
            if raw.lower() not in _TRUE + _FALSE:
                raise ValueError(f"--spec {item!r}: {name} takes true or false")
            values[name] = raw.lower() in _TRUE
            continue
        kind = int if default is None else type(default)  # buffer_tokens: int or none
        try:
            values[name] = None if default is None and raw.lower() == "none" else kind(raw)
        except ValueError:
            raise ValueError(f"--spec {item!r}: {name} takes {'an integer' if kind is int else 'a number'}"
                             f"{' or none' if default is None else ''}") from None
    return SpecConfig(**values, **fields)


def parse_chat_options(assignments: list[str] | None) -> dict:
    """Chat-template variables from `--chat-option NAME=VALUE` strings: a VALUE that reads as JSON (false, 3,
    "x") or as a Python boolean (False) is that value, any other a string."""
    from specpv_jax.text import TEMPLATE_CALL_ARGUMENTS

    options = {}
    for item in assignments or ():
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not (sep and name.isidentifier()):
            raise ValueError(f"--chat-option {item!r}: expected NAME=VALUE, e.g. --chat-option enable_thinking=false")
        if name in TEMPLATE_CALL_ARGUMENTS:
            raise ValueError(f"--chat-option {name}: generate sets it when it applies the chat template (a user "
                             f"turn, then the generation prompt); --no-chat encodes the prompt as it is")
        if raw.strip() in ("True", "False"):  # enable_thinking=False: Python's spelling (as a string, it was true)
            options[name] = raw.strip() == "True"
            continue
        try:
            options[name] = json.loads(raw)
        except json.JSONDecodeError:
            options[name] = raw
    return options


def mesh_shape(raw: str) -> tuple[int, int]:
    """An argparse type: a `DATAxMODEL` mesh shape such as 2x4."""
    data, sep, model = raw.lower().partition("x")
    if not (sep and data.isdigit() and model.isdigit() and int(data) >= 1 and int(model) >= 1):
        raise argparse.ArgumentTypeError(f"expected DATAxMODEL such as 1x8 or 2x4, got {raw!r}")
    return int(data), int(model)


def _cmd_plan(args) -> int:
    import jax

    from specpv_jax import loading, memory
    from specpv_jax.config import EAGLE3_MODES, DraftConfig, LongSpecConfig, ModelConfig
    from specpv_jax.generate import check_mode_and_draft
    from specpv_jax.sampling import Sampler
    from specpv_jax.sharding import default_shape

    spec = parse_spec(args.spec)
    Sampler.create(args.temperature, args.top_p, args.top_k)  # checks them
    cfg = _model_config(args.model)
    if args.context + args.new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"--context {args.context} + --new-tokens {args.new_tokens} exceed the model's "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    draft = loading.draft_config(args.draft, cfg) if args.draft else None
    # the modes the draft runs (their rows size it; the others a target-shaped one): a small draft model's
    # specextend row only appears with one
    drafted = {ModelConfig: ("specextend",), LongSpecConfig: ("longspec",), DraftConfig: EAGLE3_MODES}.get(
        type(draft), ())
    for mode in drafted:  # what generate would refuse is refused here too (the tree against the draft, ...)
        check_mode_and_draft(cfg, mode, draft, dataclasses.replace(spec, offload=False))
    spec.check_partial()  # every plan has rows for the partial modes
    limit, host_limit = memory.device_bytes_limit(), memory.host_bytes_limit()
    data, model = _mesh_shape(args, spec) or default_shape(jax.device_count(), cfg)
    print(f"{cfg.arch}, {cfg.num_layers} layers x {cfg.hidden_size}, {memory.param_count(cfg) / 1e9:.2f} B params; "
          f"context {args.context}, {args.new_tokens} new tokens, batch {args.batch}, {args.dtype}; "
          f"{f'per device of a {data}x{model} mesh; ' if data * model > 1 else ''}device limit "
          f"{memory.gib(limit) if limit else 'not reported by this backend'}; host limit for offload "
          f"{f'{memory.gib(host_limit.bytes)} ({host_limit.source})' if host_limit else 'unknown'}")
    print(f"{'mode':>10} {'device':>11} {'with offload: device':>21} {'host':>10}  fits")
    fits_any = False
    for mode in memory.MODES:
        if mode == "specextend" and "specextend" not in drafted:
            continue
        sizes = dict(draft_cfg=draft if mode in drafted else None, temperature=args.temperature,
                     top_p=args.top_p, top_k=args.top_k)
        est = memory.estimate(cfg, args.context, args.new_tokens, args.batch, mode,
                              dataclasses.replace(spec, offload=False), args.dtype, mesh_shape=(data, model), **sizes)
        fits = "unknown" if limit is None else "yes" if est.total <= limit else "no"
        offload = ("-", "-")
        if est.host and data * model == 1:  # offload=True (one device): the full cache and summaries in host memory
            off = memory.estimate(cfg, args.context, args.new_tokens, args.batch, mode,
                                  dataclasses.replace(spec, offload=True), args.dtype, **sizes)
            offload = (memory.gib(off.device), memory.gib(off.host))
            host_fits = host_limit is None or off.host <= host_limit.bytes
            fits = "with offload" if fits == "no" and off.device <= limit and host_fits else fits
        fits_any |= fits != "no"
        print(f"{mode:>10} {memory.gib(est.total):>11} {offload[0]:>21} {offload[1]:>10}  {fits}")
    if not fits_any:
        print("specpv-jax plan: error: no mode fits this device", file=sys.stderr)
    return 0 if fits_any else 1


def _cmd_generate(args) -> int:
    import jax
    import jax.numpy as jnp

    from specpv_jax import loading, prompts, text
    from specpv_jax.generate import check_mode_and_draft, check_seed, generate
    from specpv_jax.sampling import Sampler
    from specpv_jax.sharding import make_mesh

    # All that can be checked is checked before the (long) loads of the weights.
    spec = parse_spec(args.spec)
    Sampler.create(args.temperature, args.top_p, args.top_k)
    check_seed(args.seed or 0)
    if args.mode != "ar" and not args.draft:
        raise ValueError(f"--mode {args.mode} needs --draft DIR")
    if args.mode == "ar" and args.draft:
        raise ValueError("--mode ar uses no draft: leave out --draft, or choose a speculative --mode")
    if args.mode == "ar" and args.spec:
        raise ValueError("--mode ar decodes with the target alone: --spec sets the speculative modes' tree and "
                         "caches (leave it out, or choose a speculative --mode)")
    _point_out_settings(args, spec)
    if args.draft:
        loading.check_directory(pathlib.Path(args.draft), "draft")
    prompt = _read_prompt(args.prompt_file) if args.prompt_file else args.prompt
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes of another encoding, passed through by the console's decoding
        raise ValueError(f"--prompt is not UTF-8 text (character {e.start}); pass UTF-8 text") from None
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    template_options = parse_chat_options(args.chat_option)
    if template_options and args.no_chat:
        raise ValueError("--chat-option sets chat-template variables: it does not combine with --no-chat")
    shape = _mesh_shape(args, spec)
    _require_tokenizer(args.model, "generate encodes the prompt with them")
    cfg = _model_config(args.model)
    check_mode_and_draft(cfg, args.mode, loading.draft_config(args.draft, cfg) if args.draft else None, spec)
    tokenizer = loading.load_tokenizer(args.model)
    ids = text.encode_prompt(tokenizer, prompt, chat=not args.no_chat, template_options=template_options)
    prompts.prepare([ids], cfg, args.max_new_tokens, chunk=1)  # ids and length
    if args.mode in PARTIAL_MODES and len(ids) + args.max_new_tokens <= spec.partial_threshold:
        print(f"note: {args.mode} verifies against the partial cache only past {spec.partial_threshold} tokens of "
              f"context (sink + retrieval + window): at {len(ids)} + {args.max_new_tokens} new tokens every "
              f"verification is a full one, as in --mode eagle", file=sys.stderr)
    mesh = make_mesh(*shape, devices=jax.devices()[:shape[0] * shape[1]]) if shape else None
    stored = loading.stored_dtype(args.model) if args.dtype is None else None
    dtype = args.dtype or "float32"
    if stored and jnp.dtype(stored).itemsize < jnp.dtype(dtype).itemsize:
        print(f"note: {args.model} stores {stored}, loaded as {dtype} (--dtype's default) at "
              f"{jnp.dtype(dtype).itemsize // jnp.dtype(stored).itemsize}x its size: --dtype {stored} keeps it",
              file=sys.stderr)
    model = loading.load_target(args.model, dtype=dtype, mesh=mesh)  # generate runs where the model is
    draft = loading.load_draft(args.draft, model) if args.draft else None
    stream = None if args.no_stream else text.TextStream(tokenizer)
    out = generate(model, ids, max_new_tokens=args.max_new_tokens, mode=args.mode, draft=draft,
                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed or 0, spec=spec,
                   stream=stream)
    if stream is None:
        print(text.decode(tokenizer, out.tokens[0, : out.lengths[0]].tolist()))
    else:
        stream.flush()
        print()
    if args.stats:
        print(stats_table(out.stats), file=sys.stderr)
    return 0


def _point_out_settings(args, spec) -> None:
    """Warns of `generate`'s settings that have no effect, and notes a default tree on a CPU."""
    import jax

    from specpv_jax.warning import warn

    unread = [name for name in dict.fromkeys(_spec_names(args.spec))
              if name not in spec_fields_read(args.mode) and getattr(spec, name) != getattr(SpecConfig(), name)]
    if unread:
        warn(f"--mode {args.mode} does not read --spec " + ", ".join(
            f"{name} (read by {', '.join(m for m in MODES if name in spec_fields_read(m))})" for name in unread)
             + ": no effect")
    if args.seed is not None and args.temperature == 0:
        warn(f"--seed {args.seed} has no effect with --temperature 0 (greedy decoding)")
    if args.mode == "exact" and args.temperature == 0 and "full_step_cost" in _spec_names(args.spec):
        warn("--spec full_step_cost has no effect with --temperature 0: greedy exact mode confirms by its "
             "tokens' margins, not by a planned cap")
    tree = ("tree_depth", "tree_top_k", "tree_nodes")
    if args.mode != "ar" and jax.default_backend() == "cpu" and not set(tree) & set(_spec_names(args.spec)):
        print(f"note: on a CPU the default tree ({', '.join(f'{n}={getattr(spec, n)}' for n in tree)}, for GPUs) "
              f"costs more per step than it saves; a small one drafts faster here: --spec tree_depth=3 --spec "
              f"tree_top_k=3 --spec tree_nodes=6", file=sys.stderr)


def _require_tokenizer(model: str, why: str) -> None:
    """Raises, before any loading, unless `model` is a target's directory with tokenizer files."""
    from specpv_jax import checkpoint, loading

    loading.check_target_directory(model)
    if loading.tokenizer_directory(model) is None:
        where = pathlib.Path(model) / "tokenizer" if checkpoint.is_checkpoint(model) else model
        raise ValueError(f"{model} has no tokenizer files ({', '.join(checkpoint.TOKENIZER_MARKERS)}); {why}: "
                         f"copy them from the model's Hugging Face directory into {where}")


def _mesh_shape(args, spec) -> tuple[int, int] | None:
    """--mesh as (data, model); 1x1 with --spec offload=true (which runs on one device); None: the default."""
    if not spec.offload:
        return args.mesh
    if args.mesh and args.mesh != (1, 1):
        raise ValueError(f"--spec offload=true runs on one device, not a {args.mesh[0]}x{args.mesh[1]} mesh: "
                         f"leave out --mesh")
    return 1, 1


def _read_prompt(path: str) -> str:
    import io

    try:
        if path == "-":  # strict UTF-8 as from a file (the console's decoding lets undecodable bytes through)
            return io.TextIOWrapper(io.BytesIO(sys.stdin.buffer.read()), encoding="utf-8-sig").read()
        return pathlib.Path(path).read_text(encoding="utf-8-sig")  # without a byte-order mark
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt-file {path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except OSError as e:
        raise OSError(f"--prompt-file {path}: {e.strerror}") from None


def stats_table(stats: dict) -> str:
    """`generate` stats as an aligned two-column table."""
    rows = [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in stats.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:>10}" for k, v in rows)


def _cmd_demo(args) -> int:
    from specpv_jax.demo import run_demo

    run_demo(context=args.context, new_tokens=args.max_new_tokens)
    return 0


LONG_STEPS, LONG_LENGTH = 100, 2048  # train-draft's --long-context fine-tune


def _cmd_train_draft(args) -> int:
    from convert.eagle3 import export_eagle3
    from specpv_jax.checkpoint import check_destination
    from specpv_jax.loading import load_target
    from specpv_jax.train import corpus, eagle
    from specpv_jax.train.trainer import TrainConfig

    # Before hours of training, not after; --force must not replace the target or the data.
    for source in (args.target, *args.data):
        check_destination(args.out, args.force, source=source)
    out_dir = pathlib.Path(args.out).resolve()
    if out_dir == pathlib.Path(args.target).resolve():
        raise ValueError(f"--out {args.out} is the target; writing the head there would delete it")
    if args.work is not None:
        work_dir = pathlib.Path(args.work).resolve()
        if work_dir == out_dir or out_dir in work_dir.parents or work_dir in out_dir.parents:
            raise ValueError(f"--work {args.work} and --out {args.out} must be separate directories (writing the "
                             f"head replaces --out whole)")
        blocking = next((p for p in (work_dir, *work_dir.parents) if p.exists()), None)
        if blocking is not None and not blocking.is_dir():  # found only after loading and tokenizing, was
            raise ValueError(f"--work {args.work}: {blocking} is a file; checkpoints go into a directory")
    elif args.save_every is not None:
        raise ValueError("--save-every sets how often --work DIR is saved: add --work")
    if args.long_context is None:
        given = [name for name in ("--long-steps", "--long-length") if getattr(args, name[2:].replace("-", "_"))]
        if given:
            raise ValueError(f"{' and '.join(given)} set the --long-context fine-tune: add --long-context")
    args.long_steps = args.long_steps or LONG_STEPS
    args.long_length = args.long_length or min(LONG_LENGTH, args.long_context or LONG_LENGTH)
    for name, length in [("--length", args.length)] + [("--long-length", args.long_length)] * bool(args.long_context):
        if args.unroll >= length:
            raise ValueError(f"--unroll {args.unroll} must be below {name} {length} (each training-time-test "
                             f"step predicts one token further into the window)")
    if args.long_context is not None and args.long_context <= args.length:
        raise ValueError(f"--long-context {args.long_context} must exceed --length {args.length} (the YaRN "
                         f"fine-tune stretches RoPE beyond the trained length)")
    if args.long_context is not None and args.long_length <= args.length:
        raise ValueError(f"--long-length {args.long_length} must exceed --length {args.length} (the YaRN fine-tune "
                         f"trains the positions beyond those the first phase trained)")
    if args.long_context is not None and args.long_length > args.long_context:
        raise ValueError(f"--long-length {args.long_length} must not exceed --long-context {args.long_context} "
                         f"(the positions the YaRN fine-tune stretches RoPE to)")
    saving = {} if args.save_every is None else {"save_every": args.save_every}
    short = TrainConfig(args.steps, args.batch, args.length, lr=args.lr, **saving)  # checks them
    long = (TrainConfig(args.long_steps, max(1, args.batch // 4), args.long_length, lr=args.lr / 10, warmup=5,
                        **saving) if args.long_context else None)
    _require_tokenizer(args.target, "train-draft tokenizes --data with them")
    positions = _model_config(args.target).max_position_embeddings
    longest = max(args.length, args.long_context or 0)
    if longest > positions:
        raise ValueError(f"{'--long-context' if args.long_context else '--length'} {longest} exceeds the target's "
                         f"max_position_embeddings ({positions}): the head drafts within the target's positions")
    written = [args.out] + ([] if args.work is None else [pathlib.Path(args.work, d) for d in eagle.WORK_DIRS])
    data = corpus.read_text_files(args.data, exclude=tuple(written))
    for what, names in (("not UTF-8 text", data.not_text), ("empty", data.empty)):
        if names:
            print(f"train-draft: skipped {len(names)} {what} file(s): {_listed(names)}", file=sys.stderr)
    target = load_target(args.target, dtype="float32")
    token_docs = corpus.encode_documents(target.tokenizer, data.docs)
    outside = [(d.name, int(ids.max())) for d, ids in zip(data.docs, token_docs) if ids.max() >= target.cfg.vocab_size]
    if outside:
        raise ValueError(f"the tokenizer in {args.target} gives token ids the model does not have (up to "
                         f"{max(i for _, i in outside)} in {outside[0][0]}; vocab_size {target.cfg.vocab_size}): "
                         f"the tokenizer does not belong to this model")
    tokens = sum(d.size for d in token_docs)
    for name, length in [("--length", args.length)] + [("--long-length", args.long_length)] * bool(args.long_context):
        if tokens < length:
            raise ValueError(f"--data holds {tokens} tokens, fewer than one {name} window of {length}")
    print(f"train-draft: {len(data.docs)} files, {tokens} tokens", file=sys.stderr)
    head, metrics = eagle.train_eagle3(target.params, target.cfg, token_docs,
                                       min(args.draft_vocab, target.cfg.vocab_size), short, long, args.long_context,
                                       args.unroll, args.work)
    out = export_eagle3(args.out, head.cfg, head.params, head.d2t, overwrite=args.force)
    if metrics:
        accuracy = " ".join(f"{metrics[f'acc{i}']:.2f}" for i in range(args.unroll))
        print(f"wrote {out} (last-step accuracy per TTT step: {accuracy})")
    else:
        print(f"wrote {out} (--work {args.work} held the finished run: no new steps)")
    return 0


def _listed(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _cmd_bench(args) -> int:
    from specpv_jax.bench import run

    run(args)
    return 0


def _add_mesh_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--mesh", type=mesh_shape, metavar="DATAxMODEL",
                   help=f"{what} (default: all devices, along model as many as divide the heads; 1x1 with --spec "
                        f"offload=true)")


def _add_spec_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", action="append", metavar="FIELD=VALUE",
                   help="a SpecConfig field (repeatable), e.g. --spec retrieval_tokens=2048 --spec offload=true "
                        "--spec tree_nodes=30; see help(specpv_jax.SpecConfig)")


class _HelpWithDefaults(argparse.HelpFormatter):
    """Help that states each option's default, where it has one (argparse's own prints "default: None")."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS)) \
                and "default" not in help:
            help += " (default: %(default)s)"
        return help


def build_parser() -> argparse.ArgumentParser:
    """The `specpv-jax` argument parser, one subcommand per command (demo, generate, convert, bench, ...)."""
    from specpv_jax.presets import HF_CONFIGS

    p = argparse.ArgumentParser(prog="specpv-jax", description="Long-context speculative decoding in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=_HelpWithDefaults)

    c = sub.add_parser("convert", help="convert a Hugging Face LLaMA/Qwen directory to an orbax checkpoint")
    c.add_argument("hf_dir")
    c.add_argument("out_dir")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype to store the weights in (default: the checkpoint's own)")
    c.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    c.set_defaults(run=_cmd_convert)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("model", help="HF directory or orbax checkpoint")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="a UTF-8 file holding the prompt text (-: standard input)")
    g.add_argument("--max-new-tokens", type=at_least(1), default=256, help="tokens to generate at most")
    g.add_argument("--mode", default="ar", choices=MODES,
                   help="ar; eagle, specpv, exact (with an EAGLE-3 --draft); specextend (with a small draft "
                        "model --draft); longspec (with a LongSpec --draft)")
    g.add_argument("--draft", help="EAGLE-3 head, small draft model or LongSpec draft directory, or an orbax export")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype the weights and caches are loaded in (default: float32)")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    g.add_argument("--seed", type=int, help="sampling seed (default: 0)")
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--chat-option", action="append", metavar="NAME=VALUE",
                   help="a variable the chat template reads, VALUE as JSON where it parses (repeatable), e.g. "
                        "enable_thinking=false for Qwen3")
    g.add_argument("--stats", action="store_true", help="print counters and timings to stderr")
    g.add_argument("--no-stream", action="store_true", help="print the text at the end, not as it is generated")
    _add_mesh_argument(g, "device mesh to load the model on and run on")
    _add_spec_argument(g)
    g.set_defaults(run=_cmd_generate)

    pl = sub.add_parser("plan", help="device and host memory of each mode, before loading anything")
    pl.add_argument("--model", required=True, help="HF directory or orbax checkpoint (only its config is read), "
                    f"or a preset: {', '.join(HF_CONFIGS)}")
    pl.add_argument("--context", type=at_least(1), required=True, help="prompt tokens")
    pl.add_argument("--new-tokens", type=at_least(1), default=256, help="tokens to generate")
    pl.add_argument("--batch", type=at_least(1), default=1, help="prompts per call")
    pl.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the weights and caches")
    pl.add_argument("--draft", help="the draft's directory or orbax export (only its config is read): an EAGLE-3 "
                    "head sizes the eagle/specpv/exact rows, a LongSpec draft the longspec row, a small draft "
                    "model adds the specextend row; without one, drafts shaped like a target layer")
    pl.add_argument("--temperature", type=float, default=0.0, help="sampling holds more per step than greedy")
    pl.add_argument("--top-p", type=float, default=1.0, help="below 1, nucleus sampling's buffers")
    pl.add_argument("--top-k", type=int, default=0, help="above 0, top-k sampling's buffers (as --top-p's)")
    _add_mesh_argument(pl, "device mesh to plan for, per device")
    _add_spec_argument(pl)
    pl.set_defaults(run=_cmd_plan)

    d = sub.add_parser("demo", help="run the bundled demo")
    d.add_argument("--context", type=at_least(1), default=16384, help="prompt tokens (a held-out module's source)")
    d.add_argument("--max-new-tokens", type=at_least(2), default=128,
                   help="tokens each mode generates (the first comes from the prefill, the speeds from the rest)")
    d.set_defaults(run=_cmd_demo)
    from specpv_jax.train.trainer import TrainConfig
    t = sub.add_parser("train-draft", help="train an EAGLE-3 head for a target on text files")
    t.add_argument("--target", required=True, help="HF directory or orbax checkpoint (with tokenizer files)")
    t.add_argument("--data", nargs="+", required=True, help="text files or directories of them")
    t.add_argument("--out", required=True, help="output directory (public EAGLE-3 layout)")
    t.add_argument("--steps", type=at_least(1), default=1000,
                   help="training steps (resumed with more: the cosine schedule stretches to them, so the learning "
                        "rate rises again from the resumed step)")
    t.add_argument("--batch", type=at_least(1), default=8, help="sequences per step")
    t.add_argument("--length", type=at_least(2), default=512, help="training sequence length")
    t.add_argument("--lr", type=positive_number, default=2e-3,
                   help="peak learning rate (cosine schedule; the --long-context fine-tune uses a tenth of it)")
    t.add_argument("--unroll", type=at_least(1), default=5, help="training-time-test steps")
    t.add_argument("--draft-vocab", type=at_least(1), default=32000,
                   help="draft vocabulary size (capped at the target's)")
    t.add_argument("--long-context", type=at_least(2), help="YaRN fine-tune stretching RoPE to this many positions")
    t.add_argument("--long-steps", type=at_least(1), help=f"steps of the --long-context fine-tune (default "
                   f"{LONG_STEPS})")
    t.add_argument("--long-length", type=at_least(2), help=f"sequence length of the --long-context fine-tune "
                   f"(default {LONG_LENGTH} or --long-context if shorter; batch: --batch / 4)")
    t.add_argument("--work", help="directory for resumable training checkpoints")
    t.add_argument("--save-every", type=at_least(1), metavar="STEPS",
                   help=f"steps between saves to --work (default: {TrainConfig.save_every})")
    t.add_argument("--force", action="store_true", help="replace OUT if it exists")
    t.set_defaults(run=_cmd_train_draft)
    b = sub.add_parser("bench", help="the modes side by side over context lengths; writes bench.json/md/png")
    from specpv_jax.bench import add_arguments
    add_arguments(b)
    b.set_defaults(run=_cmd_bench)
    return p


def _show_warning(command: str, show: Callable) -> Callable:
    """`warnings.showwarning` that prints the library's warnings as a command's messages (their file and line
    would be the CLI's own), others as `show` does."""
    from specpv_jax.warning import SpecPVWarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SpecPVWarning):
            print(f"specpv-jax {command}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)
    return showwarning


@under_defaults
def main(argv: list[str] | None = None) -> int:
    """Entry point of `specpv-jax`: runs the subcommand `argv` names (default `sys.argv[1:]`); the exit status."""
    args = build_parser().parse_args(argv)
    # transformers says at import that without torch it has no models: we read only its configs and tokenizers
    # (bench checks for torch itself where its peer needs it)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning(args.command, warnings.showwarning)
            return args.run(args)
    except KeyboardInterrupt:  # Ctrl-C: what was interrupted has said what it kept (train-draft: its --work)
        print(f"specpv-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `specpv-jax generate ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError, NotImplementedError, MemoryError, FloatingPointError) as e:
        print(f"specpv-jax {args.command}: error: {e}", file=sys.stderr)
        return 1


def redeliver_interrupts(passed_on: Callable) -> Callable:
    """An unraisable-exception hook that raises again, in the main thread, a Ctrl-C that Python would drop: one
    that lands in a garbage-collector callback (JAX runs one at each full collection; a `convert` went on to the
    end). Every other report goes to `passed_on`."""
    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):  # raised in this hook, it would be dropped too
            threading.Timer(0.05, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
        else:
            passed_on(unraisable)
    return hook


def entry() -> None:
    """The `specpv-jax` command: `main`'s status as the exit code. After Ctrl-C the process ends at once: an
    XLA compilation interrupted part-way crashes the interpreter's shutdown (a segfault, status 139)."""
    sys.unraisablehook = redeliver_interrupts(sys.unraisablehook)
    status = main()
    if status == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
