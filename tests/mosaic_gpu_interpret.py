"""Runs the Mosaic GPU tree-attention kernel on CPU, in JAX's Mosaic GPU interpreter (tests only).

JAX 0.10.2 ships an interpreter for Mosaic GPU kernels (`jax._src.pallas.mosaic_gpu.interpret`,
private and new) that simulates shared memory, TMA copies, barriers and wgmma
on the CPU, checking out-of-bounds reads and filling fresh shared memory with
NaN. It lacks three things the kernel uses; `interpreted()` adds them:

- wgmma with its A operand in registers (the kernel's probabilities) and with a
  transposed B operand (K read as K^T);
- a CPU rule for `layout_cast` (register layouts mean nothing to the interpreter).

Everything here pokes at private JAX internals; if they move, fix it here, not
in the kernel.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import numpy as np
from jax._src import callback
from jax._src.interpreters import mlir
from jax._src.pallas.mosaic.interpret import utils as interpret_utils
from jax._src.pallas.mosaic_gpu import core as mgpu_core
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax._src.pallas.mosaic_gpu.interpret.jaxpr_interpret import JaxprInterpreter
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
from jax._src.state import types as state_types
from jax.experimental.pallas import mosaic_gpu as plgpu


def _read_operand(shared_memory, key, transforms, thread, info):
    """An SMEM operand's value, with a (1, 0) TransposeTransform applied instead of refused."""
    transforms = jax.tree.map(int, gpu_callbacks._remove_noop_transforms(transforms))
    transposed = False
    kept = []
    for t in transforms:
        if type(t).__name__ == "TransposeTransform":
            assert tuple(t.permutation) == (1, 0), t
            transposed = not transposed
        else:
            kept.append(t)
    value, _, _ = shared_memory.get_buffer_content(gpu_callbacks.HostAllocationKey.from_array(key),
                                                   interpret_utils.to_range(kept), thread, logging_info=info)
    return value.T if transposed else value


def _wgmma(*, token, device_id, grid_point_coords, thread_id, acc, acc_transforms, a, a_transforms, b, b_transforms,
           acc_dtype, a_in_registers):
    shared_memory = gpu_callbacks._get_shared_memory()
    thread = shared_memory.get_global_thread_id(int(device_id), int(thread_id))
    info = interpret_utils.GPULoggingInfo(device_id=int(device_id), thread_id=int(thread_id), source_info=None,
                                          grid_point_coords=tuple(int(x) for x in grid_point_coords))
    a = np.asarray(a) if a_in_registers else _read_operand(shared_memory, a, a_transforms, thread, info)
    b = _read_operand(shared_memory, b, b_transforms, thread, info)
    acc_key = gpu_callbacks.HostAllocationKey.from_array(acc)
    acc_range = interpret_utils.to_range(jax.tree.map(int, gpu_callbacks._remove_noop_transforms(acc_transforms)))
    acc, _, _ = shared_memory.get_buffer_content(acc_key, acc_range, thread, logging_info=info)
    result = acc + np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(acc_dtype)
    shared_memory.store_buffer_content(acc_key, acc_range, result, thread, logging_info=info)
    return token


def _interpret_wgmma_ref_p(self, eqn, token, get_invals):
    acc, a, b, *leaves = get_invals()
    empty = jax.tree.structure([])
    acc_t, a_t, b_t = jax.tree.unflatten(jax.tree_util.treedef_tuple(
        [eqn.params[f"{x}_transforms_tree"] or empty for x in ("acc", "a", "b")]), leaves)
    a_in_registers = not isinstance(eqn.invars[1].aval, state_types.AbstractRef)
    return callback.io_callback(
        functools.partial(_wgmma, acc_dtype=eqn.invars[0].aval.dtype, a_in_registers=a_in_registers),
        gpu_callbacks.TOKEN_SHAPE_DTYPE, token=token, device_id=self.device_info.device_id,
        grid_point_coords=self.grid_point_coords, thread_id=self.thread_id, acc=acc, acc_transforms=acc_t,
        a=a, a_transforms=a_t, b=b, b_transforms=b_t, ordered=True), []


@functools.cache
def _install() -> None:
    JaxprInterpreter._interpret_wgmma_ref_p = _interpret_wgmma_ref_p
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
        jax.clear_caches()
