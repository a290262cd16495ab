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
    """All zeros: a batched dot of two broadcasts (NaN from jaxlib 0.10.2-0.11.x's YNNPACK fusions at this size)."""
    p = jnp.broadcast_to(s.max(-1, keepdims=True), s.shape)
    return jnp.einsum("bhms,bhsd->bhmd", p, jnp.zeros((2, 2, 512, 16), jnp.float32))


def run(code: str, *args: str, **env) -> subprocess.CompletedProcess:
    """A fresh Python on the CPU backend running `code` (or `-m` `args`) with `env`, neither variable set unless
    given."""
    environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.KEEP_ENV)}
    command = ["-m", *args] if args else ["-c", code]
    done = subprocess.run([sys.executable, "-W", "always", *command],
                          env={**environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **env},
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("version, environ, accelerator, want", [
    ("0.10.2", {}, False, True),
    ("0.11.2", {"XLA_FLAGS": "--xla_backend_optimization_level=0"}, False, True),
    ("0.11.3.dev20261201", {xla_cpu.KEEP_ENV: "0"}, False, True),
    ("0.11.2.dev20260101+cuda", {}, False, True),
    ("0.10.1", {}, False, False),  # correct there: the regressions came with 0.10.2
    ("0.12.0", {}, False, False),  # not known to have it or the bug
    ("0.10.2", {xla_cpu.KEEP_ENV: "1"}, False, False),
    ("0.10.2", {xla_cpu.KEEP_ENV: " True"}, False, False),
    ("0.10.2", {xla_cpu.KEEP_ENV: "off"}, False, True),
    ("0.10.2", {"XLA_FLAGS": f"--{xla_cpu.FLAG}=LIBRARY_FUSION_TYPE_REDUCE"}, False, False),  # the caller's choice
    ("0.11.2", {}, True, False),  # a GPU or TPU runtime installed: JAX defaults to it
    ("0.11.2", {"JAX_PLATFORMS": "cpu"}, True, True),
    ("0.11.2", {"JAX_PLATFORMS": "cuda,cpu"}, True, False),
    ("0.10.2", {"JAX_PLATFORMS": "tpu"}, False, False),
])
def test_which_jaxlibs_and_environments_get_the_flag(version, environ, accelerator, want):
    assert xla_cpu.needed(version, environ, accelerator) is want


def test_every_jaxlib_pyproject_allows_gets_the_flag_on_a_cpu():
    """pyproject's jax range lies inside the affected one (widen both together)."""
    assert xla_cpu.needed(jaxlib.__version__, {}, accelerator=False)
    assert '"jax>=0.10.2,<0.12"' in open(os.path.join(ROOT, "pyproject.toml")).read()


ON_CPU = not xla_cpu.accelerator_installed()


def test_this_suite_runs_without_the_fusions():
    """Test modules import specpv_jax before JAX starts (conftest too): on a CPU machine the flag is set (not
    on a GPU or TPU one); the repro is exact."""
    assert (NO_YNN in os.environ.get("XLA_FLAGS", "").split()) is ON_CPU
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


BUILD = """
from specpv_jax.demo import DEMO_CONFIG
specpv_jax.make_generate_fn(DEMO_CONFIG, max_new_tokens=4)
"""


def test_import_after_jax_started_on_a_cpu_warns_once():
    done = run(REPRO.format(before="import jax; jax.devices()") + BUILD)
    assert "SpecPVWarning: JAX started before specpv_jax was imported" in done.stderr, done.stderr
    assert done.stderr.count("SpecPVWarning") == 1 and "flags ''" in done.stdout


def test_a_machine_with_a_gpu_or_tpu_runtime_is_left_alone_and_warned_when_jax_falls_back_to_the_cpu(tmp_path):
    """JAX defaults to the accelerator there, whose runtime is an XLA build of its own that reads XLA_FLAGS; where
    none is found JAX runs on the CPU, fusions on: the first run says so."""
    (tmp_path / "jax_plugins").mkdir()  # what a CUDA or ROCm plugin installs (here with no plugin in it)
    done = run(REPRO.format(before=""), JAX_PLATFORMS="", PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    assert "flags ''" in done.stdout and "SpecPVWarning" not in done.stderr
    done = run(REPRO.format(before="") + BUILD, JAX_PLATFORMS="", PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    assert "SpecPVWarning: JAX runs on the CPU, a GPU or TPU runtime installed" in done.stderr, done.stderr
    assert "JAX_PLATFORMS=cpu" in done.stderr


def test_the_caller_can_keep_the_fusions():
    done = run(REPRO.format(before="import jax; jax.devices()") + BUILD, **{xla_cpu.KEEP_ENV: "1"})
    assert "flags ''" in done.stdout and "SpecPVWarning" not in done.stderr


def test_the_offloaded_prefill_of_one_chunk_stays_exact_with_the_fusions_kept():
    """Its chunk start is opaque to XLA (model.forward_by_layer): known, it compiled to the NaN repro's dot."""
    run("", "pytest", "-q", "-p", "no:cacheprovider",
        "tests/test_offload.py::test_offloaded_prefill_runs_a_layer_at_a_time_with_the_same_results[512-1]",
        **{xla_cpu.KEEP_ENV: "1"})
