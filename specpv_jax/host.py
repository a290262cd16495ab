"""The host side of generation: compiled executables kept by argument shapes (`timed_call`), the prefill
progress bar, and the function streamed tokens are delivered to."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import threading
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np


_EXECUTABLES: collections.OrderedDict[Any, Any] = collections.OrderedDict()  # the most recently used last
_EXECUTABLES_LOCK = threading.Lock()  # generate calls from several threads share it
MAX_EXECUTABLES = 32


def stage_factory(make: Callable) -> Callable:
    """Caches `make(run) -> jitted stage` for as many settings as `timed_call` keeps executables: each jitted
    function holds its traces and lowerings (unbounded, a process trying many settings grew by ~15 MB each),
    and with fewer a stage `timed_call` still holds would be rebuilt, a new function, and compiled again."""
    return functools.lru_cache(maxsize=MAX_EXECUTABLES)(make)


try:  # the settings besides the arguments that change what jit compiles (jax's own cache keys on them):
    # config such as `jax.default_matmul_precision`, the mesh context
    from jax._src.config import trace_context as _trace_context
except ImportError:  # a jax without it: the public settings that matter most
    def _trace_context() -> Any:
        return jax.config.jax_default_matmul_precision, jax.config.jax_enable_x64, jax.sharding.get_abstract_mesh()


def timed_call(fn: Callable, *args) -> tuple[Any, float]:
    """Runs a jitted `fn`, compiling ahead of time so the returned seconds exclude compilation.

    Keeps the last `MAX_EXECUTABLES` compiled functions, by argument shapes, dtypes and shardings (and the
    trace context), as jit does.
    """
    if jax.config.jax_disable_jit:  # nothing to compile: `fn` runs op by op (slow; for debugging)
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        return out, time.perf_counter() - start
    leaves, treedef = jax.tree.flatten(args)
    key = (fn, treedef, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves), _trace_context())
    with _EXECUTABLES_LOCK:
        exe = _EXECUTABLES.get(key)
    if exe is None:
        exe = fn.lower(*args).compile()  # outside the lock: another thread may compile the same (rare, harmless)
    with _EXECUTABLES_LOCK:
        _EXECUTABLES[key] = exe
        _EXECUTABLES.move_to_end(key)
        while len(_EXECUTABLES) > MAX_EXECUTABLES:
            _EXECUTABLES.popitem(last=False)
    start = time.perf_counter()
    out = jax.block_until_ready(exe(*args))
    return out, time.perf_counter() - start


class _PrefillBar:
    """The one progress bar of the prefills running now. Their ticks arrive on a runtime thread, with nothing
    saying which call they belong to, so concurrent calls (threads) share a bar counting all their chunks."""

    lock = threading.Lock()
    bar: Any = None
    calls = 0


class prefill_progress:
    """`with prefill_progress(chunks):` shows a progress bar that prefills compiled with
    `run.progress` advance, one chunk at a time (from inside the jitted loop). Calls running at the same
    time add their chunks to one bar."""

    def __init__(self, chunks: int):
        self.chunks = chunks
        self.bar = None

    def __enter__(self):
        from tqdm.auto import tqdm

        with _PrefillBar.lock:
            if _PrefillBar.bar is None:
                _PrefillBar.bar = tqdm(total=self.chunks, desc="prefill", unit="chunk", leave=False)
            else:
                _PrefillBar.bar.total += self.chunks
                widget = getattr(_PrefillBar.bar, "container", None)
                if widget is not None:  # tqdm.notebook's bar widget keeps the total it was created with
                    widget.children[1].max = _PrefillBar.bar.total
                _PrefillBar.bar.refresh()
            self.bar = _PrefillBar.bar
            _PrefillBar.calls += 1
        return self.bar

    def __exit__(self, *exc):
        with _PrefillBar.lock:
            _PrefillBar.calls -= 1
            if _PrefillBar.calls == 0:
                _PrefillBar.bar.close()
                _PrefillBar.bar = None


def tick(_, chunks=1) -> None:
    """Advances the active prefill bar by `chunks` (a `jax.debug.callback` target)."""
    with _PrefillBar.lock:
        if _PrefillBar.bar is not None:
            _PrefillBar.bar.update(int(chunks))


class _Stream:
    """The function the running streaming call delivers to, and what it raised (then it is not called again)."""

    lock = threading.Lock()  # streaming calls from several threads take turns
    function: Callable | None = None
    error: BaseException | None = None
    delivering = threading.local()  # `.active`: this thread is inside the function now
    sent: np.ndarray | None = None  # `[B]`: each row's tokens delivered so far
    order = threading.Lock()  # one delivery at a time (unordered callbacks may run on several threads)


@dataclasses.dataclass
class StreamCall:
    """What a streaming call's function raised, known once the call's `streaming_to` block has ended."""

    error: BaseException | None = None


@contextlib.contextmanager
def streaming_to(stream: Callable) -> Iterator[StreamCall]:
    """Delivers the streaming decode loops run inside to `stream`. On leaving, every report has been
    delivered and the yielded `StreamCall` holds what `stream` raised, for the caller to re-raise."""
    if getattr(_Stream.delivering, "active", False):  # waiting for the lock would wait for ourselves
        raise RuntimeError("generate(stream=...) cannot run inside a stream function (the running call delivers "
                           "to one function at a time); call generate without stream= there")
    call = StreamCall()
    # JAX moves the runtime token of ordered callbacks to the device implicitly the first time: a caller's
    # `jax.transfer_guard("disallow")` would refuse it (our own arguments are placed explicitly).
    with _Stream.lock, jax.transfer_guard_host_to_device("allow"):
        _Stream.function, _Stream.error, _Stream.sent = stream, None, None
        try:
            yield call
        finally:
            jax.effects_barrier()  # unordered callbacks may still be queued
            call.error = _Stream.error
            _Stream.function, _Stream.error, _Stream.sent = None, None, None


def deliver(tokens, count) -> None:
    """Hands the streaming call's function each row's tokens of `tokens [B, N]` below `count [B]` not yet handed
    over (a `jax.debug.callback` target, with the output buffer after a step). Each report carries all of
    them, so reports that arrive out of order (unordered callbacks) still deliver every token once, in order:
    a late one finds nothing new."""
    with _Stream.order:
        if _Stream.function is None or _Stream.error is not None:
            return
        tokens, count = np.asarray(tokens), np.asarray(count)
        sent = np.zeros_like(count) if _Stream.sent is None else _Stream.sent
        _Stream.sent = np.maximum(sent, count)
        # Whatever it raises (KeyboardInterrupt too) is kept for `generate` to re-raise after the loop: raised
        # through the runtime it would arrive as an opaque XLA error.
        _Stream.delivering.active = True
        try:
            _Stream.function([row[b:a] for row, b, a in zip(tokens, sent, count)])
        except BaseException as e:
            _Stream.error = e
        finally:
            _Stream.delivering.active = False
