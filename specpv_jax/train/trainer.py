"""One optax training loop for every model we train: jitted step, progress bar, orbax checkpoints.

A run saves its state (params, optimizer state, step) every `save_every` steps
under `checkpoint_dir` and resumes from the newest one found there, so a long
CPU run can be interrupted and continued with the same command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import sys
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

LossFn = Callable[[Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


RUN_FILE = "run.json"  # what identifies the run a checkpoint directory belongs to


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """steps of AdamW (b2 0.95) with linear warmup and cosine decay to lr / 10; global-norm clipping."""

    steps: int
    batch: int
    length: int
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    save_every: int = 200

    def __post_init__(self):
        for name in ("steps", "batch", "length", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr < float("inf"):
            raise ValueError(f"TrainConfig.lr must be finite and > 0, got {self.lr}")


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    warmup = min(tc.warmup, max(tc.steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, warmup, max(tc.steps, warmup + 1), tc.lr / 10)
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # matrices only, not norms
    return optax.chain(optax.clip_by_global_norm(tc.clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=tc.weight_decay, mask=decay_mask))


def fit(loss_fn: LossFn, params: Any, batches: Iterator[np.ndarray], tc: TrainConfig, desc: str = "train",
        checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
        run: dict | None = None, restart_on: tuple[str, ...] = (), frozen: Any = None) -> tuple[Any, list[dict]]:
    """Minimises `loss_fn(params, batch) -> (loss, metrics)` for `tc.steps` steps (a batch: an array or a
    tuple of arrays); with `frozen` (weights the loss reads but does not train, such as a target's),
    `loss_fn(params, batch, frozen)`. Frozen weights go to the jitted step as an argument: closed over by
    `loss_fn`, they would be compiled into it as constants, a second copy of them in host memory.

    Returns the final params and the metrics history (one dict of floats per
    step). Raises if the loss becomes non-finite, naming the step. A resumed run
    skips the batches its saved steps used (`batches` must repeat the same stream);
    `checkpoint_dir` must hold this run's state: the same `tc` but for `steps` (a
    run may be extended; its learning rate then follows the longer schedule from the
    resumed step, a jump back up the cosine) and the same `run` (JSON-able facts that
    identify it, such as a hash of the data), else it is refused (a record from an
    older version checks the keys it holds). `restart_on` names keys of `run` that
    an earlier phase of the same recipe decides (a digest of the weights it made:
    `params_digest`): where only they differ, that phase was trained further, and
    this run starts over, its checkpoints there deleted (with a warning).
    """
    from tqdm.auto import tqdm

    opt = optimizer(tc)
    state = {"params": params, "opt": opt.init(params), "step": jnp.zeros((), jnp.int32)}
    manager = _manager(checkpoint_dir)
    if manager is not None:
        settings = {k: v for k, v in dataclasses.asdict(tc).items() if k not in ("steps", "save_every")}  # may grow
        identity = json.loads(json.dumps({"train": settings, **(run or {})}))
        changed = _check_same_run(pathlib.Path(checkpoint_dir), identity, manager.latest_step() is not None,
                                  restart_on)
        if changed:
            from specpv_jax.warning import warn

            for saved in manager.all_steps():
                manager.delete(saved)
            _record_run(pathlib.Path(checkpoint_dir), identity)
            warn(f"{desc}: {checkpoint_dir} held this run trained from an earlier phase's older output (its "
                 f"{', '.join(changed)} changed): it starts over")
        if manager.latest_step() is not None:
            state = _restore(manager, state)
            if int(state["step"]) > tc.steps:
                raise ValueError(f"{desc}: {checkpoint_dir} holds step {int(state['step'])}, beyond the {tc.steps} "
                                 "steps asked for (ask for at least as many, or use another checkpoint directory)")
            for _ in range(int(state["step"])):
                next(batches)
            if progress:
                tqdm.write(f"{desc}: resuming at step {int(state['step'])} of {tc.steps} from {checkpoint_dir} "
                           f"(saved every {tc.save_every} steps)", file=sys.stderr)

    @jax.jit
    def step(state, batch, frozen):
        loss_of = loss_fn if frozen is None else lambda params, batch: loss_fn(params, batch, frozen)
        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"], batch)
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt_state,
                "step": state["step"] + 1}, metrics

    history: list[dict] = []

    def record(i: int, metrics: dict) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        if not np.isfinite(metrics["loss"]):
            again = "" if manager is None else (f" and start again in another checkpoint directory ({checkpoint_dir} "
                                                f"holds this run's steps, which another learning rate may not resume)")
            raise FloatingPointError(f"{desc}: loss became {metrics['loss']} at step {i}; lower the learning "
                                     f"rate{again}")
        history.append(metrics)
        bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if k != "grad_norm"}, refresh=False)

    start = int(state["step"])
    pending = None  # the last step's (index, metrics), read once the next step is queued: no wait per step
    try:
        with tqdm(desc=desc, initial=start, total=tc.steps, disable=not progress) as bar:
            for i in range(start, tc.steps):
                state, metrics = step(state, jax.tree.map(jnp.asarray, next(batches)), frozen)
                if pending is not None:
                    record(*pending)
                pending = (i, metrics)
                if manager is not None and ((i + 1) % tc.save_every == 0 or i + 1 == tc.steps):
                    record(*pending)  # a checkpoint never holds the update of a non-finite loss
                    pending = None
                    with _save_errors(manager, checkpoint_dir):
                        manager.save(i + 1, args=_save_args(state))
                bar.update()
            if pending is not None:
                record(*pending)  # before the bar closes, so that its last line shows the last step
    except KeyboardInterrupt:
        if progress:
            if manager is None:
                where = "nothing saved (a checkpoint directory, train-draft's --work DIR, makes a run resumable)"
            else:
                manager.wait_until_finished()
                saved = manager.latest_step()
                where = (f"{checkpoint_dir} holds step {saved}: the same command resumes there" if saved else
                         f"nothing saved yet (the first save is at step {min(tc.save_every, tc.steps)})")
            tqdm.write(f"{desc}: interrupted; {where}", file=sys.stderr)
        raise
    finally:  # an interrupted run keeps the checkpoint being written
        if manager is not None:
            with _save_errors(manager, checkpoint_dir):
                manager.wait_until_finished()
    return state["params"], history


def digest(*arrays: np.ndarray) -> str:
    """A short hash of integer arrays (token ids): part of a run's identity in `fit(run=)`."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.int64(np.size(a)).tobytes() + np.ascontiguousarray(a, np.int64).tobytes())
    return h.hexdigest()[:16]


def params_digest(params: Any, samples: int = 4096) -> str:
    """A short hash of a pytree of weights: each leaf's path, shape, dtype and `samples` to `2 * samples` evenly
    strided entries (tells trained weights apart without reading a whole 8B target to the host)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        leaf = jnp.asarray(leaf)
        sample = _strided(leaf, max(1, leaf.size // samples))
        h.update(f"{jax.tree_util.keystr(path)} {leaf.shape} {leaf.dtype}".encode() + np.asarray(sample).tobytes())
    return h.hexdigest()[:16]


@functools.partial(jax.jit, static_argnums=1)
def _strided(x: jax.Array, step: int) -> jax.Array:
    return x.reshape(-1)[::step]  # one fused gather: the flattened copy of a large leaf is never made


def _check_same_run(directory: pathlib.Path, identity: dict, resuming: bool, restart_on: tuple[str, ...]) -> list:
    """Records `identity` in `directory`; refuses to resume a different run. Returns the keys of `restart_on`
    that differ where only such keys do (the run must start over: the caller records it then), else []."""
    record = directory / RUN_FILE
    try:
        stored = json.loads(record.read_text()) if resuming and record.is_file() else identity  # (older: unchecked)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{record} is damaged ({e}): it records which run {directory}'s checkpoints belong to; "
                         f"delete {directory} to start over") from None
    differ = sorted(k for k in stored if identity.get(k) != stored[k])  # keys an older record lacks: unchecked
    if differ and set(differ) <= set(restart_on):
        return differ
    if differ:
        raise ValueError(f"{directory} holds the checkpoint of another training run (its {', '.join(differ)} "
                         f"differ from this one's); resume with the same settings and data, or use an empty "
                         f"work directory")
    _record_run(directory, identity)  # (an older record gains the new keys)
    return []


def _record_run(directory: pathlib.Path, identity: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{RUN_FILE}.partial"
    partial.write_text(json.dumps(identity, indent=1, sort_keys=True))
    partial.replace(directory / RUN_FILE)  # whole or not at all, if killed while writing


def _manager(directory):
    if directory is None:
        return None
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(pathlib.Path(directory).absolute(),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))


@contextlib.contextmanager
def _save_errors(manager, checkpoint_dir) -> Iterator[None]:
    """A failed save to `checkpoint_dir` (a full disk; orbax writes in the background, so it may surface at the
    next save) as one error naming the directory and the step a rerun resumes from, without the page-long
    reports of orbax's writer threads."""
    from specpv_jax import checkpoint

    try:
        with checkpoint.orbax_errors_unlogged():
            yield
    except Exception as e:
        saved = manager.latest_step()
        raise checkpoint.CheckpointError(
            f"cannot save the training state to {checkpoint_dir}: {checkpoint.first_line(e)}; "
            + (f"the same command resumes from step {saved}" if saved else "no step saved yet")) from None


def _save_args(state):
    import orbax.checkpoint as ocp

    return ocp.args.StandardSave(state)


def _restore(manager, state):
    import orbax.checkpoint as ocp

    return manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
