"""Orbax save/restore of params plus our own JSON metadata.

A checkpoint directory holds `specpv_config.json` (kind, configs), `params/`
(orbax) and optionally `tokenizer/`. It is written to a hidden sibling
directory and renamed into place, so a failure never leaves a half-written
checkpoint under the requested name.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import uuid
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

META_FILE = "specpv_config.json"
FORMAT = "specpv-jax"
FORMAT_VERSION = 1
# Files that make a directory loadable by AutoTokenizer; the rest travel with them.
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
TOKENIZER_FILES = TOKENIZER_MARKERS + ("special_tokens_map.json", "merges.txt", "added_tokens.json",
                                       "chat_template.jinja", "chat_template.json", "generation_config.json")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be written or read as asked."""


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (pathlib.Path(path) / META_FILE).is_file()


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Yields a hidden sibling directory to fill; on success it replaces `out_dir`, on any error it vanishes.

    Refuses a non-empty `out_dir` unless `overwrite`.
    """
    out = pathlib.Path(out_dir).resolve()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{out} already exists and is not empty (pass overwrite=True / --force to replace it)")
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        yield tmp
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(out_dir: str | os.PathLike, params: Any, meta: dict[str, Any],
         tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False) -> pathlib.Path:
    """Writes `params` and `meta` to `out_dir` atomically; returns the path."""
    with atomic_directory(out_dir, overwrite) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / "params", params)
        checkpointer.wait_until_finished()
        if tokenizer_dir is not None:
            _copy_tokenizer(pathlib.Path(tokenizer_dir), tmp / "tokenizer")
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return pathlib.Path(out_dir).resolve()


def _replace_dir(new: pathlib.Path, out: pathlib.Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _copy_tokenizer(src: pathlib.Path, dst: pathlib.Path) -> None:
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if names:
        dst.mkdir()
        for n in names:
            shutil.copy2(src / n, dst / n)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    meta_path = pathlib.Path(path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a specpv-jax checkpoint (no {META_FILE})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: unsupported format {meta.get('format')!r} "
                              f"version {meta.get('format_version')!r}")
    return meta


def restore(path: str | os.PathLike, kind: str) -> tuple[dict[str, Any], Any]:
    """Returns `(meta, params)` of a checkpoint of `kind` ("target", "eagle3"), params on the default device."""
    path = pathlib.Path(path).resolve()
    meta = read_meta(path)
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} checkpoint, not a {kind!r} one")
    checkpointer = ocp.StandardCheckpointer()
    tree = checkpointer.metadata(path / "params").item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return meta, checkpointer.restore(path / "params", abstract)


def tokenizer_dir(path: str | os.PathLike) -> pathlib.Path | None:
    d = pathlib.Path(path) / "tokenizer"
    return d if d.is_dir() else None
