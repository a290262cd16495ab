"""Runs the Mosaic GPU tree-attention kernel on CPU, in JAX's Mosaic GPU interpreter (tests only).

JAX (0.10.2 and 0.11) ships an interpreter for Mosaic GPU kernels
(`jax._src.pallas.mosaic_gpu.interpret`, private and new) that simulates shared
memory, TMA copies, barriers and wgmma on the CPU, checking out-of-bounds reads
and filling fresh shared memory with NaN. It lacks what the kernel uses;
`interpreted()` adds it:

- wgmma with its A operand in registers (the kernel's probabilities), and, on
  JAX 0.10.2, with a transposed B operand (K read as K^T);
- a CPU rule for `layout_cast` (register layouts mean nothing to the interpreter);
- one compilation of each simulated thread's program: JAX lowers and compiles
  it again for every thread of every grid point, which made a kernel with a
  memory warpgroup and two compute warpgroups six times slower to interpret.

Everything here pokes at private JAX internals, which differ between 0.10.2
and 0.11; if they move again, fix it here, not in the kernel.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading

import jax
import numpy as np
from jax import core as jax_core
from jax._src import callback
from jax._src.interpreters import mlir
from jax._src.pallas.mosaic.interpret import thread_map
from jax._src.pallas.mosaic.interpret import utils as interpret_utils
from jax._src.pallas.mosaic_gpu import core as mgpu_core
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax._src.pallas.mosaic_gpu.interpret import shared_memory as interpret_memory
from jax._src.pallas.mosaic_gpu.interpret.jaxpr_interpret import JaxprInterpreter
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
from jax._src.state import types as state_types
from jax.experimental.pallas import mosaic_gpu as plgpu

# JAX 0.11 names a simulated thread by (mesh location, thread) and reads transposed views itself.
_JAX_0_11 = "mesh_location" in inspect.signature(gpu_callbacks.wgmma).parameters
_original_wgmma_rule = JaxprInterpreter._interpret_wgmma_ref_p


def _location(interpreter: JaxprInterpreter) -> dict:
    """The simulated thread running `interpreter`, as this JAX version's callbacks take it."""
    if _JAX_0_11:
        return dict(mesh_location=interpreter.mesh_location, thread=interpreter.thread)
    return dict(device_id=interpreter.device_info.device_id, grid_point_coords=interpreter.grid_point_coords,
                thread_id=interpreter.thread_id)


class _SharedMemory:
    """One simulated thread's reads and writes of the interpreter's buffers, over either version's API."""

    def __init__(self, location: dict):
        self.memory = gpu_callbacks._get_shared_memory()
        if _JAX_0_11:
            self.thread = location["thread"]
            self.info = interpret_memory.GPULoggingInfo(location["mesh_location"], self.thread, None)
        else:
            device, thread = int(location["device_id"]), int(location["thread_id"])
            self.thread = self.memory.get_global_thread_id(device, thread)
            self.info = interpret_utils.GPULoggingInfo(
                device_id=device, thread_id=thread, source_info=None,
                grid_point_coords=tuple(int(x) for x in location["grid_point_coords"]))

    def _access(self, key, transforms):
        """(where in the buffer, whether the view is transposed)."""
        transforms = jax.tree.map(int, gpu_callbacks._remove_noop_transforms(transforms))
        if _JAX_0_11:
            return self.memory.access(key, transforms), False
        transposes = [t for t in transforms if type(t).__name__ == "TransposeTransform"]
        assert all(tuple(t.permutation) == (1, 0) for t in transposes), transforms
        kept = [t for t in transforms if t not in transposes]
        return interpret_utils.to_range(kept), len(transposes) % 2 == 1

    def read(self, key_array, transforms) -> np.ndarray:
        key = gpu_callbacks.HostAllocationKey.from_array(key_array)
        where, transposed = self._access(key, transforms)
        value, _, _ = self.memory.get_buffer_content(key, where, self.thread, logging_info=self.info)
        return value.T if transposed else value

    def write(self, key_array, transforms, value) -> None:
        key = gpu_callbacks.HostAllocationKey.from_array(key_array)
        where, transposed = self._access(key, transforms)
        assert not transposed
        self.memory.store_buffer_content(key, where, value, self.thread, logging_info=self.info)


def _wgmma(*, token, location, acc, acc_transforms, a, a_transforms, b, b_transforms, a_in_registers):
    """acc += a @ b, with a read from shared memory or passed in (registers)."""
    memory = _SharedMemory(location)
    a = np.asarray(a) if a_in_registers else memory.read(a, a_transforms)
    b = memory.read(b, b_transforms)
    total = memory.read(acc, acc_transforms)
    memory.write(acc, acc_transforms,
                 total + np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(total.dtype))
    return token


def _interpret_wgmma_ref_p(self, eqn, token, get_invals):
    a_in_registers = not isinstance(eqn.invars[1].aval, state_types.AbstractRef)
    if _JAX_0_11 and not a_in_registers:
        return _original_wgmma_rule(self, eqn, token, get_invals)
    acc, a, b, *leaves = get_invals()
    empty = jax.tree.structure([])
    acc_t, a_t, b_t = jax.tree.unflatten(jax.tree_util.treedef_tuple(
        [eqn.params[f"{x}_transforms_tree"] or empty for x in ("acc", "a", "b")]), leaves)
    return callback.io_callback(
        functools.partial(_wgmma, a_in_registers=a_in_registers), gpu_callbacks.TOKEN_SHAPE_DTYPE, token=token,
        location=_location(self), acc=acc, acc_transforms=acc_t, a=a, a_transforms=a_t, b=b, b_transforms=b_t,
        ordered=True), []


_compiled_threads: dict = {}
_compiling = threading.Lock()


def _evaluate(jaxpr, consts, *args):
    jax_core.eval_jaxpr(jaxpr, consts, *args)


def _run_thread(jaxpr, consts, *args):
    """Runs one simulated thread's program, compiled once per program and argument types."""
    key = (jaxpr, jax.tree.structure((consts, args)), tuple(map(jax.typeof, jax.tree.leaves((consts, args)))))
    with _compiling:  # not jax.jit's own cache: a thread blocked on a barrier would hold it
        if key not in _compiled_threads:
            traced = jax.jit(_evaluate, static_argnums=(0,)).trace(jaxpr, consts, *args)
            _compiled_threads[key] = traced.lower().compile()
        compiled = _compiled_threads[key]
    compiled(consts, *args)


@functools.cache
def _install() -> None:
    JaxprInterpreter._interpret_wgmma_ref_p = _interpret_wgmma_ref_p
    thread_map._run_jaxpr = _run_thread
    mlir.register_lowering(mgpu_core.layout_cast_p, lambda ctx, x, new_layout: [x], platform="cpu")


@contextlib.contextmanager
def interpreted():
    """Within the block, every `plgpu.kernel` runs in the Mosaic GPU interpreter."""
    _install()
    kernel = plgpu.kernel
    plgpu.kernel = lambda *a, **k: kernel(*a, interpret=InterpretGPUParams(), **k)
    jax.clear_caches()  # a trace cached outside the block would hold the compiled kernel
    try:
        yield
    finally:
        plgpu.kernel = kernel
        _compiled_threads.clear()
        jax.clear_caches()
