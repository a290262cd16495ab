"""Per-step costs at real model shapes: AR decode, full and partial verification, offload, vs transformers.

Random bf16 weights of a preset model (default Llama-3.1-8B), one row:

    python benchmarks/scale.py [--out scale.json]    # GPU: contexts 16K/32K/64K/128K, offload at 64K/128K
    python benchmarks/scale.py --quick               # CPU smoke run: 2 narrow layers, small vocab, short contexts

At each context the caches are filled with random K/V (no prefill), then it times
  ar       our AR decode: `generate`'s jitted while_loop, per token (also at 1K: the partial-verification goal);
  full     one full verification: a 60-node tree (plus root) over the whole cache with retrieval scoring,
           as SpecPV's full step runs it (forward, logits, argmax);
  partial  one partial verification: the same tree over the partial cache (sink + retrieval + window + a nearly
           full buffer, `SpecConfig()` defaults);
  offload  (--offload-contexts) full verification with the cache and block summaries in pinned host memory,
           each layer moved to the device once (as SpecPV's full step reads it; its refresh not run), with the
           last attention implementation measured (on a GPU the Pallas kernel, `generate`'s default there);
  hf       `transformers` AR decode (torch, sdpa, bf16) on the same device, from a `DynamicCache` of the same
           length, per token (its `generate`, as users run it);
and prints floor = (weights read + valid K/V bytes) / copy bandwidth, the least an AR step can cost, and the
device's peak memory after each context (cumulative; contexts run in increasing order).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the device in this process

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from attention_kernels import copy_bandwidth, median_time, random_tree_mask  # noqa: E402

from specpv_jax import model as M  # noqa: E402
from specpv_jax import offload, presets  # noqa: E402
from specpv_jax.bench import hf_cache_keyword  # noqa: E402
from specpv_jax.cache import BlockSummary, KVCache, blocks_spanned  # noqa: E402
from specpv_jax.config import DraftConfig, ModelConfig, SpecConfig  # noqa: E402
from specpv_jax.generate import _ar_decode_fn, _plan  # noqa: E402
from specpv_jax.sampling import Sampler  # noqa: E402

DTYPE = jnp.bfloat16
BASE_CONTEXT = 1024  # the AR step partial verification is compared with
QUICK_SHAPES = dict(num_hidden_layers=2, hidden_size=512, num_attention_heads=4, num_key_value_heads=1, head_dim=128,
                    intermediate_size=1024, vocab_size=4096, bos_token_id=1, eos_token_id=2)


@dataclasses.dataclass(frozen=True)
class Settings:
    ar_tokens: int  # tokens per timed AR decode call
    trials: int  # timed calls (medians reported)
    reps: int  # verification calls per trial
    copy_bytes: int


GPU_SETTINGS = Settings(ar_tokens=32, trials=3, reps=5, copy_bytes=1 << 30)
QUICK_SETTINGS = Settings(ar_tokens=8, trials=2, reps=1, copy_bytes=64 << 20)


@functools.partial(jax.jit, static_argnums=(1,))
def _random_layers(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Random `[L, ...]` values generated a layer at a time (no full-size temporaries)."""
    return jax.lax.map(lambda k: jax.random.normal(k, shape[1:], DTYPE), jax.random.split(key, shape[0]))


def random_cache(cfg: ModelConfig, length: int, slots: int, seed: int = 0) -> KVCache:
    """A one-row cache of `slots` random positions (K/V), the first `length` of them valid."""
    shape = jax.eval_shape(lambda: KVCache.for_model(cfg, 1, slots, DTYPE)).k.shape
    kk, kv = jax.random.split(jax.random.key(seed))
    return KVCache(k=_random_layers(kk, shape), v=_random_layers(kv, shape),
                   length=jnp.full((1,), length, jnp.int32))


def tree_inputs(nodes: int, seed: int = 0):
    """A random tree of `nodes` nodes (root first): tokens `[1, T]`, depths `[1, T]`, mask `[1, T, T]`."""
    mask = random_tree_mask(np.random.default_rng(seed), nodes)
    depth = mask[0].sum(axis=1) - 1  # ancestors, itself excluded
    tokens = np.random.default_rng(seed).integers(0, 1000, (1, nodes))
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(depth[None], jnp.int32), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnums=(1,))
def verify(params, cache, *, tree, summary, cfg, impl):
    """One tree verification over `cache` (SpecPV's full step when `summary` is given, else its partial step):
    returns the argmax `[1, T]`, the cache (tree K/V in its scratch slots) and the retrieval scores."""
    tokens, depth, mask = tree
    score_mask = None if summary is None else jnp.ones(tokens.shape, bool)
    out = M.forward(params, cfg, tokens, cache.length[:, None] + depth, cache, mask,
                    DraftConfig.default_feature_layers(cfg.num_layers), impl, summary, score_mask)
    return jnp.argmax(M.logits(params, cfg, out.hidden), -1), out.cache, out.block_scores


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "impl"))
def verify_offloaded(params, cache, tokens, depth, mask, summary, *, cfg, spec, impl):
    """SpecPV's offloaded full verification, each layer of the host cache moved to the device once: argmax,
    the tree's new K/V, the scores and what the step keeps for its refresh (the refresh itself not run)."""
    keep = offload.keeper(cache.length, spec, blocks_spanned(tokens.shape[1], spec.block_size), cache.max_len)
    out = M.forward(params, cfg, tokens, cache.length[:, None] + depth, cache, mask, (), impl, summary,
                    jnp.ones(tokens.shape, bool), keep=keep)
    return jnp.argmax(M.logits(params, cfg, out.hidden), -1), out.new_kv, out.block_scores, out.kept


def time_donating(step, cache, settings: Settings) -> float:
    """Median seconds of `step(cache)`, whose second output is the (donated) cache, threaded call to call."""
    def call():
        nonlocal cache
        out = step(cache)
        cache = out[1]
        return out
    jax.block_until_ready(call())
    jax.block_until_ready(call())
    times = []
    for _ in range(settings.trials):
        start = time.perf_counter()
        for _ in range(settings.reps):
            out = call()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / settings.reps)
    return statistics.median(times)


def ar_decoder(params, cfg: ModelConfig, cache: KVCache, impl: str, tokens: int, compiler_options=None):
    """Our AR decode loop (`generate`'s jitted while_loop) from `cache`, `tokens` tokens a call, compiled with
    XLA's `compiler_options` (None: its defaults). Returns `decode(seed) -> (tokens decoded, seconds)`, threading
    the (donated) cache from call to call, and the compiled loop."""
    run, _ = _plan(cfg, SpecConfig(), "ar", None, tokens, int(cache.length[0]), 512, impl)
    logits = jnp.zeros((1, cfg.vocab_size), jnp.float32)
    sampler, eos, limit = Sampler.create(), jnp.array([-1], jnp.int32), jnp.asarray(tokens, jnp.int32)
    compiled = _ar_decode_fn(run).lower(params, cache, logits, jax.random.key(0), sampler, eos, limit).compile(
        compiler_options)

    def decode(seed: int) -> tuple[int, float]:
        nonlocal cache
        start = time.perf_counter()
        out, cache = jax.block_until_ready(compiled(params, cache, logits, jax.random.key(seed), sampler, eos, limit))
        return int(out.steps), time.perf_counter() - start
    return decode, compiled


def seconds_per_token(decode, trials: int) -> float:
    """Median over `trials` calls of an `ar_decoder`'s seconds per token, after a call that warms it up."""
    decode(0)
    return statistics.median(seconds / steps for steps, seconds in map(decode, range(1, trials + 1)))


def ar_step_seconds(params, cfg: ModelConfig, cache: KVCache, impl: str, settings: Settings) -> float:
    """Seconds per token of our AR decode loop from `cache` (median over `settings.trials` calls)."""
    return seconds_per_token(ar_decoder(params, cfg, cache, impl, settings.ar_tokens)[0], settings.trials)


def read_bytes_per_ar_step(params, cfg: ModelConfig, context: int) -> int:
    """Bytes an AR step must read: every weight but the input embedding table (one row), plus the valid K/V."""
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    if not cfg.tie_word_embeddings:
        weights -= params["embed_tokens"]["embedding"].nbytes
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * context * cfg.head_dim * jnp.dtype(DTYPE).itemsize
    return weights + kv


def peak_device_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def attempt(results: dict, name: str, fn, *args, **kwargs):
    """Runs one measurement, recording its value or its error (one failure must not lose the rest)."""
    try:
        results[name] = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported and recorded, the run goes on
        traceback.print_exc()
        results[name] = None
        results.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:2000]
    return results[name]


def measure(cfg: ModelConfig, contexts, offload_contexts, impls, settings: Settings,
            peer: TransformersPeer | None) -> tuple[dict, list[dict]]:
    """Every measurement, a context at a time (ours, then the peer's, so a run cut short keeps whole
    contexts); returns (device facts, one row per context and attention implementation)."""
    params = M.init_params(cfg, jax.random.key(0), DTYPE)
    jax.block_until_ready(params)
    facts = dict(copy_gbps=copy_bandwidth(settings.copy_bytes, dict(warmup=2, trials=5, reps=10)) / 1e9,
                 weights_gib=sum(x.nbytes for x in jax.tree.leaves(params)) / 2 ** 30)
    spec = SpecConfig()
    tree = tree_inputs(spec.tree_nodes + 1)
    nodes = tree[0].shape[1]
    slack = (settings.trials + 2) * settings.ar_tokens + nodes
    rows = []
    for context in sorted({*contexts, *offload_contexts, BASE_CONTEXT}):
        for impl in impls:
            row = dict(context=context, attention=impl)
            print(f"context {context}, attention {impl}", flush=True)
            if context in contexts or context == BASE_CONTEXT:
                attempt(row, "ar_s", ar_step_seconds, params, cfg, random_cache(cfg, context, context + slack), impl,
                        settings)
                row["floor_s"] = read_bytes_per_ar_step(params, cfg, context) / (facts["copy_gbps"] * 1e9)
            if context in contexts:
                cache = random_cache(cfg, context, context + nodes)
                summary = BlockSummary.of(cache, spec.block_size)
                full = functools.partial(verify, params, tree=tree, summary=summary, cfg=cfg, impl=impl)
                attempt(row, "full_s", time_donating, full, cache, settings)
                del summary
                if context > spec.partial_threshold:
                    # the shape `retrieval.empty_partial` gives, its buffer all but full
                    partial = random_cache(cfg, spec.static_tokens + spec.buffer_size - nodes,
                                           spec.static_tokens + spec.buffer_size, seed=1)
                    step = functools.partial(verify, params, tree=tree, summary=None, cfg=cfg, impl=impl)
                    attempt(row, "partial_s", time_donating, step, partial, settings)
                    del partial
                del cache
            if impl == impls[-1] and context in offload_contexts:  # generate's default attention on a GPU
                attempt(row, "offload_full_s", offloaded_full_seconds, params, cfg, context, tree, spec, impl,
                        settings)
            if impl == impls[0] and peer is not None and context in contexts:
                attempt(row, "hf_s", peer.step_seconds, context, settings)
            row["peak_device_gib"] = (peak_device_bytes() or 0) / 2 ** 30 or None
            gc.collect()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return facts, rows


def offloaded_full_seconds(params, cfg: ModelConfig, context: int, tree, spec: SpecConfig, impl: str,
                           settings: Settings) -> float:
    """Median seconds of one full verification streaming a `context`-token host cache (zeros: timing only)."""
    cache = offload.empty_cache(cfg, 1, context + tree[0].shape[1], DTYPE)
    cache = cache.replace(length=jnp.full((1,), context, jnp.int32))
    summary = offload.empty_summary(cache, spec.block_size)
    fn = functools.partial(verify_offloaded, cfg=cfg, spec=spec, impl=impl)
    return median_time(fn, (params, cache, *tree, summary), warmup=1, trials=settings.trials, reps=settings.reps)


class TransformersPeer:
    """`transformers` greedy generate (sdpa, bf16) of the same model with random weights, on `device`."""

    def __init__(self, hf_config: dict, device: str):
        import torch
        import transformers

        self.torch, self.transformers, self.device = torch, transformers, device
        self.config = transformers.AutoConfig.for_model(**hf_config)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # created in bf16: no fp32 copy of the weights
        try:
            with torch.device(device):
                model = transformers.AutoModelForCausalLM.from_config(self.config, attn_implementation="sdpa")
        finally:
            torch.set_default_dtype(default)
        self.model = model.to(torch.bfloat16).eval()
        self.head_dim = hf_config.get("head_dim") or self.config.hidden_size // self.config.num_attention_heads

    def step_seconds(self, context: int, settings: Settings) -> float:
        """Seconds per token decoding from a `DynamicCache` of `context` random K/V (median of trials)."""
        torch, device = self.torch, self.device
        shape = (1, self.config.num_key_value_heads, context, self.head_dim)
        cache = self.transformers.DynamicCache()
        for layer in range(self.config.num_hidden_layers):
            cache.update(torch.randn(shape, dtype=torch.bfloat16, device=device),
                         torch.randn(shape, dtype=torch.bfloat16, device=device), layer)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        cache_keyword = hf_cache_keyword(self.model)

        def decode(n):
            ids = torch.randint(0, self.config.vocab_size, (1, cache.get_seq_length() + 1), device=device)
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **{cache_keyword: cache},
                                          max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                          pad_token_id=0)
            sync()
            assert out.shape[1] == ids.shape[1] + n
            return (time.perf_counter() - start) / n

        decode(2)
        return statistics.median(decode(settings.ar_tokens) for _ in range(settings.trials))


def summarize(facts: dict, rows: list[dict]) -> str:
    """The results table, with the issue's three goals as ratios per row."""
    base = {r["attention"]: r.get("ar_s") for r in rows if r["context"] == BASE_CONTEXT}
    hf = {r["context"]: r["hf_s"] for r in rows if r.get("hf_s")}
    ms = lambda s: f"{s * 1e3:.2f}" if s else "-"  # noqa: E731
    ratio = lambda a, b: f"{a / b:.2f}" if a and b else "-"  # noqa: E731
    lines = [f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
             f"copy bandwidth {facts['copy_gbps']:.0f} GB/s; weights {facts['weights_gib']:.2f} GiB",
             "ms per step; floor = bytes an AR step reads / copy bandwidth; partial/ar1K = partial verification over "
             f"the AR step at {BASE_CONTEXT} tokens (goal <= 1.5); ar/floor goal <= 1.25; hf/ar goal > 1",
             f"{'context':>8} {'attn':>6} {'ar':>8} {'floor':>8} {'ar/floor':>8} {'full':>8} {'partial':>8} "
             f"{'part/ar1K':>9} {'offload':>8} {'hf':>8} {'hf/ar':>6} {'peak GiB':>8}"]
    for r in rows:
        lines.append(f"{r['context']:>8} {r['attention']:>6} {ms(r.get('ar_s')):>8} {ms(r.get('floor_s')):>8} "
                     f"{ratio(r.get('ar_s'), r.get('floor_s')):>8} {ms(r.get('full_s')):>8} "
                     f"{ms(r.get('partial_s')):>8} {ratio(r.get('partial_s'), base.get(r['attention'])):>9} "
                     f"{ms(r.get('offload_full_s')):>8} {ms(hf.get(r['context'])):>8} "
                     f"{ratio(hf.get(r['context']), r.get('ar_s')):>6} "
                     f"{(r['peak_device_gib'] or 0):>8.1f}")
        for name, error in r.get("errors", {}).items():
            lines.append(f"{'':>8} {name} failed: {error.splitlines()[0][:150]}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b", choices=sorted(presets.HF_CONFIGS))
    parser.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    parser.add_argument("--offload-contexts", type=int, nargs="*", default=[65536, 131072])
    parser.add_argument("--attention", nargs="+", choices=["xla", "pallas"],
                        help="attention implementations to time (default: both on GPU, xla elsewhere)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke run: 2 narrow layers (4 heads of 128), small vocab, contexts 4608/6144, "
                             "offload at 6144")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    hf_config = presets.hf_config(args.model)
    settings = GPU_SETTINGS
    if args.quick:
        hf_config.update(QUICK_SHAPES)
        args.contexts, args.offload_contexts, settings = [4608, 6144], [6144], QUICK_SETTINGS
    cfg = ModelConfig.from_hf(hf_config)
    gpu = jax.default_backend() == "gpu"
    impls = args.attention or (["xla", "pallas"] if gpu else ["xla"])
    peer = None if args.no_hf else TransformersPeer(hf_config, "cuda" if gpu else "cpu")
    facts, rows = measure(cfg, args.contexts, args.offload_contexts, impls, settings, peer)
    print(summarize(facts, rows))
    if args.out:
        meta = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(), jax=jax.__version__,
                    model=args.model, quick=args.quick, dtype=jnp.dtype(DTYPE).name,
                    settings=dataclasses.asdict(settings))
        args.out.write_text(json.dumps(dict(meta=meta, facts=facts, rows=rows), indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
