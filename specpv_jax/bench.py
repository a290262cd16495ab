"""`specpv-jax bench`: the modes side by side in one process over context lengths.

    specpv-jax bench                                 # demo models, 2K/4K/8K/16K, held-out prompts
    specpv-jax bench --quick                         # 1K/2K, fewer tokens (minutes on 2 CPU cores)
    specpv-jax bench --target DIR --draft DIR --contexts 16384 32768

Per context: decode tokens/s of each mode (the fastest of two runs after a
warm-up, the modes and `transformers` taking turns; prefill excluded; with `--prompts N`, over N held-out
documents: all their decode tokens over all their decode time), speedup over our `ar` and
over `transformers` greedy generate (torch CPU, from a prefilled cache, so decoding alone is
timed), mean accepted length in full and partial verifications, their counts,
and fidelity (share of tokens equal to the full-context target's greedy
choice; not measured with `--temperature`, where every mode and `transformers`
sample, seed 0 in each run). `specpv-bd` and `exact-bd` are `specpv` and
`exact` with the bounded draft cache; `draft` is classic draft-model
speculation with the small draft model (it attends to its whole cache),
`specextend` the same pair with Cross-model Retrieval;
`longspec` the LongSpec draft, `longspec-plain` its ablation trained without
anchor-offset positions. Every mode drafts the same tree (`--tree`) except
`specextend-ref` and `longspec-ref`: those peers with their reference code's
own trees (`specextend.SPECEXTEND_TREE`, `longspec.LONGSPEC_TREE`). Writes
`bench.json`, `bench.md` and `bench.png` into `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import json
import pathlib
import tempfile
import time
from typing import Iterator

import numpy as np

from specpv_jax import config

TREE_FIELDS = ("tree_depth", "tree_top_k", "tree_nodes")  # --tree's three numbers
MODES = ("ar", "eagle", "specpv", "specpv-bd", "exact", "exact-bd", "draft", "specextend", "specextend-ref",
         "longspec", "longspec-ref", "longspec-plain")
DEFAULT_MODES = config.MODES  # generate's
SMALL_DRAFT_MODES = ("draft", "specextend", "specextend-ref")
REFERENCE_TREE_FIELDS = TREE_FIELDS + ("tree_threshold", "tree_beam")
DRAFT_OPTIONS = {"eagle3": "--draft", "small": "--small-draft", "longspec": "--longspec-draft",
                 "longspec_plain": "--longspec-plain-draft"}


def draft_kind(mode: str) -> str | None:
    """Which of the bench's drafts a mode runs with (None for ar)."""
    if mode == "ar":
        return None
    if mode in SMALL_DRAFT_MODES:
        return "small"
    if mode.startswith("longspec"):
        return "longspec_plain" if mode == "longspec-plain" else "longspec"
    return "eagle3"


TIMED_ROUNDS = 2  # after a warm-up round (a fresh executable's first run pays one-time costs)


def fastest_runs(target, drafts: dict, prompt, new_tokens, modes, spec, peers=None,
                 temperature: float = 0.0) -> tuple[dict, dict]:
    """Each mode's fastest run (by decode tokens/s) of `TIMED_ROUNDS` rounds over all `modes` after a warm-up
    round: round robin, so that a slow spell of a shared machine does not fall on one mode's runs alone.
    `peers` ({name: fn() -> decode tokens/s}, transformers) take their turns in each round too.

    Returns ({mode: its fastest `GenerateOutput`}, {peer: its best tokens/s})."""
    best, best_peer = {}, {}
    for round_ in range(1 + TIMED_ROUNDS):
        for mode in modes:
            out = run_mode(target, drafts, prompt, new_tokens, mode, spec, temperature)
            if round_ and (mode not in best or out.stats["tokens_per_s"] > best[mode].stats["tokens_per_s"]):
                best[mode] = out
        for name, run in (peers or {}).items():
            speed = run()
            if round_:
                best_peer[name] = max(speed, best_peer.get(name, speed))
    return best, best_peer


def run_mode(target, drafts: dict, prompt, new_tokens, mode, spec, temperature: float = 0.0):
    """One `generate` call of a bench mode (greedy, or sampling at `temperature` with seed 0).

    drafts: {"eagle3": head, "small": small draft model, "longspec": ..., "longspec_plain": ...};
    "specpv-bd" and "exact-bd" those modes with the bounded draft cache, "draft" classic draft-model speculation
    (specextend without retrieval), "*-ref" a peer with its reference code's tree, "longspec-plain"
    longspec with the ablation draft.
    """
    from specpv_jax.generate import generate

    name, spec = generate_mode(mode, spec)
    return generate(target, prompt, new_tokens, draft=drafts.get(draft_kind(mode)), mode=name, spec=spec,
                    temperature=temperature, seed=0, eos_token_ids=())


def generate_mode(mode: str, spec):
    """The `generate` mode and `SpecConfig` a bench mode runs with (`offload` and `bounded_draft` only in the
    modes with partial steps)."""
    if mode.endswith("-bd"):
        return mode.removesuffix("-bd"), dataclasses.replace(spec, bounded_draft=True)
    if mode == "draft":
        mode, spec = "specextend", dataclasses.replace(spec, draft_chunks=0)
    if mode.endswith("-ref"):
        from specpv_jax.longspec import LONGSPEC_TREE
        from specpv_jax.specextend import SPECEXTEND_TREE

        mode = mode.removesuffix("-ref")
        tree = {"specextend": SPECEXTEND_TREE, "longspec": LONGSPEC_TREE}[mode]
        spec = dataclasses.replace(spec, **{name: getattr(tree, name) for name in REFERENCE_TREE_FIELDS})
    if mode == "ar":
        return mode, config.SpecConfig()  # the target alone: the speculative settings do not apply
    mode = "longspec" if mode == "longspec-plain" else mode
    return mode, spec if mode in config.PARTIAL_MODES else dataclasses.replace(spec, offload=False,
                                                                             bounded_draft=False)


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    """transformers' advice to its users kept out of the bench's output: the deprecation of generate's arguments
    beside a generation config, and that a draft (the demo's small one) runs past its trained length, as it does
    in our specextend."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


def load_hf(hf_dir: pathlib.Path):
    """A `transformers` model from `hf_dir`, float32, in eval mode."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def hf_decoding(temperature: float) -> dict:
    """`transformers` generate's options for greedy decoding, or sampling at `temperature` from the whole
    distribution (as our `generate` does: no top-k)."""
    return dict(do_sample=True, temperature=temperature, top_k=0) if temperature else dict(do_sample=False)


def hf_decode_timer(model, prompt: np.ndarray, new_tokens: int, temperature: float = 0.0):
    """A function timing one `transformers` generate of `model` (`load_hf`; greedy, or sampling at
    `temperature`) from a prefilled cache (a copy per run, so only decoding is timed): its decode tokens/s."""
    import copy

    import torch

    ids = torch.tensor(prompt[None], dtype=torch.long)
    keyword = hf_cache_keyword(model)
    with torch.no_grad():
        prefilled = getattr(model(ids[:, :-1], use_cache=True), keyword)

    def timed():
        cache = copy.deepcopy(prefilled)
        start = time.perf_counter()
        with torch.no_grad(), _transformers_quiet():
            model.generate(ids, attention_mask=torch.ones_like(ids), **{keyword: cache},
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                           pad_token_id=0, **hf_decoding(temperature))
        return new_tokens / (time.perf_counter() - start)

    return timed


def hf_cache_keyword(model) -> str:
    """The name of a prefilled cache, as `generate`'s keyword and as the model output's attribute: `cache` in
    newer `transformers` 5.x (which deprecates and will remove `past_key_values`), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.prepare_inputs_for_generation).parameters \
        else "past_key_values"


def hf_assisted_tokens_per_s(model, assistant, prompt: np.ndarray, new_tokens: int,
                             temperature: float = 0.0) -> float:
    """`transformers` assisted generation (greedy, or sampling at `temperature`) of `model` with `assistant`, the
    same draft model (`load_hf`; `transformers`' own defaults).

    Decoding alone: the time of `new_tokens` minus that of one token (both models' prefill).
    """
    import torch

    ids = torch.tensor(prompt[None], dtype=torch.long)

    def timed(n):
        start = time.perf_counter()
        with torch.no_grad(), _transformers_quiet():
            model.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=assistant, max_new_tokens=n,
                           min_new_tokens=n, eos_token_id=None, pad_token_id=0, **hf_decoding(temperature))
        return time.perf_counter() - start

    timed(2)  # warm-up
    for _ in range(3):  # measured again after a busy moment
        # The fastest of three of each: one noisy sample could make the difference tiny or negative.
        decode_s = min(timed(new_tokens) for _ in range(3)) - min(timed(1) for _ in range(3))
        if decode_s > 0:
            return (new_tokens - 1) / decode_s
    raise RuntimeError(f"transformers assisted generation timed {new_tokens} tokens no slower than 1, three times "
                       "(a busy machine?): run the bench again, with more --new-tokens")


def _torch_installed() -> bool:
    """Whether the `transformers` peer can run; says so when it cannot (torch is an optional dependency)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        print("transformers rows skipped: torch is not installed (pip install torch, or pass --no-hf)", flush=True)
        return False
    return True


def _hf_dir(model, scratch: pathlib.Path) -> pathlib.Path:
    """The model's Hugging Face directory, exported to `scratch` if it came from elsewhere."""
    source = pathlib.Path(model.source) if model.source else None
    if source is not None and (source / "config.json").is_file():
        return source
    from convert.hf import export_hf

    return export_hf(scratch, model.cfg, model.params)


def budget_for(context: int, base, fraction: float):
    """`base` with a retrieval budget of `fraction` of the context (whole blocks, at most 4096 tokens)."""
    retrieval = max(base.block_size, min(4096, int(context * fraction)) // base.block_size * base.block_size)
    return dataclasses.replace(base, retrieval_tokens=retrieval)


def prompts_for(target, contexts: list[int], count: int = 1) -> dict[int, list[np.ndarray]]:
    """`count` prompts per context: held-out standard-library documents through the target's tokenizer (the
    longest first, each a different one), else random ids."""
    if target.tokenizer is None:
        rng = np.random.default_rng(0)
        return {c: [rng.integers(0, target.cfg.vocab_size, c) for _ in range(count)] for c in contexts}
    from specpv_jax.demo import heldout_prompts

    return {c: heldout_prompts(target.tokenizer, c, count, option="--prompts") for c in contexts}


def pooled(stats: list[dict]) -> dict:
    """A mode's figures over a context's prompts, from each prompt's `generate` stats: decode tokens/s as all
    decode tokens over all decode time, accepted lengths weighted by the verifications they average over,
    verification counts summed (a mean over no verifications: None)."""
    def mean(key: str, weight: str) -> float | None:
        total = sum(s[weight] for s in stats)
        return sum(s[key] * s[weight] for s in stats) / total if total else None

    return dict(tokens_per_s=sum(s["tokens_per_s"] * s["time_s"] for s in stats) / sum(s["time_s"] for s in stats),
                accept=mean("mean_accept_len", "steps"),
                accept_full=mean("mean_accept_len_full", "full_verifications"),
                accept_partial=mean("mean_accept_len_partial", "partial_verifications"),
                full=sum(s["full_verifications"] for s in stats),
                partial=sum(s["partial_verifications"] for s in stats))


def _harmonic_mean(speeds: list[float]) -> float:
    """Tokens/s over runs of equal token counts: all the tokens over all the time."""
    return len(speeds) / sum(1 / v for v in speeds)


def write_markdown(rows: list[dict], path: pathlib.Path, title: str) -> None:
    fmt = lambda x, f: format(x, f) if x is not None else "-"  # noqa: E731
    lines = [f"# {title}", "", "| context | mode | tok/s | vs ar | vs hf | accept | accept full | accept partial "
             "| full | partial | fidelity |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['context']} | {r['mode']} | {r['tokens_per_s']:.1f} | {fmt(r.get('vs_ar'), '.2f')} | "
                     f"{fmt(r.get('vs_hf'), '.2f')} | {fmt(r.get('accept'), '.2f')} | "
                     f"{fmt(r.get('accept_full'), '.2f')} | {fmt(r.get('accept_partial'), '.2f')} | "
                     f"{r.get('full', '-')} | {r.get('partial', '-')} | {fmt(r.get('fidelity'), '.3f')} |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, mode in enumerate(dict.fromkeys(r["mode"] for r in rows)):
        pts = [r for r in rows if r["mode"] == mode]
        ctx = [r["context"] for r in pts]
        style = dict(marker="o", label=mode, color=f"C{i}")  # one colour per mode in every panel
        axes[0].plot(ctx, [r["tokens_per_s"] for r in pts], **style)
        if all(r.get("vs_ar") is not None for r in pts):
            axes[1].plot(ctx, [r["vs_ar"] for r in pts], **style)
        if all(r.get("accept") is not None for r in pts) and mode != "ar":
            axes[2].plot(ctx, [r["accept"] for r in pts], **style)
    for ax, ylabel in zip(axes, ("decode tokens/s", "speedup over ar", "mean accepted length")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:  # a bench of `ar` alone has no accepted lengths to plot
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fraction(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {raw!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    from specpv_jax.cli import at_least

    p.add_argument("--target", help="target model directory (default: the bundled demo models)")
    p.add_argument("--draft", help="EAGLE-3 head directory (with --target)")
    p.add_argument("--small-draft", help="small draft model directory for draft/specextend (with --target)")
    p.add_argument("--longspec-draft", help="LongSpec draft directory (with --target)")
    p.add_argument("--longspec-plain-draft", help="LongSpec ablation draft for longspec-plain (with --target)")
    p.add_argument("--contexts", type=at_least(1), nargs="+", help="context lengths (default 2048 4096 8192 16384)")
    p.add_argument("--new-tokens", type=at_least(2), help="new tokens per run, at least 2 (speeds count the tokens "
                   "after the first, which prefill gives; default 64; --quick 32)")
    p.add_argument("--prompts", type=at_least(1), default=1,
                   help="prompts per context, each from a different held-out document (random ids for a target "
                   "without a tokenizer); default 1")
    p.add_argument("--modes", nargs="+", choices=MODES, help=f"default: {' '.join(DEFAULT_MODES)}")
    p.add_argument("--tree", type=int, nargs=3, metavar=("DEPTH", "TOP_K", "NODES"),
                   help="tree shape (default: SpecConfig's)")
    p.add_argument("--spec", action="append", metavar="FIELD=VALUE",
                   help="any other SpecConfig field, for every mode (repeatable), e.g. --spec tree_beam=true "
                   "--spec bounded_draft=true; the retrieval budget comes from --budget-fraction")
    p.add_argument("--budget-fraction", type=_fraction,
                   help="retrieval budget as a fraction of the context (at most 4096 tokens; default 0.25)")
    p.add_argument("--tune", action="store_true",
                   help="pick tree and budget at each context with SpecConfig.tuned (instead of --tree and "
                   "--budget-fraction)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sample at this temperature (seed 0 in each run) instead of decoding greedily; fidelity, "
                   "a greedy measure, is then not measured")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    p.add_argument("--quick", action="store_true", help="1K and 2K contexts, 32 new tokens")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_results"),
                   help="directory for bench.json, bench.md and bench.png")


def run(args) -> list[dict]:
    """Runs the benchmark `args` describe (see `add_arguments`); returns its rows, also written to `args.out`."""
    with tempfile.TemporaryDirectory(prefix="specpv-bench-") as scratch:  # transformers' copies of our models
        return _run(args, pathlib.Path(scratch))


def _run(args, scratch: pathlib.Path) -> list[dict]:
    import jax

    import specpv_jax as sj
    from specpv_jax.sampling import Sampler

    contexts = args.contexts or ([1024, 2048] if args.quick else [2048, 4096, 8192, 16384])
    new_tokens = args.new_tokens or (32 if args.quick else 64)
    modes = args.modes or list(DEFAULT_MODES)
    Sampler.create(args.temperature)  # checks it
    if args.tune and (args.tree or args.budget_fraction is not None):
        raise ValueError("--tune picks the tree and the retrieval budget itself: leave out --tree and "
                         "--budget-fraction, or --tune")
    from specpv_jax.cli import parse_spec

    fixed = {"retrieval_tokens": "--budget-fraction", **{name: "--tree" for name in TREE_FIELDS}}
    for item in args.spec or ():
        name = item.partition("=")[0].strip().replace("-", "_")
        if name in fixed:
            raise ValueError(f"--spec {item!r}: the bench sets {name} from "
                             f"{'--tune' if args.tune else fixed[name]}")
    base = parse_spec(args.spec, **dict(zip(TREE_FIELDS, args.tree or ())))
    given = [option for option in DRAFT_OPTIONS.values() if getattr(args, option.lstrip("-").replace("-", "_"))]
    if given and not args.target:
        raise ValueError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --target (without it the "
                         f"bench runs the bundled demo models)")
    blocking = next((p for p in (args.out, *args.out.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ValueError(f"--out {args.out}: {blocking} is a file; results go into a directory")
    if args.target:  # what can be checked without the weights is, before they load
        from specpv_jax import loading
        from specpv_jax.cli import _model_config

        paths = {kind: getattr(args, option.lstrip("-").replace("-", "_")) for kind, option in DRAFT_OPTIONS.items()}
        target_cfg = _model_config(args.target)
        _check_runs(modes, {kind for kind, path in paths.items() if path}, args, contexts, new_tokens,
                    target_cfg.max_position_embeddings)
        _check_specs(modes, base, target_cfg, {kind: loading.draft_config(path, target_cfg)
                                               for kind, path in paths.items() if path})
        target = sj.load_target(args.target)
        drafts = {kind: sj.load_draft(path, target) for kind, path in paths.items() if path}
    else:
        models = sj.demo_models()
        target = models.target
        drafts = {"eagle3": models.eagle3, "small": models.small_draft, "longspec": models.longspec,
                  "longspec_plain": models.longspec_plain}
        _check_specs(modes, base, target.cfg, {kind: draft.cfg for kind, draft in drafts.items()})
    if args.target and not args.modes:
        skipped = [m for m in modes if m != "ar" and draft_kind(m) not in drafts]
        if skipped:
            print("not run, no draft given for them: "
                  + ", ".join(f"{m} ({DRAFT_OPTIONS[draft_kind(m)]})" for m in skipped))
        modes = [m for m in modes if m not in skipped]
    modes = ["ar", *(m for m in modes if m != "ar")]  # ar first, always: the others' speeds are ratios to it
    _check_runs(modes, {kind for kind, draft in drafts.items() if draft is not None}, args, contexts, new_tokens,
                target.cfg.max_position_embeddings)
    prompts = prompts_for(target, contexts, args.prompts)
    hf_model = None if args.no_hf or not _torch_installed() else load_hf(_hf_dir(target, scratch / "target"))
    assistant = load_hf(_hf_dir(drafts["small"], scratch / "small_draft")) if hf_model is not None and \
        "small" in drafts and any(m in SMALL_DRAFT_MODES for m in modes) else None

    device = jax.devices()[0].device_kind
    title = (f"{target.cfg.arch} {target.cfg.num_layers} layers x {target.cfg.hidden_size} on {device}, "
             f"{new_tokens} new tokens" + (f", {args.prompts} prompts per context" if args.prompts > 1 else "")
             + (f", sampling at temperature {args.temperature:g}" if args.temperature else ""))
    if hf_model is not None:  # the peer's speed on a CPU follows its threads
        import torch

        title += f"; transformers: torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(title)
    rows, width = [], max(len(m) for m in [*modes, "hf-assisted"])
    results = functools.partial(write_results, args.out, title=title, device=device, contexts=contexts,
                                new_tokens=new_tokens, modes=modes, prompts=args.prompts)
    results(rows)  # no stale results if the first context fails
    for context in contexts:
        if args.tune:  # on the bench's first prompt: random ids would draft and retrieve unlike real text
            print(f"tuning at context {context}")
            spec = sj.SpecConfig.tuned(target, drafts["eagle3"], prompts[context][0], base=base, verbose=True)
        else:
            spec = budget_for(context, base, 0.25 if args.budget_fraction is None else args.budget_fraction)
        runs = []  # per prompt: ({mode: its fastest output}, {peer: its best tokens/s})
        for prompt in prompts[context]:
            peers = {} if hf_model is None else {
                "transformers": hf_decode_timer(hf_model, prompt, new_tokens, args.temperature)}
            runs.append(fastest_runs(target, drafts, prompt, new_tokens, modes, spec, peers, args.temperature))
        hf = None if hf_model is None else _harmonic_mean([speeds["transformers"] for _, speeds in runs])
        ar_speed = None
        for mode in modes:
            run_as, mode_spec = generate_mode(mode, spec)
            outs = [best[mode] for best, _ in runs]
            figures = pooled([out.stats for out in outs])
            speed = figures.pop("tokens_per_s")
            ar_speed = speed if mode == "ar" else ar_speed
            fidelity = None if args.temperature else float(np.mean(
                [sj.fidelity(target, prompt, out) for prompt, out in zip(prompts[context], outs)]))
            row = dict(context=context, mode=mode, tokens_per_s=speed, vs_ar=speed / ar_speed,
                       vs_hf=speed / hf if hf else None, **figures, fidelity=fidelity,
                       retrieval_tokens=mode_spec.retrieval_tokens if run_as in config.PARTIAL_MODES else None,
                       tree=None if mode == "ar" else [getattr(mode_spec, name) for name in TREE_FIELDS],
                       spec=dataclasses.asdict(mode_spec))
            rows.append(row)
            vs_hf = f"x{row['vs_hf']:.2f} vs hf  " if row["vs_hf"] is not None else ""
            print(f"{context:>7} {mode:>{width}} {row['tokens_per_s']:>8.1f} tok/s  x{row['vs_ar']:.2f} vs ar  {vs_hf}"
                  f"accept {row['accept']:.2f}" + (f"  fidelity {fidelity:.3f}" if fidelity is not None else ""),
                  flush=True)
        if hf:
            rows.append(dict(context=context, mode="transformers", tokens_per_s=hf,
                             vs_ar=hf / ar_speed))
            print(f"{context:>7} {'hf':>{width}} {hf:>8.1f} tok/s  x{hf / ar_speed:.2f} vs ar  (transformers "
                  f"{'sampling' if args.temperature else 'greedy'})", flush=True)
        if assistant is not None:
            assisted = _harmonic_mean([hf_assisted_tokens_per_s(hf_model, assistant, prompt, new_tokens,
                                                                args.temperature) for prompt in prompts[context]])
            rows.append(dict(context=context, mode="transformers-assisted", tokens_per_s=assisted,
                             vs_ar=assisted / ar_speed, vs_hf=assisted / hf))
            print(f"{context:>7} {'hf-assisted':>{width}} {assisted:>8.1f} tok/s  x{assisted / ar_speed:.2f} vs ar  "
                  f"x{assisted / hf:.2f} vs hf", flush=True)
        results(rows)  # a later failure keeps these
    print(f"wrote {args.out / 'bench.json'}, bench.md, bench.png")
    return rows


def _check_specs(modes: list[str], base, target_cfg, draft_cfgs: dict) -> None:
    """Refuses, before anything runs, a mode whose settings `generate` would refuse (a tree wider than the
    draft's vocabulary, a window shorter than the tree's path, ...); modes without their draft are skipped
    (`_check_runs` says so)."""
    from specpv_jax.generate import check_mode_and_draft

    for m in modes:
        name, spec = generate_mode(m, base)
        if name == "ar" or draft_kind(m) in draft_cfgs:
            check_mode_and_draft(target_cfg, name, draft_cfgs.get(draft_kind(m)), spec)


def _check_runs(modes: list[str], drafts: set[str], args, contexts: list[int], new_tokens: int,
                max_positions: int) -> None:
    """Refuses contexts past the target's positions and modes whose draft (a kind in `drafts`) is missing."""
    too_long = [c for c in contexts if c + new_tokens > max_positions]
    if too_long:
        raise ValueError(f"--contexts {' '.join(map(str, too_long))} plus {new_tokens} new tokens exceed the "
                         f"model's max_position_embeddings ({max_positions})")
    for m in modes:
        if m != "ar" and draft_kind(m) not in drafts and (args.modes or not args.target):
            raise ValueError(f"mode {m} needs {DRAFT_OPTIONS[draft_kind(m)]}"
                             + (" with --target" if args.target else " (missing from the demo assets)"))
    if args.tune and "eagle3" not in drafts:
        raise ValueError("--tune picks a tree for the EAGLE-3 modes: it needs --draft")


def write_results(out: pathlib.Path, rows: list[dict], title: str, device: str, contexts: list[int],
                  new_tokens: int, modes: list[str], prompts: int = 1) -> None:
    """bench.json, bench.md and bench.png in `out` for the rows so far; bench.json's "contexts" are those
    measured, "pending" the rest (empty when the bench finished); "prompts": per context."""
    out.mkdir(parents=True, exist_ok=True)
    done = list(dict.fromkeys(r["context"] for r in rows))
    (out / "bench.json").write_text(json.dumps(
        {"device": device, "title": title, "contexts": done, "pending": [c for c in contexts if c not in done],
         "new_tokens": new_tokens, "prompts": prompts, "modes": modes, "rows": rows}, indent=2))
    write_markdown(rows, out / "bench.md", title)
    plot(rows, out / "bench.png", title)
