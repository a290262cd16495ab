"""XLA:CPU settings the library needs: jaxlib 0.10.2-0.11.x's YNNPACK fusions off.

From 0.10.2 XLA:CPU hands some dots and reductions to YNNPACK by default, and for some shapes they compute
wrong values: a batched dot of two broadcasts returns NaN (below; the offloaded prefill of a one-chunk prompt
ran into it), sums come out silently wrong (jax-ml/jax#39103), programs crash (jax-ml/jax#39257, #40412).
Every jaxlib this package allows has the NaN (0.10.2 and 0.11.2 checked)::

    def f(s):  # s [2, 2, 1024, 512]; jit(f)(ones) is all NaN, its true value all zeros
        p = jnp.broadcast_to(s.max(-1, keepdims=True), s.shape)
        return jnp.einsum("bhms,bhsd->bhmd", p, jnp.zeros((2, 2, 512, 16), jnp.float32))

`import specpv_jax` therefore adds `--xla_cpu_experimental_ynn_fusion_type=` (no YNNPACK fusion) to XLA_FLAGS
when JAX has not started its backends yet (XLA reads the variable once, then); the fusions' speed on the demo
models is in BENCHMARKS.md ("XLA:CPU's YNNPACK fusions"). Left alone: XLA_FLAGS that already set the flag,
SPECPV_JAX_CPU_YNN=1 (or true, yes, on) in the environment (keep XLA's default), jaxlib versions outside
0.10.2-0.11.x (XLA aborts on a flag it does not know), and machines whose JAX defaults to a GPU or TPU (an
installed plugin or libtpu, unless JAX_PLATFORMS puts the CPU first: their runtimes are XLA builds of their own,
and the CPU backend there runs little). Started too late on a CPU, the library warns; so does the first
`generate` (or `make_generate_fn`) on a CPU where the fusions stayed on (a GPU runtime installed, no GPU).
"""

from __future__ import annotations

import os
import re

FLAG = "xla_cpu_experimental_ynn_fusion_type"
KEEP_ENV = "SPECPV_JAX_CPU_YNN"
AFFECTED = ((0, 10, 2), (0, 12, 0))  # [first, end) jaxlib versions


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def accelerator_installed() -> bool:
    """Whether a GPU or TPU runtime for JAX is installed (a `jax_plugins` package such as CUDA's, or libtpu):
    JAX then defaults to it, and it is a separate XLA build that reads XLA_FLAGS too."""
    import importlib.metadata
    import importlib.util

    return (importlib.util.find_spec("jax_plugins") is not None or importlib.util.find_spec("libtpu") is not None
            or bool(importlib.metadata.entry_points(group="jax_plugins")))


def needed(jaxlib_version: str, environ, accelerator: bool) -> bool:
    """Whether the flag should be added for this jaxlib, environment (XLA_FLAGS, SPECPV_JAX_CPU_YNN,
    JAX_PLATFORMS) and `accelerator_installed()`: where JAX's default backend will be the CPU."""
    keep = environ.get(KEEP_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    affected = AFFECTED[0] <= _version(jaxlib_version) < AFFECTED[1]
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    cpu = platforms.split(",")[0].strip() == "cpu" if platforms else not accelerator
    return affected and cpu and not keep and FLAG not in environ.get("XLA_FLAGS", "")


_warned = False


def _warn_once(why: str, fix: str) -> None:
    global _warned
    if not _warned:
        import jaxlib

        from specpv_jax.warning import warn

        _warned = True
        warn(f"{why}, so XLA:CPU keeps its YNNPACK fusions, which in jaxlib {jaxlib.__version__} compute NaN or "
             f"wrong values for some shapes (specpv_jax/xla_cpu.py). {fix} (or {KEEP_ENV}=1 to keep them and "
             f"silence this)")


def check_backend() -> None:
    """Warns (once) where a run is about to go on the CPU with the fusions on although the caller did not ask
    for them: a GPU or TPU runtime is installed (so `configure` left XLA_FLAGS alone) but JAX fell back to the
    CPU (or JAX started before the import, already warned)."""
    import jax
    import jaxlib

    if not _warned and needed(jaxlib.__version__, os.environ, accelerator=False) and jax.default_backend() == "cpu":
        _warn_once("JAX runs on the CPU, a GPU or TPU runtime installed (the import left XLA_FLAGS alone)",
                   f"Start Python with XLA_FLAGS=--{FLAG}= or JAX_PLATFORMS=cpu")


def configure() -> str:
    """Turns the fusions off where `needed` says so (before JAX's backends start). Returns what it did: "set",
    "not needed", or "late" (JAX already started; warned when its default backend is the CPU)."""
    import jaxlib
    from jax._src import xla_bridge

    if not needed(jaxlib.__version__, os.environ, accelerator_installed()):
        return "not needed"
    if xla_bridge.backends_are_initialized():
        import jax

        if jax.default_backend() == "cpu":
            _warn_once("JAX started before specpv_jax was imported", f"Import specpv_jax before running JAX code, or "
                       f"start Python with XLA_FLAGS=--{FLAG}=")
        return "late"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{FLAG}=".strip()
    return "set"
