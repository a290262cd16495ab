"""Orbax save/restore of params plus our own JSON metadata.

A checkpoint directory holds `specpv_config.json` (kind, configs), `params/`
(orbax) and optionally `tokenizer/`. It is written to a hidden sibling
directory and renamed into place (or, into an empty directory, written in a
hidden one inside it and moved up, `specpv_config.json` last), so a failure
never leaves a half-written checkpoint under the requested name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import pathlib
import shutil
import sys
import time
import uuid
from typing import Any, Callable, Iterator, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from jax.sharding import Mesh, NamedSharding

from specpv_jax import sharding
from specpv_jax.warning import warn

T = TypeVar("T")

META_FILE = "specpv_config.json"
FORMAT = "specpv-jax"
FORMAT_VERSION = 1
# A model directory's files that say it is complete: moved into place last (`_move_up`).
MARKER_FILES = (META_FILE, "config.json")
# Files that make a directory loadable by AutoTokenizer; the rest travel with them.
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
TOKENIZER_FILES = TOKENIZER_MARKERS + ("special_tokens_map.json", "merges.txt", "added_tokens.json",
                                       "chat_template.jinja", "chat_template.json", "generation_config.json")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be written or read as asked."""


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (pathlib.Path(path) / META_FILE).is_file()


def holds_model(path: pathlib.Path) -> bool:
    """Whether `path` is a model directory (a checkpoint of ours or a `config.json` model): what overwriting may
    replace, so that a directory of other things (a parent of models, a home directory) is never deleted."""
    return is_checkpoint(path) or (path / "config.json").is_file()


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False,
                     replaceable: Callable[[pathlib.Path], bool] = holds_model) -> Iterator[pathlib.Path]:
    """Yields a hidden directory to fill; on success its contents become `out_dir`, on any error it vanishes.

    It is a sibling of `out_dir`, renamed into place (replacing `out_dir`), unless `out_dir` is an empty
    directory: then it is made inside it and its contents moved up, the files that mark a model directory
    last, so that an empty working directory or mount point is filled where it is. Refuses a non-empty
    `out_dir` unless `overwrite` and `replaceable(out_dir)`. Multi-host (`jax.process_count() > 1`, a
    filesystem all processes share, as orbax needs): every process calls this and gets the same directory;
    process 0 alone creates and renames it, after all have written their part.
    """
    out = check_destination(out_dir, overwrite, replaceable=replaceable)
    in_place = out.is_dir() and not _contents(out)
    primary = jax.process_index() == 0
    if primary:
        _warn_leftovers(out)
    suffix = _shared_suffix()  # multi-host: a collective, so no process has created anything yet
    tmp = out / f".partial-{suffix}" if in_place else out.parent / f".{out.name}.partial-{suffix}"
    created = [p for p in out.parents if not p.exists()]  # deepest first: removed again if the save fails
    if primary:
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            raise CheckpointError(f"cannot create {out}: {e.strerror or e}") from None
    ocp.multihost.sync_global_processes(f"specpv_mkdir_{suffix}")  # no-op in one process
    try:
        yield tmp
        ocp.multihost.sync_global_processes(f"specpv_written_{suffix}")
        if primary:
            (_move_up if in_place else _replace_dir)(tmp, out)
        ocp.multihost.sync_global_processes(f"specpv_replaced_{suffix}")
    except BaseException:
        if primary:
            try:
                _remove(tmp)
            finally:  # also after a second Ctrl-C during the removal
                for parent in created:
                    with contextlib.suppress(OSError):  # not empty: something else was put there meanwhile
                        parent.rmdir()
        raise


def _remove(tree: pathlib.Path, settle: float = 1.0, give_up: float = 10.0) -> None:
    """Deletes the directory `tree`, and again until it has stayed away for `settle` seconds: writes still in
    flight after a failed save (orbax's, on a full disk) made its directories again after the first deletion."""
    start = gone = time.monotonic()
    try:
        while time.monotonic() - start < give_up:
            if tree.exists():
                shutil.rmtree(tree, ignore_errors=True)
                gone = time.monotonic()
            elif time.monotonic() - gone >= settle:
                return
            time.sleep(0.05)
    except KeyboardInterrupt:  # a second Ctrl-C: delete what is there now, and stop
        shutil.rmtree(tree, ignore_errors=True)
        raise
    if tree.exists():
        warn(f"could not delete {tree}, left by a failed save: delete it")


def _shared_suffix() -> str:
    """A random name suffix, the same in every process (process 0's)."""
    n = uuid.uuid4().int & 0x7FFFFFFF
    if jax.process_count() > 1:
        n = int(ocp.multihost.broadcast_one_to_all(np.int32(n)))
    return f"{n:08x}"


def _warn_leftovers(out: pathlib.Path) -> None:
    """Points out what a killed save to `out` left beside it (an error cleans up; a kill cannot): a partial
    checkpoint, or the one an overwrite was replacing. Not deleted here: another save to `out` may be writing
    it now."""
    leftovers = sorted(p.name for pattern in (f".{out.name}.partial-*", f".{out.name}.old-*")
                       for p in out.parent.glob(pattern)) if out.parent.is_dir() else []
    inside = sorted(p.name for p in out.glob(".partial-*")) if out.is_dir() else []  # an in-place save's
    for where, names in ((out.parent, leftovers), (out, inside)):
        if names:
            warn(f"{where} holds {', '.join(names)}, left by an interrupted save to {out.name}; delete "
                 f"{'it' if len(names) == 1 else 'them'} unless another save to it is running")


def _contents(out: pathlib.Path) -> list[pathlib.Path]:
    """What the directory `out` holds, less what interrupted in-place saves left (`.partial-*`)."""
    return [p for p in out.iterdir() if not p.name.startswith(".partial-")]


def check_destination(out_dir: str | os.PathLike, overwrite: bool = False,
                      source: str | os.PathLike | None = None,
                      replaceable: Callable[[pathlib.Path], bool] = holds_model) -> pathlib.Path:
    """`out_dir` resolved, once it is known that a checkpoint can be written there: not a file, empty
    unless `overwrite` and it is `replaceable` (a model directory), inside a writable directory, and not the
    model directory `source` being exported (unless that is a checkpoint of ours) or a directory holding it,
    which replacing would delete."""
    out = pathlib.Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file, not a directory")
    occupied = out.exists() and bool(_contents(out))
    killed = sorted(p.name for p in out.glob(".partial-*")) if occupied and not replaceable(out) else []
    if killed:  # an in-place save killed while moving its files up, marker files last: `out` holds the first
        raise CheckpointError(f"{out} holds part of a checkpoint that a save killed while moving it into place "
                              f"left, beside {', '.join(killed)} (the rest): delete what {out} holds and save again")
    if occupied and not overwrite:
        raise CheckpointError(f"{out} already exists and is not empty (pass overwrite=True / --force to replace it)")
    if source:
        src = pathlib.Path(source).resolve()
        if out == src and not is_checkpoint(src):
            raise CheckpointError(f"{out} is the model directory being exported; replacing it would delete it: "
                                  f"write to another directory")
        if out in src.parents:
            raise CheckpointError(f"{out} holds {src}, the model being exported; replacing it would delete it: "
                                  f"write to another directory")
    if occupied and (out == pathlib.Path.cwd() or out in pathlib.Path.cwd().parents):
        raise CheckpointError(f"{out} is or holds the working directory; replacing it would leave this process "
                              f"(and your shell) in a deleted directory: run from elsewhere, or empty it")
    if occupied and os.path.ismount(out):
        raise CheckpointError(f"{out} is a mount point, which cannot be replaced: empty it, or write to a new "
                              f"directory inside it")
    if occupied and not replaceable(out):
        held = sorted(p.name + "/" * p.is_dir() for p in out.iterdir())
        raise CheckpointError(
            f"{out} is not a model directory (no {META_FILE} or config.json; it holds "
            f"{', '.join(held[:5])}{', ...' if len(held) > 5 else ''}): overwrite/--force replaces only a "
            f"model directory, never a directory of other things; write to a new directory inside it")
    if out.is_dir() and not occupied:  # filled in place (`atomic_directory`): nothing above it is written
        if not os.access(out, os.W_OK | os.X_OK):
            raise CheckpointError(f"cannot write to {out}: it is not a writable directory")
        return out
    parent = next(p for p in out.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot create {out}: {parent} is not a writable directory")
    return out


def save(out_dir: str | os.PathLike, params: Any, meta: dict[str, Any],
         tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False) -> pathlib.Path:
    """Writes `params` and `meta` to `out_dir` atomically; returns the path."""
    out = pathlib.Path(out_dir).resolve()  # now: replacing the working directory would leave nothing to resolve
    with atomic_directory(out, overwrite) as tmp:
        _save_params(tmp / "params", params, out)
        sums = checksums(params)  # multi-host: a collective, as the save above
        if jax.process_index() == 0:  # multi-host: every process wrote its shards above, one writes the rest
            if tokenizer_dir is not None:
                _copy_tokenizer(pathlib.Path(tokenizer_dir), tmp / "tokenizer")
            meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "checksums": sums}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def _save_params(path: pathlib.Path, params: Any, out: pathlib.Path) -> None:
    """Orbax writes `params` to `path`; on failure (a full disk) its writer threads are done before this raises,
    so that the caller's clean-up is not racing them."""
    checkpointer = ocp.StandardCheckpointer()
    _drop_failed_io_reports()  # before writing: in-flight writes report as soon as one fails (a full disk)
    try:
        with orbax_errors_unlogged():  # each writer thread logs the failure with a page-long traceback
            checkpointer.save(path, params)
            checkpointer.wait_until_finished()
    except BaseException as e:  # orbax and TensorStore raise several types; Ctrl-C stops only this thread
        with contextlib.suppress(Exception), orbax_errors_unlogged():
            checkpointer.close()
        _quiet_orphaned_writes(path)
        if not isinstance(e, Exception):
            raise
        raise CheckpointError(f"cannot write the parameters of {out}: {first_line(e)}") from None
    checkpointer.close()


def _not_an_orphaned_write(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ("never retrieved" in message and "orbax" in message)


def _not_an_orbax_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR or "orbax" not in record.pathname


@dataclasses.dataclass(frozen=True)
class _NotAboutSave:
    """A log filter dropping orbax's error records that name the directory `path` (a failed save's)."""

    path: str

    def filter(self, record: logging.LogRecord) -> bool:
        return _not_an_orbax_error(record) or self.path not in record.getMessage()


def _quiet_orphaned_writes(path: pathlib.Path) -> None:
    """From here on, drops the reports of the failed save to `path` the caller reports: asyncio's of orbax
    write tasks whose error nobody retrieved (each a page long, when collected, up to the process's exit), and
    orbax's own of its commit thread, which may still be running (after Ctrl-C: 'cannot schedule new futures
    after shutdown'); orbax's errors about other saves are still logged."""
    asyncio_logger = logging.getLogger("asyncio")
    if _not_an_orphaned_write not in asyncio_logger.filters:
        asyncio_logger.addFilter(_not_an_orphaned_write)
    logging.getLogger("absl").addFilter(_NotAboutSave(str(path)))


@contextlib.contextmanager
def orbax_errors_unlogged() -> Iterator[None]:
    """Drops orbax's error log records (its threads' reports of an error the caller raises itself)."""
    def keep(record: logging.LogRecord) -> bool:  # its own: a nested use's removal leaves this one's
        return _not_an_orbax_error(record)

    logger = logging.getLogger("absl")  # orbax logs through absl, which logs through this logger
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _move_up(new: pathlib.Path, out: pathlib.Path) -> None:
    """Moves the contents of `new` (inside the empty directory `out`) into `out`, marker files last; on an error,
    what was moved goes back (for the caller to delete with `new`)."""
    moved = []
    try:
        for item in sorted(new.iterdir(), key=lambda p: p.name in MARKER_FILES):
            os.replace(item, out / item.name)
            moved.append(item.name)
    except BaseException:
        for name in moved:
            os.replace(out / name, new / name)
        raise
    new.rmdir()


def _replace_dir(new: pathlib.Path, out: pathlib.Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        if old is not None:  # put the checkpoint being replaced back where it was
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _copy_tokenizer(src: pathlib.Path, dst: pathlib.Path) -> None:
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if names:
        dst.mkdir()
        for n in names:
            shutil.copy2(src / n, dst / n)


def read_meta(path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """The checkpoint's `specpv_config.json`; with `kind`, raises unless it holds that kind of checkpoint."""
    meta_path = pathlib.Path(path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a specpv-jax checkpoint (no {META_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is not valid JSON: {e}") from None
    except OSError as e:  # a directory, unreadable
        raise CheckpointError(f"cannot read {meta_path}: {e.strerror or e}") from None
    version = meta.get("format_version", 0) if isinstance(meta, dict) else None
    if (not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(version, int)
            or isinstance(version, bool) or version > FORMAT_VERSION):
        found = meta if not isinstance(meta, dict) else f"{meta.get('format')!r} version {meta.get('format_version')!r}"
        raise CheckpointError(f"{meta_path}: unsupported format {found}")
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} checkpoint, not a {kind!r} one")
    return meta


def config_from_meta(path: str | os.PathLike, meta: dict[str, Any], field: str, from_dict: Callable[[Any], T]) -> T:
    """`from_dict(meta[field])`, or an error naming the metadata file and the field."""
    try:
        return from_dict(meta[field])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{pathlib.Path(path) / META_FILE}: missing or malformed {field!r}: {e}") from None


def key_name(path: tuple) -> str:
    """A pytree key path as "a/b/c"."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """`{"a/b/c": shape}` for every leaf of a tree of arrays (or of anything with a `.shape`)."""
    return {key_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def restore(path: str | os.PathLike, expected: dict[str, tuple[int, ...]],
            optional: dict[str, tuple[int, ...]] | None = None, mesh: Mesh | None = None, cfg: Any = None) -> Any:
    """The checkpoint's parameter tree, on the default device, or read straight into its shards on `mesh`
    (as `sharding.param_specs` splits a model of `cfg`).

    expected: `flat_shapes` of the tree its configs imply (`optional`: leaves it may hold
    too); any difference from the stored tree is an error naming the keys, raised
    before anything is read, as is a damaged `params/` directory.
    """
    path = pathlib.Path(path).resolve()
    tree = _stored_tree(path)
    _check_shapes(path, flat_shapes(tree), expected, optional or {})
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # multi-host: this process's own
    where = (jax.tree.map(lambda m: device, tree) if mesh is None else
             jax.tree.map(lambda m, spec: NamedSharding(mesh, spec), tree, sharding.param_specs(tree, mesh, cfg)))
    abstract = jax.tree.map(lambda m, w: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=w), tree, where)
    _drop_failed_io_reports()  # before reading: in-flight reads report as soon as one fails (or on Ctrl-C)
    try:
        params = ocp.StandardCheckpointer().restore(path / "params", abstract)
    except Exception as e:  # orbax and TensorStore raise several types
        error = CheckpointError(f"cannot read the parameters in {path / 'params'} (the checkpoint is damaged): "
                                f"{first_line(e)}")
    else:
        _check_checksums(path, params)
        return params
    gc.collect()  # the failed reads, orphaned with the exception, report now (and are dropped)
    raise error


def checksums(tree: Any) -> dict[str, int]:
    """`{"a/b/c": checksum}` for every leaf of a tree of arrays: the leaf's bits as unsigned words, each times an
    odd weight from its position, summed modulo 2**32 (a changed word always changes it; odd weights are
    invertible). Computed where the leaves are, in one program: one number per leaf is read back."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    arrays = [x if isinstance(x, jax.Array) else jax.device_put(np.asarray(x)) for _, x in leaves]
    sums = jax.device_get([s.addressable_data(0) for s in _checksums(arrays)])  # multi-host: each has them all
    return {key_name(path): int(s) for (path, _), s in zip(leaves, sums)}


@jax.jit
def _checksums(leaves: list[jax.Array]) -> list[jax.Array]:
    return [_checksum(x) for x in leaves]


def _checksum(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    words = lax.bitcast_convert_type(x, jnp.uint32 if size == 8 else jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)
    index, stride = jnp.zeros(words.shape, jnp.uint32), 1  # row-major position, modulo 2**32, without a reshape
    for axis in reversed(range(words.ndim)):
        index = index + lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    return jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)


def _check_checksums(path: pathlib.Path, params: Any) -> None:
    """Raises naming the leaves whose data differ from what was saved (a checkpoint written before checksums
    were recorded is not checked)."""
    stored = read_meta(path).get("checksums")
    if not isinstance(stored, dict):
        return
    damaged = [k for k, s in checksums(params).items() if stored.get(k, s) != s]
    if damaged:
        raise CheckpointError(f"{path / 'params'} is damaged: the data of {', '.join(damaged[:8])}"
                              f"{f' and {len(damaged) - 8} more' if len(damaged) > 8 else ''} differ from what "
                              f"was saved (their checksums in {META_FILE})")


def _drop_failed_io_reports() -> None:
    """Quiets the reads and writes a failed orbax restore or save leaves behind: each reports its own
    TensorStore error, a page long, when collected, and those still in flight report that orbax's event loop
    is closed when they finish (the caller's error names the problem). From here on the process's
    unraisable-exception hook drops those reports (and passes on every other)."""
    if not getattr(sys.unraisablehook, "drops_failed_io", False):
        passed_on = sys.unraisablehook

        def hook(unraisable) -> None:
            if not _failed_io(unraisable):
                passed_on(unraisable)

        hook.drops_failed_io = True
        sys.unraisablehook = hook


def _failed_io(unraisable) -> bool:
    if isinstance(unraisable.exc_value, KeyboardInterrupt):  # Ctrl-C, wherever it lands, is not a failed read
        return False
    code = getattr(unraisable.object, "cr_code", None)  # an orphaned orbax read or write coroutine
    closed = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
    return closed or (code is not None and "orbax" in code.co_filename)


def _stored_tree(path: pathlib.Path) -> Any:
    damaged = f"{path / 'params'} is missing or incomplete (the checkpoint is damaged)"
    try:
        metadata = ocp.StandardCheckpointer().metadata(path / "params")
    except Exception as e:  # orbax raises several types for a missing or damaged directory
        raise CheckpointError(f"{damaged}: {first_line(e)}") from None
    tree = getattr(getattr(metadata, "item_metadata", None), "tree", None)
    if tree is None:
        raise CheckpointError(damaged)
    return tree


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first sentence (TensorStore's run to a page) and its cause's."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0].split(" See full TensorStore details")[0]
    return text + (f" ({first_line(e.__cause__)})" if e.__cause__ is not None else "")


def _check_shapes(path: pathlib.Path, stored: dict, expected: dict, optional: dict) -> None:
    problems = shape_problems(stored, expected, optional)
    if problems:
        raise CheckpointError(f"{path}: the stored parameters do not match {META_FILE}: {problems}")


def shape_problems(found: dict, expected: dict, optional: dict | None = None) -> str:
    """How the `flat_shapes` `found` differ from `expected` (and the leaves `optional` allows), at most eight
    named; "" where they do not."""
    allowed = {**(optional or {}), **expected}
    problems = [f"missing {k} {shape}" for k, shape in expected.items() if k not in found]
    problems += [f"unexpected {k} {shape}" for k, shape in found.items() if k not in allowed]
    problems += [f"{k} has shape {found[k]}, the configuration implies {shape}"
                 for k, shape in allowed.items() if k in found and found[k] != shape]
    return "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")


def tokenizer_dir(path: str | os.PathLike) -> pathlib.Path | None:
    d = pathlib.Path(path) / "tokenizer"
    return d if d.is_dir() else None
