"""Reproduces the bundled demo models end to end: `python -m specpv_jax.train.demo_models`.

Stages (each resumable; a stage whose output exists is skipped):
  1. corpus: the standard library's source (`corpus`), split by the fixed name rule;
  2. tokenizer: byte-level BPE trained on the train split;
  3. target: LLaMA-architecture causal LM at `short_length`, then a YaRN
     fine-tune at `long_length` stretching RoPE to `context` positions;
  4. eagle3: EAGLE-3 head with training-time test at `short_length`, then
     SpecPV's YaRN long-context fine-tune at `long_length`;
  5. small_draft: a much smaller LLaMA with the same tokenizer, for draft-model
     speculation (SpecExtend), trained at `draft_length` tokens only;
  6. longspec: the LongSpec draft, trained on `longspec_length`-token windows
     with anchor-offset positions, and the ablation trained without them;
  7. report: held-out loss, how much 16K-token context helps the target, the
     head's per-step accuracy; written to `report.json` beside the assets.
Assets: `<out>/target` (HF layout + tokenizer), `<out>/eagle3` (public EAGLE-3 layout),
`<out>/small_draft` (HF layout + tokenizer), `<out>/longspec` and `<out>/longspec_plain`
(`convert.longspec` layout). `--only longspec` adds the LongSpec drafts to existing assets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import time

import jax
import numpy as np

from specpv_jax import checkpoint
from specpv_jax.config import ModelConfig, RopeConfig
from specpv_jax.model import init_params
from specpv_jax.train import corpus, eagle, lm, longspec, tokenizer
from specpv_jax.train.trainer import TrainConfig, params_digest

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "assets" / "demo"


@dataclasses.dataclass(frozen=True)
class Recipe:
    vocab_size: int = 4096
    draft_vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 2
    short_length: int = 512
    long_length: int = 2048
    context: int = 32768  # YaRN target (RoPE positions the models are stretched to)
    target_steps: int = 200
    target_batch: int = 16
    target_lr: float = 2e-3
    target_long_steps: int = 25
    target_long_batch: int = 4
    head_steps: int = 200
    head_batch: int = 8
    head_lr: float = 2e-3
    head_long_steps: int = 25
    head_long_batch: int = 2
    unroll: int = 5
    draft_hidden_size: int = 128
    draft_intermediate_size: int = 384
    draft_layers: int = 4
    draft_heads: int = 4
    draft_kv_heads: int = 2
    draft_length: int = 1024
    draft_steps: int = 300
    draft_batch: int = 8
    draft_lr: float = 3e-3
    longspec_window: int = 512
    longspec_length: int = 1024
    longspec_steps: int = 300
    longspec_batch: int = 4
    longspec_lr: float = 2e-3
    eval_context: int = 16384
    seed: int = 0

    def target_config(self, rope: RopeConfig | None = None) -> ModelConfig:
        return ModelConfig(arch="llama", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                           num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                           head_dim=self.hidden_size // self.num_heads, max_position_embeddings=self.context,
                           rope=rope or RopeConfig(theta=500000.0), tie_word_embeddings=True,
                           bos_token_id=0, eos_token_ids=(1,))

    def small_draft_config(self) -> ModelConfig:
        return dataclasses.replace(
            self.target_config(), hidden_size=self.draft_hidden_size,
            intermediate_size=self.draft_intermediate_size, num_layers=self.draft_layers,
            num_heads=self.draft_heads, num_kv_heads=self.draft_kv_heads,
            head_dim=self.draft_hidden_size // self.draft_heads, max_position_embeddings=self.draft_length)

    def long_rope(self) -> RopeConfig:
        return RopeConfig(theta=500000.0, kind="yarn", factor=self.context / self.short_length,
                          original_max_position_embeddings=self.short_length)


# Small enough for a test to run the whole pipeline in about a minute on 2 CPU cores.
TINY = Recipe(vocab_size=384, draft_vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4,
              num_heads=2, num_kv_heads=1, short_length=64, long_length=128, context=1024, target_steps=4,
              target_batch=2, target_long_steps=2, target_long_batch=1, head_steps=4, head_batch=2,
              head_long_steps=2, head_long_batch=1, unroll=3, draft_hidden_size=32, draft_intermediate_size=64,
              draft_layers=2, draft_heads=2, draft_kv_heads=1, draft_length=64, draft_steps=4, draft_batch=2,
              longspec_window=16, longspec_length=64, longspec_steps=4, longspec_batch=2, eval_context=512)


def _log(msg: str) -> None:
    print(f"[demo-models] {msg}", flush=True)


def train_demo_models(out: str | pathlib.Path = ASSETS, work: str | pathlib.Path = "demo_training",
                      recipe: Recipe = Recipe(), docs: list[corpus.Document] | None = None,
                      progress: bool = True) -> dict:
    """Runs every stage; returns the report (also written to `<out>/report.json`)."""
    from convert.eagle3 import export_eagle3
    from convert.hf import export_hf
    from convert.longspec import export_longspec

    out, work = pathlib.Path(out), pathlib.Path(work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"recipe": dataclasses.asdict(recipe), "seconds": {}}
    clock = time.perf_counter()

    def stage_done(name):
        report["seconds"][name] = round(time.perf_counter() - clock, 1)

    docs = docs if docs is not None else corpus.documents()
    train_docs, heldout_docs = corpus.split(docs)
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        _log(f"tokenizer: byte-level BPE, {recipe.vocab_size} ids, on {len(train_docs)} documents")
        tokenizer.train_tokenizer((d.text for d in train_docs), recipe.vocab_size, tok_dir)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    train_ids = corpus.encode_documents(tok, train_docs)
    heldout_ids = corpus.encode_documents(tok, heldout_docs)
    report["corpus"] = {"train_documents": len(train_ids), "train_tokens": int(sum(d.size for d in train_ids)),
                        "heldout_documents": len(heldout_ids),
                        "heldout_tokens": int(sum(d.size for d in heldout_ids))}
    stage_done("tokenizer")

    cfg = recipe.target_config()
    long_cfg = recipe.target_config(recipe.long_rope())
    r = recipe
    _log(f"target: {r.num_layers} layers x {r.hidden_size}, {r.target_steps} steps of "
         f"{r.target_batch} x {r.short_length} tokens")
    params, hist = lm.train_lm(init_params(cfg, jax.random.key(r.seed)), cfg,
                               corpus.batches(train_ids, r.target_batch, r.short_length + 1, r.seed),
                               TrainConfig(r.target_steps, r.target_batch, r.short_length, lr=r.target_lr,
                                           seed=r.seed), work / "target", progress)
    report["target_train_loss"] = float(np.mean([h["loss"] for h in hist[-10:]])) if hist else None
    stage_done("target")
    _log(f"target: YaRN x{long_cfg.rope.factor:g} fine-tune, {r.target_long_steps} steps of "
         f"{r.target_long_batch} x {r.long_length} tokens")
    params, _ = lm.train_lm(params, long_cfg,
                            corpus.batches(train_ids, r.target_long_batch, r.long_length + 1, r.seed + 1),
                            TrainConfig(r.target_long_steps, r.target_long_batch, r.long_length,
                                        lr=r.target_lr / 10, warmup=5, seed=r.seed), work / "target_long",
                            progress, desc="target-yarn", run={"start": params_digest(params)}, restart_on=("start",))
    stage_done("target_long")

    _log(f"eagle3: TTT x{r.unroll}, {r.head_steps} steps of {r.head_batch} x {r.short_length} tokens, then "
         f"YaRN to {r.context} positions, {r.head_long_steps} steps of {r.head_long_batch} x {r.long_length}")
    head, _ = eagle.train_eagle3(
        params, long_cfg, train_ids, r.draft_vocab_size,
        TrainConfig(r.head_steps, r.head_batch, r.short_length, lr=r.head_lr, seed=r.seed),
        TrainConfig(r.head_long_steps, r.head_long_batch, r.long_length, lr=r.head_lr / 10, warmup=5, seed=r.seed),
        r.context, r.unroll, work, progress, restart_on=("target",))
    draft_ids = head.d2t + np.arange(head.cfg.draft_vocab_size)
    stage_done("eagle3_long")

    small_cfg, small_params = train_small_draft(train_ids, r, work, progress)
    stage_done("small_draft")
    longspec_drafts = train_longspec_drafts(params, long_cfg, train_ids, r, work, progress)
    stage_done("longspec")

    _log("report: held-out evaluation")
    report["heldout"] = evaluate(params, long_cfg, head, draft_ids, heldout_ids, r)
    report["heldout"]["small_draft_loss"] = held_out_loss(small_params, small_cfg, heldout_ids, r.draft_length)
    report["heldout"]["longspec"] = longspec_accuracy(longspec_drafts, params, long_cfg, heldout_ids, r)
    stage_done("report")

    staging = work / "assets"
    export_hf(staging / "target", long_cfg, params, overwrite=True)
    export_eagle3(staging / "eagle3", head.cfg, head.params, head.d2t, overwrite=True)
    export_hf(staging / "small_draft", small_cfg, small_params, overwrite=True)
    for name, draft in longspec_drafts.items():
        export_longspec(staging / name, draft.cfg, draft.params, overwrite=True)
    for name in ("target", "small_draft"):
        for file in checkpoint.TOKENIZER_FILES:
            if (tok_dir / file).is_file():
                shutil.copy2(tok_dir / file, staging / name / file)
    (staging / "report.json").write_text(json.dumps(report, indent=2))
    with checkpoint.atomic_directory(out, overwrite=True, replaceable=_is_bundle) as tmp:
        for item in staging.iterdir():
            shutil.move(str(item), tmp / item.name)
    _log(f"wrote {out}")
    return report


def _is_bundle(path: pathlib.Path) -> bool:
    """Whether `path` holds a bundle of demo models (which `train_demo_models` may replace)."""
    return (path / "report.json").is_file()


def train_small_draft(train_ids: list[np.ndarray], r: Recipe, work: pathlib.Path, progress: bool = True):
    """The small draft model: a causal LM like the target, trained only on `r.draft_length`-token windows."""
    cfg = r.small_draft_config()
    _log(f"small draft: {r.draft_layers} layers x {r.draft_hidden_size}, {r.draft_steps} steps of "
         f"{r.draft_batch} x {r.draft_length} tokens")
    params, _ = lm.train_lm(init_params(cfg, jax.random.key(r.seed + 7)), cfg,
                            corpus.batches(train_ids, r.draft_batch, r.draft_length + 1, r.seed + 7),
                            TrainConfig(r.draft_steps, r.draft_batch, r.draft_length, lr=r.draft_lr, seed=r.seed),
                            work / "small_draft", progress, desc="small-draft")
    return cfg, params


def train_longspec_drafts(params, cfg: ModelConfig, train_ids: list[np.ndarray], r: Recipe, work: pathlib.Path,
                          progress: bool = True) -> dict:
    """{"longspec": trained with anchor-offset positions, "longspec_plain": the same without them (ablation)}."""
    tc = TrainConfig(r.longspec_steps, r.longspec_batch, r.longspec_length, lr=r.longspec_lr, warmup=30, seed=r.seed)
    drafts = {}
    for name, anchor in (("longspec", True), ("longspec_plain", False)):
        _log(f"{name}: {r.longspec_steps} steps of {r.longspec_batch} x {r.longspec_length} tokens, "
             f"window {r.longspec_window}, anchor-offset positions {'on' if anchor else 'off'}")
        drafts[name], _ = longspec.train_longspec(params, cfg, train_ids, tc, anchor, r.longspec_window,
                                                  work / name, progress, desc=name, restart_on=("target",))
    return drafts


def longspec_accuracy(drafts: dict, params, cfg: ModelConfig, heldout_ids: list[np.ndarray], r: Recipe) -> dict:
    """Held-out argmax agreement with the target (lag 1) at positions 0.. and with the first 4 tokens as a
    sink 16K positions before the rest (long-context distances; a uniform shift alone changes nothing
    under RoPE)."""
    import jax.numpy as jnp

    ids = next(corpus.batches(heldout_ids, 4, r.longspec_length, seed=1234))
    out = {}
    for name, draft in drafts.items():
        for offset in (0, min(16384, cfg.max_position_embeddings - r.longspec_length)):
            positions = np.arange(r.longspec_length, dtype=np.int32)
            positions[longspec.MAX_SINK:] += offset
            positions = np.broadcast_to(positions, ids.shape)
            _, m = longspec.loss(draft.params, draft.cfg, params, cfg, jnp.asarray(ids), jnp.asarray(positions),
                                 jnp.ones((ids.shape[0],), jnp.int32))
            out[f"{name}_acc_sink_gap_{offset}"] = round(float(m["acc"]), 4)
    return out


def add_longspec(out: str | pathlib.Path = ASSETS, work: str | pathlib.Path = "demo_training",
                 recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    """The longspec stage alone, over existing assets: trains both drafts for `<out>/target`, writes
    `<out>/longspec`, `<out>/longspec_plain` and their figures into `<out>/report.json`."""
    from transformers import AutoTokenizer

    from convert.longspec import export_longspec
    from specpv_jax.loading import load_target

    out, work = pathlib.Path(out), pathlib.Path(work)
    target = load_target(out / "target", progress=False)
    tok = AutoTokenizer.from_pretrained(str(out / "target"), local_files_only=True)
    train_docs, heldout_docs = corpus.split(corpus.documents())
    train_ids, heldout_ids = corpus.encode_documents(tok, train_docs), corpus.encode_documents(tok, heldout_docs)
    clock = time.perf_counter()
    drafts = train_longspec_drafts(target.params, target.cfg, train_ids, recipe, work, progress)
    seconds = round(time.perf_counter() - clock, 1)
    report = json.loads((out / "report.json").read_text())
    report["recipe"] = dataclasses.asdict(recipe)
    report["seconds"]["longspec"] = seconds
    report["heldout"]["longspec"] = longspec_accuracy(drafts, target.params, target.cfg, heldout_ids, recipe)
    for name, draft in drafts.items():
        export_longspec(out / name, draft.cfg, draft.params, overwrite=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def held_out_loss(params, cfg: ModelConfig, heldout_ids: list[np.ndarray], length: int) -> float:
    import jax.numpy as jnp

    windows = next(corpus.batches(heldout_ids, 4, length + 1, seed=1234))
    return float(lm.lm_loss(params, cfg, jnp.asarray(windows))[0])


def evaluate(params, cfg: ModelConfig, head, draft_ids, heldout_ids: list[np.ndarray], r: Recipe) -> dict:
    """Held-out figures: next-token loss, long-context gain at `r.eval_context`, head accuracy per TTT step."""
    import jax.numpy as jnp

    windows = next(corpus.batches(heldout_ids, 4, r.short_length + 1, seed=1234))
    loss, _ = lm.lm_loss(params, cfg, jnp.asarray(windows))
    _, acc = eagle.ttt_loss(head.params, head.cfg, params, cfg, jnp.asarray(draft_ids),
                            jnp.asarray(windows[:, :-1]), r.unroll)
    out = {"loss": float(loss), "head_accuracy": [round(float(acc[f"acc{j}"]), 4) for j in range(r.unroll)]}
    long_docs = corpus.long_documents(heldout_ids, r.eval_context)
    if long_docs:
        gain = lm.context_gain(params, cfg, long_docs[:3], r.eval_context, short=r.short_length // 2,
                               scored=r.short_length)
        out[f"context_{r.eval_context}"] = {k: round(v, 4) for k, v in gain.items()}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ASSETS), help="where the assets go (default: the package's assets/demo)")
    p.add_argument("--work", default="demo_training", help="tokenizer, checkpoints for resuming")
    p.add_argument("--tiny", action="store_true", help="a minute-long smoke run with tiny models")
    p.add_argument("--only", choices=["longspec"], help="run one stage over existing assets")
    args = p.parse_args(argv)
    recipe = TINY if args.tiny else Recipe()
    if args.only == "longspec":
        report = add_longspec(args.out, args.work, recipe)
    else:
        report = train_demo_models(args.out, args.work, recipe)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
