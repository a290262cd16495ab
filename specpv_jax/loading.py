"""Loading models from Hugging Face directories or our orbax checkpoints."""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from specpv_jax import checkpoint, sharding
from specpv_jax.config import ModelConfig
from specpv_jax.jax_settings import under_defaults
from specpv_jax.model import Params, init_params


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded decoder: config (static), params (pytree) and optional tokenizer."""

    cfg: ModelConfig
    params: Params = dataclasses.field(repr=False)  # a repr of the weights would be megabytes of text
    tokenizer: Any = dataclasses.field(default=None, repr=False)
    source: str = ""

    @property
    def dtype(self):
        """The weights' dtype (that of the token embedding), e.g. bfloat16."""
        return self.params["embed_tokens"]["embedding"].dtype


def tokenizer_directory(path: str | os.PathLike) -> pathlib.Path | None:
    """Where a model directory (Hugging Face, or an orbax export) keeps its tokenizer files; None without any."""
    path = pathlib.Path(path)
    directory = checkpoint.tokenizer_dir(path) if checkpoint.is_checkpoint(path) else path
    if directory is None or not any((directory / n).is_file() for n in checkpoint.TOKENIZER_MARKERS):
        return None
    return directory


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a model directory (Hugging Face, or an orbax export); None without tokenizer files."""
    directory = tokenizer_directory(path)
    if directory is None:
        return None
    import transformers

    # A tokenizer saved by transformers 5 names its class TokenizersBackend, which transformers 4 lacks (it
    # refuses the directory); its tokenizer.json loads as a fast tokenizer all the same.
    load = transformers.PreTrainedTokenizerFast if _names_a_missing_class(directory) else transformers.AutoTokenizer
    try:
        return load.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # transformers raises many types for damaged tokenizer files
        raise ValueError(f"cannot load the tokenizer in {directory}: {type(e).__name__}: {e}") from e


def _names_a_missing_class(directory: pathlib.Path) -> bool:
    """Whether `directory` has a tokenizer.json and its tokenizer_config.json names a class this transformers
    lacks."""
    import json

    import transformers

    config = directory / "tokenizer_config.json"
    if not (directory / "tokenizer.json").is_file() or not config.is_file():
        return False
    try:
        name = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
    except (ValueError, AttributeError):  # not JSON, or not an object: AutoTokenizer names the problem
        return False
    return isinstance(name, str) and not hasattr(transformers, name) and not hasattr(transformers, name + "Fast")


def cast_params(params: Params, dtype, where: str) -> Params:
    """`params` (restored from the checkpoint at `where`) cast to `dtype` (None: kept as stored); raises naming
    the parameters that are not finite, as stored (a damaged checkpoint) or after the cast (values beyond a
    narrower dtype's range)."""
    from convert.hf import check_dtype

    _check_finite(params, where, "hold NaN or Inf as stored (the checkpoint is damaged)")
    if dtype is None:
        return params
    dtype = check_dtype(dtype)
    if all(x.dtype == dtype for x in jax.tree.leaves(params)):
        return params
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    _check_finite(params, where, f"hold values beyond the range of {dtype.name}: load in a wider dtype")
    return params


def _check_finite(params: Params, where: str, problem: str) -> None:
    finite = jax.device_get(jax.tree.map(lambda x: jnp.isfinite(x).all(), params))
    bad = [checkpoint.key_name(path) for path, ok in jax.tree_util.tree_leaves_with_path(finite) if not ok]
    if bad:
        raise checkpoint.CheckpointError(f"{where}: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} {problem}")


@under_defaults
def load_target(path: str | os.PathLike, dtype: str | None = "float32", progress: bool = True, *,
                mesh: Mesh | None = None) -> Model:
    """Loads a target model from an HF directory (LLaMA/Qwen2/Qwen3) or an orbax export.

    dtype: parameter and compute dtype ("float32", "bfloat16", "float16"); None keeps a
    checkpoint's stored dtype. progress: a progress bar over the tensors read. mesh:
    a `sharding.make_mesh` mesh to place the parameters on, split as `generate`
    runs them there (which then needs no `mesh=`); default, when there is more
    than one device: all of them,
    tensor parallel over as many as divide the heads (`sharding.default_mesh`),
    so a model larger than one device's memory loads: each tensor goes into its
    shards as it is read.
    """
    if mesh is not None:
        sharding.check_mesh(mesh)
    place = (lambda cfg: mesh) if mesh is not None else sharding.default_mesh
    path = _absolute(path)
    cfg, params = _load_decoder(path, dtype, progress, place)
    return Model(cfg, params, load_tokenizer(path), str(path))


def _absolute(path: str | os.PathLike) -> pathlib.Path:
    """`path` made absolute (not resolved: a symlink keeps its name), so that a model's `source` still names
    its directory after the working directory changes (`save_target` refuses to replace it)."""
    return pathlib.Path(os.path.abspath(path))


def _load_decoder(path: pathlib.Path, dtype: str | None, progress: bool,
                  place: Callable[[ModelConfig], Mesh | None]) -> tuple[ModelConfig, Params]:
    """(config, params placed on the mesh `place(config)` (None: the default device)) of a target-layout
    model."""
    from convert.hf import load_hf_model, read_config  # convert -> params -> model: imported lazily

    check_target_directory(path)
    if checkpoint.is_checkpoint(path):
        meta = checkpoint.read_meta(path, "target")
        cfg = checkpoint.config_from_meta(path, meta, "model_config", ModelConfig.from_dict)
        params = checkpoint.restore(path, param_shapes(init_params, cfg), mesh=place(cfg), cfg=cfg)
        return cfg, cast_params(params, dtype, str(path))
    if (path / "config.json").is_file():
        cfg, params = load_hf_model(path, dtype, progress=progress, mesh=place(read_config(path)[0]))
        return cfg, params
    raise FileNotFoundError(f"{path} is not a model directory: it has neither config.json (Hugging Face) "
                            f"nor {checkpoint.META_FILE} (specpv-jax orbax export)")


def stored_dtype(path: str | os.PathLike) -> str | None:
    """The dtype a target directory's weights are stored in (`load_target(dtype=None)` keeps it), read without
    loading them; None when they mix dtypes."""
    from convert.hf import safetensors_files, scan_headers
    from convert.hf import stored_dtype as of_tensors

    path = pathlib.Path(path)
    if checkpoint.is_checkpoint(path):
        return checkpoint.read_meta(path, "target").get("dtype")
    return of_tensors(scan_headers(safetensors_files(path)))


def check_target_directory(path: str | os.PathLike) -> None:
    """Raises unless `path` is a directory; one of a draft (an EAGLE-3 head, a LongSpec draft, in their
    public layouts) is named as such, not as an unsupported architecture."""
    from convert.longspec import is_longspec_dir

    path = pathlib.Path(path)
    check_directory(path, "model")
    config_json = path / "config.json"
    if checkpoint.is_checkpoint(path) or not config_json.is_file():
        return  # an orbax export names its own kind (`checkpoint.read_meta`)
    draft = "a LongSpec draft" if is_longspec_dir(path) else "an EAGLE-3 head" if _is_eagle3_config(config_json) \
        else None
    if draft:
        raise ValueError(f"{path} holds {draft}, not a target model: it loads as a draft, "
                         f"sj.load_draft(path, target) (the CLI's --draft), which sj.save_draft exports as orbax")


def check_directory(path: pathlib.Path, what: str) -> None:
    """Raises unless `path` is a directory, naming a file in its place or what an interrupted overwrite left."""
    if not path.exists():
        old = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
        hint = f" ({old[0]} holds the checkpoint an interrupted overwrite was replacing)" if old else ""
        raise FileNotFoundError(f"{what} directory {path} does not exist{hint}")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; pass the {what} directory")


@functools.lru_cache(maxsize=32)
def param_shapes(init_params, cfg) -> dict[str, tuple[int, ...]]:
    """The parameter shapes `init_params(cfg, key)` makes, flattened as `checkpoint.restore` expects them (a
    cached dict: do not modify)."""
    return checkpoint.flat_shapes(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))


def draft_param_shapes(dcfg: Any) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(expected, optional) flattened parameter shapes of a draft of `dcfg` (a small draft model's
    ModelConfig, a LongSpec draft's or an EAGLE-3 head's config): an EAGLE-3 head may carry its own embedding
    (must, if its width differs from the target's)."""
    from specpv_jax.config import DraftConfig, LongSpecConfig
    from specpv_jax.draft import eagle3, longspec

    if isinstance(dcfg, DraftConfig):  # a head as wide as its target may use the target's embedding
        embedding = {"embed_tokens/embedding": (dcfg.vocab_size, dcfg.hidden_size)}
        if dcfg.hidden_size != dcfg.target_hidden_size:
            return {**param_shapes(eagle3.init_params, dcfg), **embedding}, {}
        return param_shapes(eagle3.init_params, dcfg), embedding
    return param_shapes(longspec.init_params if isinstance(dcfg, LongSpecConfig) else init_params, dcfg), {}


def check_model(model: Any, argument: str = "target") -> None:
    """Raises unless `model` is a loaded target (`load_target`'s `Model`); `argument` names it."""
    if not isinstance(model, Model):
        raise TypeError(f"{argument} must be a model from sj.load_target, got {type(model).__name__}")


@under_defaults
def save_target(model: Model, out_dir: str | os.PathLike, overwrite: bool = False) -> pathlib.Path:
    """Exports a target model as an orbax checkpoint that restores without HF files or torch (with its
    tokenizer files); `overwrite` replaces a model directory at `out_dir` (never a directory of other files)."""
    check_model(model, "model")
    source = pathlib.Path(model.source) if model.source else None
    tok_dir = tokenizer_directory(source) if source is not None else None
    checkpoint.check_destination(out_dir, overwrite, source=model.source)
    meta = {"kind": "target", "model_config": model.cfg.to_dict(), "dtype": str(model.dtype)}
    if tok_dir is not None or model.tokenizer is None:
        return checkpoint.save(out_dir, model.params, meta, tokenizer_dir=tok_dir, overwrite=overwrite)
    with tempfile.TemporaryDirectory() as saved:  # the source's files moved, or a model built in code
        model.tokenizer.save_pretrained(saved)
        return checkpoint.save(out_dir, model.params, meta, tokenizer_dir=saved, overwrite=overwrite)


@under_defaults
def load_draft(path: str | os.PathLike, target: Model, dtype: str | None = None) -> Any:
    """Loads a draft for `target`: a public-layout EAGLE-3 head directory, a plain LLaMA/Qwen
    directory (a small draft model for "specextend", sharing the target's tokenizer), a LongSpec
    draft directory (a released LongSpec checkpoint or the `convert.longspec` layout), or an orbax export
    of any of them.

    Raises naming what does not fit the target (vocabulary, hidden size, layers).
    dtype: None uses the target's dtype. The draft's parameters go on the mesh the
    target's are placed on (`load_target`), split the same way.
    """
    check_model(target)
    draft = _read_draft(_absolute(path), target, dtype or target.dtype)
    mesh = sharding.mesh_of(target.params)
    if mesh is not None:
        draft = dataclasses.replace(draft, params=sharding.shard_params(draft.params, mesh, draft.cfg))
    return _sharing_the_target_embedding(draft, target)


def _sharing_the_target_embedding(draft: Any, target: Model) -> Any:
    """An EAGLE-3 head that stores a copy of the target's token embedding (speculators' heads do) uses the
    target's instead: one table less on the device (1 GiB for Llama-3.1-8B in bfloat16)."""
    own = draft.params.get("embed_tokens") if getattr(draft, "kind", None) == "eagle3" else None
    theirs = target.params["embed_tokens"]["embedding"]
    if own is None or own["embedding"].shape != theirs.shape or \
            not bool(jnp.array_equal(own["embedding"].astype(theirs.dtype), theirs)):
        return draft
    return dataclasses.replace(draft, params={k: v for k, v in draft.params.items() if k != "embed_tokens"})


def _draft_kind(path: pathlib.Path) -> tuple[str, bool]:
    """(kind, orbax): what `load_draft` reads `path` as ("eagle3", "small" or "longspec"), and whether it is an
    orbax export."""
    from convert.longspec import is_longspec_dir

    check_directory(path, "draft")
    if checkpoint.is_checkpoint(path):
        kind = checkpoint.read_meta(path).get("kind")
        return {"target": "small", "longspec": "longspec"}.get(kind, "eagle3"), True
    if (path / "config.json").is_file():
        if is_longspec_dir(path):
            return "longspec", False
        return ("eagle3" if _is_eagle3_config(path / "config.json") else "small"), False
    raise FileNotFoundError(f"{path} is not a draft directory: it has neither config.json (EAGLE-3 layout or a "
                            f"plain LLaMA/Qwen model) nor {checkpoint.META_FILE} (specpv-jax orbax export)")


def _read_draft(path: pathlib.Path, target: Model, dtype) -> Any:
    from convert.eagle3 import load_eagle3
    from convert.longspec import load_longspec
    from specpv_jax.draft.eagle3 import Eagle3
    from specpv_jax.draft.longspec import LongSpecDraft

    kind, orbax = _draft_kind(path)
    if kind == "small":
        return _small_draft(path, dtype, target)
    if kind == "longspec":
        if orbax:
            return _longspec_from_checkpoint(path, target, dtype)
        return LongSpecDraft(*load_longspec(path, target.cfg, dtype), str(path))
    if orbax:
        return _eagle3_from_checkpoint(path, target, dtype)
    return Eagle3(*load_eagle3(path, target.cfg, dtype), str(path))


def draft_config(path: str | os.PathLike, target: ModelConfig) -> Any:
    """The config of the draft `load_draft` reads from `path` for a target of config `target`, checked to fit
    it, reading no weights: a small draft's `ModelConfig`, an EAGLE-3 head's `DraftConfig` or a LongSpec
    draft's `LongSpecConfig` (what `memory.estimate` sizes a draft by; `specpv-jax plan --draft`)."""
    from convert.eagle3 import check_fits_target, head_config
    from convert.hf import read_config
    from convert.longspec import longspec_config
    from specpv_jax.config import DraftConfig, LongSpecConfig
    from specpv_jax.draft.small import fit_problems

    path = _absolute(path)
    kind, orbax = _draft_kind(path)
    if not orbax and kind == "eagle3":
        return head_config(path, target)
    if not orbax and kind == "longspec":
        return longspec_config(path, target)
    if orbax:
        field, from_dict = {"eagle3": ("draft_config", DraftConfig.from_dict),
                            "longspec": ("longspec_config", LongSpecConfig.from_dict),
                            "small": ("model_config", ModelConfig.from_dict)}[kind]
        meta = checkpoint.read_meta(path, "target" if kind == "small" else kind)
        cfg = checkpoint.config_from_meta(path, meta, field, from_dict)
    else:
        cfg = read_config(path)[0]
    if kind == "eagle3":
        check_fits_target(cfg, target, str(path))
        return cfg
    problems = cfg.fit_problems(target) if kind == "longspec" else fit_problems(cfg, target)
    if problems:
        what = "LongSpec draft" if kind == "longspec" else "draft model"
        raise ValueError(f"{path}: this {what} does not fit the target: {'; '.join(problems)}")
    return cfg


def _is_eagle3_config(config_json: pathlib.Path) -> bool:
    from convert.hf import read_json

    hf = read_json(config_json)
    archs = [str(a).lower() for a in hf.get("architectures") or []]
    return "draft_vocab_size" in hf or "speculators_model_type" in hf or any("eagle" in a for a in archs)


def _small_draft(path: pathlib.Path, dtype, target: Model) -> Any:
    from specpv_jax.draft.small import SmallDraft

    draft_config(path, target.cfg)  # fits the target: checked before the weights are read
    cfg, params = _load_decoder(path, dtype, False, lambda cfg: None)  # it shares the target's tokenizer
    return SmallDraft(cfg, params, str(path))


def _eagle3_from_checkpoint(path: pathlib.Path, target: Model, dtype) -> Any:
    from convert.eagle3 import check_d2t
    from specpv_jax.draft import eagle3

    cfg = draft_config(path, target.cfg)  # fits the target: a head of another width must hold its own embedding
    expected, optional = ({f"params/{k}": v for k, v in shapes.items()} for shapes in draft_param_shapes(cfg))
    expected["d2t"] = (cfg.draft_vocab_size,)
    tree = checkpoint.restore(path, expected, optional)
    return eagle3.Eagle3(cfg, cast_params(tree["params"], dtype, str(path)), check_d2t(tree["d2t"], cfg, str(path)),
                         str(path))


def _longspec_from_checkpoint(path: pathlib.Path, target: Model, dtype) -> Any:
    from specpv_jax.draft import longspec

    cfg = draft_config(path, target.cfg)
    params = checkpoint.restore(path, {f"params/{k}": v for k, v in draft_param_shapes(cfg)[0].items()})
    return longspec.LongSpecDraft(cfg, cast_params(params["params"], dtype, str(path)), str(path))


@under_defaults
def save_draft(draft: Any, out_dir: str | os.PathLike, overwrite: bool = False) -> pathlib.Path:
    """Exports a draft as an orbax checkpoint (`export_eagle3` writes the public layout instead); `overwrite`
    as in `save_target`."""
    if getattr(draft, "kind", None) not in ("eagle3", "small", "longspec"):
        raise TypeError(f"draft must be a draft from sj.load_draft, got {type(draft).__name__}")
    if draft.kind == "small":
        return save_target(Model(draft.cfg, draft.params, source=draft.source), out_dir, overwrite)
    checkpoint.check_destination(out_dir, overwrite, source=draft.source)
    if draft.kind == "longspec":
        meta = {"kind": "longspec", "longspec_config": draft.cfg.to_dict()}
        return checkpoint.save(out_dir, {"params": draft.params}, meta, overwrite=overwrite)
    meta = {"kind": draft.kind, "draft_config": draft.cfg.to_dict()}
    return checkpoint.save(out_dir, {"params": draft.params, "d2t": draft.d2t}, meta, overwrite=overwrite)
