"""`import specpv_jax` turns off XLA:CPU's YNNPACK fusions, which compute NaN and wrong values in the jaxlib
versions this package allows (specpv_jax/xla_cpu.py), unless JAX started first (then it warns on a CPU) or
the caller keeps them."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest

from specpv_jax import xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_YNN = f"--{xla_cpu.FLAG}="


def broadcast_dot(s):
    """All zeros: a batched dot of two broadcasts (NaN from jaxlib 0.10.2's YNNPACK reduce fusion at this size)."""
    p = jnp.broadcast_to(s.max(-1, keepdims=True), s.shape)
    return jnp.einsum("bhms,bhsd->bhmd", p, jnp.zeros((2, 2, 512, 16), jnp.float32))


def run(code: str, *args: str, **env) -> subprocess.CompletedProcess:
    """A fresh Python running `code` (or `-m` `args`) with `env` and neither variable set unless given."""
    environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.KEEP_ENV)}
    command = ["-m", *args] if args else ["-c", code]
    done = subprocess.run([sys.executable, "-W", "always", *command], env={**environ, "PYTHONPATH": ROOT, **env},
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("version, environ, want", [
    ("0.10.2", {}, True),
    ("0.11.2", {"XLA_FLAGS": "--xla_backend_optimization_level=0"}, True),
    ("0.11.3.dev20261201", {xla_cpu.KEEP_ENV: "0"}, True),
    ("0.10.1", {}, False),  # before YNNPACK fusions: the flag is not needed (and older XLAs abort on it)
    ("0.12.0", {}, False),  # not known to have it or the bug
    ("0.10.2", {xla_cpu.KEEP_ENV: "1"}, False),
    ("0.10.2", {xla_cpu.KEEP_ENV: " True"}, False),
    ("0.10.2", {xla_cpu.KEEP_ENV: "off"}, True),
    ("0.11.2.dev20260101+cuda", {}, True),
    ("0.10.2", {"XLA_FLAGS": f"--{xla_cpu.FLAG}=LIBRARY_FUSION_TYPE_REDUCE"}, False),  # the caller's choice
])
def test_which_jaxlibs_and_environments_get_the_flag(version, environ, want):
    assert xla_cpu.needed(version, environ) is want


def test_every_jaxlib_pyproject_allows_gets_the_flag():
    """pyproject's jax range lies inside the affected one (widen both together)."""
    assert xla_cpu.needed(jaxlib.__version__, {})
    assert '"jax>=0.10.2,<0.12"' in open(os.path.join(ROOT, "pyproject.toml")).read()


def test_this_suite_runs_without_the_fusions():
    """Test modules import specpv_jax before JAX starts (conftest too): the flag is set, the repro exact."""
    assert NO_YNN in os.environ["XLA_FLAGS"].split()
    np.testing.assert_array_equal(np.asarray(jax.jit(broadcast_dot)(np.ones((2, 2, 1024, 512), np.float32))), 0)


REPRO = """
import numpy as np
{before}
import specpv_jax, jax, jax.numpy as jnp
out = jax.jit(lambda s: jnp.einsum("bhms,bhsd->bhmd", jnp.broadcast_to(s.max(-1, keepdims=True), s.shape),
                                   jnp.zeros((2, 2, 512, 16), jnp.float32)))(np.ones((2, 2, 1024, 512), np.float32))
import os
print("nan", int(np.isnan(np.asarray(out)).sum()), "flags", repr(os.environ.get("XLA_FLAGS", "")))
"""


def test_import_before_jax_starts_appends_the_flag_and_the_result_is_exact():
    done = run(REPRO.format(before=""), XLA_FLAGS="--xla_backend_optimization_level=0")
    assert f"flags '--xla_backend_optimization_level=0 {NO_YNN}'" in done.stdout, done.stdout
    assert "nan 0 " in done.stdout, done.stdout
    assert "SpecPVWarning" not in done.stderr


def test_import_after_jax_started_on_a_cpu_warns():
    done = run(REPRO.format(before="import jax; jax.devices()"))
    assert "SpecPVWarning: JAX started before specpv_jax was imported" in done.stderr, done.stderr
    assert "flags ''" in done.stdout


def test_the_caller_can_keep_the_fusions():
    done = run(REPRO.format(before="import jax; jax.devices()"), **{xla_cpu.KEEP_ENV: "1"})
    assert "flags ''" in done.stdout and "SpecPVWarning" not in done.stderr


def test_the_offloaded_prefill_of_one_chunk_stays_exact_with_the_fusions_kept():
    """Its chunk start is opaque to XLA (model.forward_by_layer): known, it compiled to the NaN repro's dot."""
    run("", "pytest", "-q", "-p", "no:cacheprovider",
        "tests/test_offload.py::test_offloaded_prefill_runs_a_layer_at_a_time_with_the_same_results[512-1]",
        **{xla_cpu.KEEP_ENV: "1"})
