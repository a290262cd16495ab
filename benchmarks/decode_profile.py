"""Where an AR decode step's time goes: wall time per token against the device's kernel time (profiler trace).

    python benchmarks/decode_profile.py [--layers 32 8] [--out profile.json]   # on a GPU or TPU
    python benchmarks/decode_profile.py --quick                                # CPU smoke run: wall times only

At Llama-3.1-8B shapes (random bf16 weights), for each layer count, times our
AR decode loop per token from a cache of `--context` tokens (as `scale.py`
does), then traces one more call with `jax.profiler` and reads the device's
kernels off the trace:
  busy      time during which the device runs something (the union of its
            kernels' and copies' intervals), per token, against the traced
            call's wall time: the rest the device waits (launch gaps, host
            round trips of the loops);
  kernels   the kernels' summed time and their count per token (launches; memory
            copies counted apart), and those taking the most time;
  floor     (weights + valid K/V bytes) / copy bandwidth, the least a step costs.
Two layer counts split a step into a per-layer cost (the slope) and the rest
(embedding, final norm, lm_head, sampling, the loop). scale.py measured the
AR step at 2.6-4x its floor on the H200 (BENCHMARKS.md); this says which part.
Variants of the same loop, compiled and timed side by side at the most layers
(`--variants`), try what could close the gap:
  while_graphs  XLA's command buffers (CUDA graphs) for loops too: XLA's
                default command types plus WHILE, as this compilation's
                option (instead of a launch per kernel of each layer);
  unrolled      the model's layer loop unrolled while tracing (no loop over
                layers on the device; compile time grows with depth).
Each row also counts the while loops and instructions in its compiled program.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several models in turn: free memory between
# XLA runs its command buffers (CUDA graphs) op by op while a profiler traces, unless told otherwise: without
# this the traced call would not run as the timed ones do.
PROFILE_GRAPHS = "--xla_enable_command_buffers_during_profiling=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {PROFILE_GRAPHS}".strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
from attention_kernels import copy_bandwidth  # noqa: E402
from scale import (DTYPE, QUICK_SHAPES, ar_decoder, random_cache, read_bytes_per_ar_step,  # noqa: E402
                   seconds_per_token)

from specpv_jax import model as M  # noqa: E402
from specpv_jax import presets  # noqa: E402
from specpv_jax.attention import resolve_implementation  # noqa: E402
from specpv_jax.config import ModelConfig  # noqa: E402

TOP = 12  # kernels listed per row
VARIANTS = ("default", "while_graphs", "unrolled")
# XLA's default command buffer types where its default options cannot be read (jaxlib 0.10.2's list)
DEFAULT_COMMAND_BUFFER = ("FUSION", "CUBLAS", "CUBLASLT", "CUSTOM_CALL", "CUDNN", "DYNAMIC_SLICE_FUSION",
                          "CONDITIONAL")


def default_command_buffer() -> tuple[str, ...]:
    """The command types XLA puts in command buffers by default, read off this jaxlib's default options."""
    try:
        from jax._src.lib import _jax  # private: a benchmark's only way to read XLA's defaults

        options = _jax.CompileOptions()  # held while read: its parts point into it
        build = options.executable_build_options
        text = str(build.debug_options)
    except Exception:  # noqa: BLE001 - another jaxlib: the list known from 0.10.2
        return DEFAULT_COMMAND_BUFFER
    found = tuple(line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("xla_gpu_enable_command_buffer:"))
    return found or DEFAULT_COMMAND_BUFFER


def compiler_options(variant: str) -> dict | None:
    """The XLA options a variant compiles with (None: XLA's defaults)."""
    if variant != "while_graphs":
        return None
    kinds = [k for k in default_command_buffer() if k != "WHILE"] + ["WHILE"]
    return {"xla_gpu_enable_command_buffer": ",".join(kinds)}


@contextlib.contextmanager
def traced_as(variant: str):
    """Inside: the model traces as `variant` asks (its layer loop unrolled for "unrolled"). Trace caches are
    cleared on the way in and out, so that no loop traced one way is compiled as the other."""
    if variant != "unrolled":
        yield
        return
    looped = M.lax
    jax.clear_caches()
    M.lax = _UnrolledScan(looped)
    try:
        yield
    finally:
        M.lax = looped
        jax.clear_caches()


class _UnrolledScan:
    """Stands in for `lax` in `specpv_jax.model`, every `scan` (the layer loop) fully unrolled."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    def scan(self, *args, **kwargs):
        return self._module.scan(*args, **kwargs, unroll=True)


def device_events(trace_dir: Path) -> tuple[list[tuple[str, int, int]], list[str]]:
    """(name, start ns, duration ns) of everything the first accelerator ran in the trace written under
    `trace_dir` (a GPU's stream lines: kernels and memory copies; a TPU's "XLA Ops" line), and the names of
    that device's lines (to read what a trace holds). ([], []) where there is no accelerator plane: a CPU's
    trace, or a profiler that could not trace the device."""
    files = sorted(trace_dir.rglob("*.xplane.pb"))
    if not files:
        return [], []
    for plane in jax.profiler.ProfileData.from_file(str(files[-1])).planes:
        if plane.name.startswith("/device:"):
            lines = list(plane.lines)
            ran = [line for line in lines if line.name.startswith("Stream")] or \
                [line for line in lines if line.name == "XLA Ops"]
            return [(e.name, e.start_ns, e.duration_ns) for line in ran for e in line.events], \
                [line.name for line in lines]
    return [], []


def is_copy(name: str) -> bool:
    """A memory copy or set (on a GPU's streams beside the kernels; e.g. a loop's test read by the host)."""
    return name.startswith(("Memcpy", "Memset"))


def busy_ns(events: list[tuple[str, int, int]]) -> int:
    """Time during which at least one event runs: the length of the union of their intervals."""
    total, end = 0, None
    for _, start, duration in sorted(events, key=lambda k: k[1]):
        stop = start + duration
        if end is None or stop > end:
            total += stop - (start if end is None else max(start, end))
            end = stop
    return total


def profile(params, cfg: ModelConfig, variant: str, context: int, impl: str, tokens: int, trials: int,
            copy_bps: float) -> dict:
    """One row: a variant at one layer count: wall, busy and kernel seconds per token, launches per token, the
    loops compiled, floor, and the kernels taking the most time."""
    cache = random_cache(cfg, context, context + (trials + 2) * tokens)
    with traced_as(variant):
        decode, compiled = ar_decoder(params, cfg, cache, impl, tokens, compiler_options(variant))
    wall, hlo = seconds_per_token(decode, trials), compiled.as_text()
    events, lines, steps, traced = [], [], 1, None
    try:
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir):
                steps, traced = decode(trials + 1)
            events, lines = device_events(Path(trace_dir))
    except Exception as e:  # noqa: BLE001 - the wall times stand without a trace
        print(f"no trace of {variant} at {cfg.num_layers} layers: {type(e).__name__}: {e}", flush=True)
    kernels = [e for e in events if not is_copy(e[0])]
    copies = [e for e in events if is_copy(e[0])]
    row = dict(variant=variant, layers=cfg.num_layers, context=context, attention=impl, wall_s=wall,
               loops=hlo.count(" while("), instructions=hlo.count(" = "),
               floor_s=read_bytes_per_ar_step(params, cfg, context) / copy_bps,
               traced_wall_s=None if traced is None else traced / steps, busy_s=None, kernel_s=None,
               launches=None, copies=len(copies) / steps, trace_lines=lines, top=[])
    if kernels:
        by_name = collections.defaultdict(list)
        for name, _, duration in kernels:
            by_name[name].append(duration)
        total = sum(d for _, _, d in kernels)
        row.update(busy_s=busy_ns(events) / steps / 1e9, kernel_s=total / steps / 1e9,
                   launches=len(kernels) / steps,
                   top=[dict(name=name[:120], calls_per_token=len(ds) / steps, us_per_call=sum(ds) / len(ds) / 1e3,
                             share=sum(ds) / total)
                        for name, ds in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:TOP]])
    return row


def summarize(copy_bps: float, rows: list[dict]) -> str:
    ms = lambda s: "-" if s is None else f"{s * 1e3:.2f}"  # noqa: E731
    ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}"  # noqa: E731
    lines = [f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
             f"copy bandwidth {copy_bps / 1e9:.0f} GB/s; ms per token (traced: the profiled call's wall time)",
             f"{'variant':>12} {'layers':>6} {'context':>7} {'attn':>6} {'loops':>5} {'instrs':>6} {'wall':>7} "
             f"{'traced':>7} {'busy':>7} {'kernels':>7} {'launches':>8} {'copies':>6} {'floor':>7} "
             f"{'wall/floor':>10} {'busy/floor':>10} {'vs default':>10}"]
    default = {r["layers"]: r for r in rows if r["variant"] == "default"}
    for r in rows:
        launches = "-" if r["launches"] is None else f"{r['launches']:.0f}"
        same = default.get(r["layers"])
        lines.append(f"{r['variant']:>12} {r['layers']:>6} {r['context']:>7} {r['attention']:>6} {r['loops']:>5} "
                     f"{r['instructions']:>6} {ms(r['wall_s']):>7} {ms(r['traced_wall_s']):>7} {ms(r['busy_s']):>7} "
                     f"{ms(r['kernel_s']):>7} {launches:>8} {r['copies']:>6.0f} {ms(r['floor_s']):>7} "
                     f"{ratio(r['wall_s'], r['floor_s']):>10} {ratio(r['busy_s'], r['floor_s']):>10} "
                     f"{ratio(r['wall_s'], same and same['wall_s']):>10}")
    if len(default) >= 2:
        a, b = default[max(default)], default[min(default)]
        per_layer = {k: None if a[k] is None else (a[k] - b[k]) / (a["layers"] - b["layers"])
                     for k in ("wall_s", "busy_s", "floor_s")}
        rest = {k: None if a[k] is None else a[k] - a["layers"] * per_layer[k] for k in per_layer}
        # a layer costing more than the smaller run's whole step: the two runs' noise, not a negative time
        fit = lambda s: "noise" if s is not None and s < 0 else ms(s)  # noqa: E731
        for what, figures in (("per layer", per_layer), ("the rest", rest)):
            lines.append(f"{what} (default): wall {fit(figures['wall_s'])}, busy {fit(figures['busy_s'])}, "
                         f"floor {fit(figures['floor_s'])}")
    for r in rows:
        if r["trace_lines"]:
            lines.append(f"device lines traced ({r['variant']}, {r['layers']} layers): {', '.join(r['trace_lines'])}")
        if r["top"]:
            lines.append(f"kernels taking the most time ({r['variant']}, {r['layers']} layers; us per call, calls "
                         "per token, share of kernel time):")
            lines += [f"  {k['us_per_call']:9.1f} {k['calls_per_token']:6.1f} {k['share']:6.1%}  {k['name'][:90]}"
                      for k in r["top"]]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b", choices=sorted(presets.HF_CONFIGS))
    parser.add_argument("--layers", type=int, nargs="+", default=[32, 8],
                        help="layer counts (two or more also give the default's cost per layer); variants other "
                             "than default run at the most")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="compiled variants of the loop, timed side by side")
    parser.add_argument("--context", type=int, default=1024, help="valid cache tokens")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per timed call")
    parser.add_argument("--attention", choices=["xla", "pallas"], help="default: pallas on GPU, xla elsewhere")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: layers 2 and 1, small shapes")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here (after each row)")
    args = parser.parse_args(argv)
    hf_config, trials = presets.hf_config(args.model), 3
    if args.quick:
        hf_config.update(QUICK_SHAPES)
        args.layers, args.context, args.tokens, trials = [2, 1], 256, 4, 2
    impl = args.attention or resolve_implementation("auto")
    copy_bps = copy_bandwidth(64 << 20 if args.quick else 1 << 30, dict(warmup=2, trials=5, reps=10))
    layers = sorted(set(args.layers), reverse=True)
    # the variants at the most layers first (the default leading), then the default at the other layer counts
    plan = [(v, layers[0]) for v in VARIANTS if v in args.variants] + [("default", n) for n in layers[1:]]
    meta = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(), jax=jax.__version__,
                model=args.model, dtype=str(DTYPE.dtype), quick=args.quick, xla_flags=os.environ.get("XLA_FLAGS", ""),
                while_graphs_options=compiler_options("while_graphs"))
    print(f"settings: {meta}", flush=True)
    rows, params, params_layers = [], None, None
    for variant, n in plan:
        cfg = ModelConfig.from_hf({**hf_config, "num_hidden_layers": n})
        if params_layers != n:  # the variants share one set of weights
            params = None
            gc.collect()
            params, params_layers = M.init_params(cfg, jax.random.key(0), DTYPE), n
        try:
            rows.append(profile(params, cfg, variant, args.context, impl, args.tokens, trials, copy_bps))
        except Exception as e:  # noqa: BLE001 - one variant failing (an option this XLA lacks) leaves the others
            print(f"{variant} at {n} layers failed: {type(e).__name__}: {str(e)[:500]}", flush=True)
            continue
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "top"}), flush=True)
        if args.out:
            args.out.write_text(json.dumps(dict(meta=meta, copy_gbps=copy_bps / 1e9, rows=rows), indent=2))
        gc.collect()
    print(summarize(copy_bps, rows))
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
