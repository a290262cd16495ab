"""A training corpus on every machine with no download: the Python standard library's source.

A document is one top-level module, or one package with its files concatenated
in path order (thousands of lines whose later code refers to names defined far
earlier, so long context matters). Tests, generated tables (`encodings`) and
documentation data (`pydoc_data`) are left out. The split is a fixed rule on the
document name, so it is the same on every machine with the same Python.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sysconfig
import zlib
from typing import Iterator

import numpy as np

EXCLUDED_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__", "_bundled",
                            "encodings", "pydoc_data"})
HELDOUT_MODULUS = 10  # crc32(name) % 10 == 0 -> held out (about a tenth)


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # module or package name, e.g. "tarfile", "asyncio"
    text: str

    @property
    def heldout(self) -> bool:
        return zlib.crc32(self.name.encode()) % HELDOUT_MODULUS == 0


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def documents(root: str | pathlib.Path | None = None) -> list[Document]:
    """All documents under `root` (default: this interpreter's standard library), sorted by name."""
    root = pathlib.Path(root) if root is not None else stdlib_root()
    files: dict[str, list[pathlib.Path]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_PARTS & set(rel.parts) or rel.parts[0].startswith("config-"):
            continue
        files.setdefault(rel.parts[0] if len(rel.parts) > 1 else rel.stem, []).append(path)
    if not files:
        raise FileNotFoundError(f"no Python source files under {root}")
    docs = []
    for name, paths in sorted(files.items()):
        parts = [f"# file: {p.relative_to(root).as_posix()}\n{p.read_text(encoding='utf-8', errors='replace')}"
                 for p in paths]
        docs.append(Document(name, "\n".join(parts)))
    return docs


@dataclasses.dataclass(frozen=True)
class TextFiles:
    """Documents read from `--data` paths, and the files found in their directories that were skipped."""

    docs: list[Document]
    not_text: list[str]  # not UTF-8 (binary files, other encodings)
    empty: list[str]


def read_text_files(paths: list[str | pathlib.Path], exclude: tuple[pathlib.Path, ...] = ()) -> TextFiles:
    """One document per file: each file named, and every file under each directory named, except hidden
    ones (a name starting with "."), those under `exclude` (the run's own output) and repeats. A named file
    that is not UTF-8 text raises, naming it; one found in a directory is skipped, as is an empty file."""
    exclude = tuple(pathlib.Path(e).resolve() for e in exclude)
    chosen: dict[pathlib.Path, bool] = {}  # resolved path -> named (not found in a directory)
    for path in map(pathlib.Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"--data: no such file or directory: {path}")
        if not path.is_dir():
            chosen[path.resolve()] = True
            continue
        for f in sorted(path.rglob("*")):
            hidden = any(part.startswith(".") for part in f.relative_to(path).parts)
            resolved = f.resolve()
            if f.is_file() and not hidden and not any(e == resolved or e in resolved.parents for e in exclude):
                chosen.setdefault(resolved, False)
    docs, not_text, empty = [], [], []
    for f, named in chosen.items():
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            if named:
                raise ValueError(f"--data: {f} is not UTF-8 text (byte {e.start}); convert it or leave it out") \
                    from None
            not_text.append(str(f))
            continue
        if text.strip():
            docs.append(Document(str(f), text))
        else:
            empty.append(str(f))
    if not docs:
        raise ValueError(f"--data {' '.join(map(str, paths))}: no text to train on ({len(chosen)} files: "
                         f"{len(empty)} empty, {len(not_text)} not UTF-8 text)")
    return TextFiles(docs, not_text, empty)


def split(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """(train, held-out) by the fixed name rule."""
    return [d for d in docs if not d.heldout], [d for d in docs if d.heldout]


def encode_documents(tokenizer, docs: list[Document]) -> list[np.ndarray]:
    """Token ids of each document, `[n_i]` int32: BOS (if the tokenizer has one, as LLaMA's; Qwen's has
    none), the text, then EOS (if any)."""
    ends = [[t] if t is not None else [] for t in (tokenizer.bos_token_id, tokenizer.eos_token_id)]
    encoded = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    return [np.asarray([*ends[0], *ids, *ends[1]], np.int32) for ids in encoded]


def batches(token_docs: list[np.ndarray], batch: int, length: int, seed: int) -> Iterator[np.ndarray]:
    """Endless `[batch, length]` int32 windows: each row a random window of a random document,
    documents drawn in proportion to their length (short ones are packed end to end). Raises at once (not at
    the first window) when the corpus is shorter than one window."""
    stream = np.concatenate(token_docs)
    if stream.size < length:
        raise ValueError(f"corpus has {stream.size} tokens, fewer than one sequence of {length}")
    return _windows(stream, batch, length, seed)


def _windows(stream: np.ndarray, batch: int, length: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, stream.size - length + 1, batch)
        yield np.stack([stream[s: s + length] for s in starts])


def long_documents(token_docs: list[np.ndarray], min_tokens: int) -> list[np.ndarray]:
    """The documents with at least `min_tokens` tokens (held-out long-context prompts)."""
    return [d for d in token_docs if d.size >= min_tokens]
