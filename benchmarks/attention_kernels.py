"""Tree-attention kernel vs the XLA reference: time and achieved K/V bandwidth.

Llama-3.1-8B attention shapes (Hq 32, Hkv 8, D 128, B 1, bf16) at prefix
4K/16K/64K x tree sizes T 1/16/60, next to the device's copy bandwidth. On a
GPU both GPU kernels run side by side (Triton, and Mosaic GPU on Hopper); a
kernel that fails to compile is reported and skipped.

    python benchmarks/attention_kernels.py [--out results.json]     # on a GPU or TPU
    python benchmarks/attention_kernels.py --quick [--platform tpu]  # CPU smoke run (interpret mode)

Bandwidth = bytes of K/V the attention has to read (valid prefix only) / time.
"xla" is the model's own XLA path (`specpv_jax.attention.attend`: blockwise
online softmax, fp32 statistics), what runs where the kernel does not.
Each contender runs `reps` times in one jitted loop, each call's output the
next call's queries and one cache slot rewritten per call (as a decode step
appends one), so neither host dispatch (about 60 us a call on the H200
machine, more than a kernel over a 16K prefix takes) nor hoisting out of the
loop enters the time; "loop" is the cost of such a loop with no attention in
it, which the table's ratios and bandwidths leave out.
Copy bandwidth = (read + write bytes) / time of an on-device array copy, the
practical ceiling for a memory-bound kernel.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import tree_attention
from specpv_jax.attention import attend

HQ, HKV, D, B = 32, 8, 128, 1
DTYPE = jnp.bfloat16


def median_time(fn, args, *, warmup: int, trials: int, reps: int) -> float:
    """Median over `trials` of the mean wall time of `reps` back-to-back calls (seconds)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / reps)
    return statistics.median(times)


def looped_seconds(attention, args, *, warmup: int, trials: int, reps: int) -> float:
    """Seconds per call of `attention(q, k_cache, v_cache, cache_len, k_tree, v_tree, mask)` (its output, or
    the first of its outputs, shaped like q), run `reps` times in one jitted loop (median over `trials`).

    Each call's output is the next call's q, and each call rewrites one cache slot below cache_len (K and V,
    from the tree's first node), so no call can start before the last ends and nothing that reads the cache
    can be hoisted out of the loop: the time is the attention's, as a decode loop runs it, without dispatch.
    """
    q, k_cache, v_cache, *rest = args

    def body(i, carry, rest):
        q, k_cache, v_cache = carry
        cache_len, k_tree, v_tree, mask = rest
        out = attention(q, k_cache, v_cache, cache_len, k_tree, v_tree, mask)
        out = out[0] if isinstance(out, tuple) else out
        slot = (0, 0, i % k_cache.shape[2], 0)
        return (out.astype(q.dtype), lax.dynamic_update_slice(k_cache, k_tree[:, :, :1], slot),
                lax.dynamic_update_slice(v_cache, v_tree[:, :, :1], slot))

    # The rest are arguments, not constants: a known cache_len would fix the XLA path's loop counts at
    # compile time (a GPU runs such loops without a host round trip per pass), which the model never does.
    loop = jax.jit(lambda q, kc, vc, rest: lax.fori_loop(0, reps, functools.partial(body, rest=rest), (q, kc, vc)),
                   donate_argnums=(1, 2))
    carry = (q, jnp.copy(k_cache), jnp.copy(v_cache))  # donated: the caller's arrays stay valid

    def call():
        nonlocal carry
        carry = loop(*carry, rest)
        return carry
    return median_time(call, (), warmup=warmup, trials=trials, reps=1) / reps


def copy_bandwidth(nbytes: int, timing: dict) -> float:
    """Bytes/s of a jitted on-device copy of an `nbytes` array, counting read + write."""
    x = jnp.zeros(nbytes // 4, jnp.float32)
    t = median_time(jax.jit(jnp.copy), (x,), **timing)
    return 2 * x.nbytes / t


def random_tree_mask(rng, T: int) -> np.ndarray:
    """A random tree over T nodes (parents precede children) as an ancestor mask [1, T, T]."""
    mask = np.eye(T, dtype=bool)
    for i in range(1, T):
        mask[i] |= mask[rng.integers(0, i)]
    return mask[None]


def inputs(prefix: int, T: int, seed: int = 0):
    """Benchmark inputs for a full prefix of `prefix` tokens and a T-node tree."""
    rng = np.random.default_rng(seed)
    kq, kk, kv, kt, kvt = jax.random.split(jax.random.key(seed), 5)
    return (
        jax.random.normal(kq, (B, T, HQ, D), DTYPE),
        jax.random.normal(kk, (B, HKV, prefix, D), DTYPE),
        jax.random.normal(kv, (B, HKV, prefix, D), DTYPE),
        jnp.full((B,), prefix, jnp.int32),
        jax.random.normal(kt, (B, HKV, T, D), DTYPE),
        jax.random.normal(kvt, (B, HKV, T, D), DTYPE),
        jnp.asarray(random_tree_mask(rng, T)),
    )


def kernel_variants(platform: str | None, block_k: int | None, num_splits: int | None) -> dict[str, dict]:
    """Label -> `tree_attention` options of each kernel to time: `platform`'s, or all worth timing here.

    On Hopper both GPU kernels, and the Mosaic GPU one also with 128-key blocks (fewer, larger steps, but a ring
    twice the size, so fewer programs fit on a multiprocessor): its defaults are not tuned on hardware yet.
    """
    tuning = {k: v for k, v in dict(block_k=block_k, num_splits=num_splits).items() if v is not None}
    if platform:
        return {platform: dict(platform=platform, **tuning)}
    if jax.default_backend() == "tpu":
        return {"tpu": dict(platform="tpu", **tuning)}
    variants = {"triton": dict(platform="gpu", **tuning)}
    if getattr(jax.devices()[0], "compute_capability", None) == "9.0":  # Mosaic GPU needs Hopper (wgmma, TMA)
        variants["mosaic_gpu"] = dict(platform="mosaic_gpu", **tuning)
        if block_k is None:
            variants["mosaic_gpu/128"] = dict(platform="mosaic_gpu", block_k=128, **tuning)
    return variants


def run(prefixes, nodes, timing, copy_bytes, variants: dict[str, dict], report=lambda copy_bw, rows: None):
    """Times an empty loop, the XLA path, then each kernel variant, at every (prefix, T).

    One contender at a time over all points, each figure printed as it comes and `report(copy bytes/s, rows)`
    called after each contender: a kernel that hangs, or a run cut short, leaves the figures before it, and one
    that fails at a point is still tried at the others (the Mosaic GPU kernel takes one or two compute
    warpgroups by the tree's size). Returns (copy bytes/s, result rows); a kernel's time is None where it
    failed.
    """
    copy_bw = copy_bandwidth(copy_bytes, timing)
    contenders = {"loop": lambda q, *_: q,
                  "xla": lambda q, kc, vc, n, kt, vt, m: attend(q, kc, vc, n, kt, vt, m, scale=D ** -0.5)}
    contenders.update({label: functools.partial(tree_attention, **options) for label, options in variants.items()})
    points = {(prefix, T): inputs(prefix, T) for prefix in prefixes for T in nodes}
    rows = {point: dict(prefix=point[0], T=point[1], kv_bytes=2 * B * HKV * point[0] * D * jnp.dtype(DTYPE).itemsize)
            for point in points}
    for name, fn in contenders.items():
        last_error = None
        for (prefix, T), args in points.items():
            t = None
            try:
                t = looped_seconds(fn, args, **timing)
            except Exception as e:  # one kernel failing to compile must not lose the others' figures
                error = f"{type(e).__name__}: {e}"
                print(f"{name} failed at prefix {prefix}, T {T}: "
                      + ("the same error" if error == last_error else error[:2000]), flush=True)
                last_error = error
            rows[prefix, T][f"{name}_s"] = t
            print(f"{name:>14} prefix {prefix:>6} T {T:>3}: " + ("-" if t is None else f"{t * 1e6:.1f} us"),
                  flush=True)
        report(copy_bw, list(rows.values()))
    return copy_bw, list(rows.values())


def print_table(copy_bw: float, rows, labels) -> None:
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"copy bandwidth (read+write): {copy_bw / 1e9:.1f} GB/s")
    print(f"shapes: B={B} Hq={HQ} Hkv={HKV} D={D} {jnp.dtype(DTYPE).name}; xla = the model's blockwise XLA "
          "attention; loop = the timing loop alone; mosaic_gpu/128: 128-key blocks; ratios and bandwidths from "
          "net times (time - loop)")
    header = f"{'prefix':>7} {'T':>3} {'kernel':>14} {'kernel us':>10} {'xla us':>10} {'loop us':>10} " \
             f"{'xla/kernel':>10} {'kernel GB/s':>12} {'xla GB/s':>10} {'kernel/copy':>12}"
    print(header)
    print("-" * len(header))

    def us(t):
        return "-" if t is None else f"{t * 1e6:.1f}"

    def ratio(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}"

    for r in rows:
        loop = r.get("loop_s") or 0.0

        def net(t):
            return None if t is None or t <= loop else t - loop

        for label in labels:
            t, xla = r.get(f"{label}_s"), r.get("xla_s")
            print(f"{r['prefix']:>7} {r['T']:>3} {label:>14} {us(t):>10} {us(xla):>10} {us(r.get('loop_s')):>10} "
                  f"{ratio(net(xla), net(t)):>10} {ratio(r['kv_bytes'] / 1e9, net(t)):>12} "
                  f"{ratio(r['kv_bytes'] / 1e9, net(xla)):>10} {ratio(r['kv_bytes'] / copy_bw, net(t)):>12}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small prefixes and few runs (CPU smoke test)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--block-k", type=int, help="kernel keys per inner step (default: the kernel's)")
    parser.add_argument("--num-splits", type=int, help="GPU kernel prefix splits (default: chosen from the shapes)")
    parser.add_argument("--platform", choices=("gpu", "mosaic_gpu", "tpu"),
                        help="which kernel: Triton (gpu), Mosaic GPU (Hopper) or Mosaic (tpu); default: the "
                             "backend's (on Hopper both GPU kernels, Mosaic GPU also with 128-key blocks)")
    args = parser.parse_args(argv)
    if args.quick:
        prefixes, timing, copy_bytes = (512, 1536), dict(warmup=1, trials=3, reps=1), 64 << 20
    else:
        prefixes, timing, copy_bytes = (4096, 16384, 65536), dict(warmup=2, trials=5, reps=100), 1 << 30
    variants = kernel_variants(args.platform, args.block_k, args.num_splits)
    meta = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(), jax=jax.__version__,
                shapes=dict(B=B, Hq=HQ, Hkv=HKV, D=D, dtype=jnp.dtype(DTYPE).name), quick=args.quick,
                kernels=variants, timing=timing)

    def save(copy_bw, rows):  # after each contender: a run cut short keeps what it measured
        if args.out:
            args.out.write_text(json.dumps(dict(meta=meta, copy_gbps=copy_bw / 1e9, rows=rows), indent=2))

    copy_bw, rows = run(prefixes, (1, 16, 60), timing, copy_bytes, variants, save)
    print_table(copy_bw, rows, variants)
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
