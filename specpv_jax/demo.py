"""The bundled demo models and `specpv-jax demo`.

`demo_models()` loads the small target, its EAGLE-3 head, small draft model and LongSpec drafts shipped in
`specpv_jax/assets/demo` (trained on the Python standard library's source by
`python -m specpv_jax.train.demo_models`). The demo continues a held-out
standard-library document (16K tokens by default) with every mode and
prints speed, acceptance and fidelity side by side.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, NamedTuple

import jax
import numpy as np

from specpv_jax import text
from specpv_jax.config import MODES, PARTIAL_MODES, DraftConfig, ModelConfig, RopeConfig, SpecConfig
from specpv_jax.draft import eagle3
from specpv_jax.jax_settings import under_defaults
from specpv_jax.loading import Model, load_draft, load_target
from specpv_jax.model import init_params

ASSETS = pathlib.Path(__file__).resolve().parent / "assets" / "demo"
# A small tree: on a 2-core CPU and this small target, the default 7/10/60 tree costs more per step than the
# tokens it saves (BENCHMARKS.md, "Demo models"). Pass spec=SpecConfig() for the paper's tree.
DEMO_SPEC = SpecConfig(tree_depth=3, tree_top_k=3, tree_nodes=6)


class DemoModels(NamedTuple):
    """target; eagle3: its EAGLE-3 head (eagle, specpv, exact); tokenizer; small_draft: a much smaller
    model with the same tokenizer (specextend); longspec: the LongSpec draft, longspec_plain: its
    ablation trained without anchor-offset positions (longspec)."""

    target: Model
    eagle3: eagle3.Eagle3
    tokenizer: Any
    small_draft: Any
    longspec: Any
    longspec_plain: Any


@functools.lru_cache(maxsize=4)
@under_defaults
def demo_models(dtype: str = "float32") -> DemoModels:
    """The bundled demo target, its drafts and tokenizer, loaded in `dtype` (e.g. "bfloat16") and ready for
    `generate`; cached, so a second call returns the same models."""
    dirs = [ASSETS / name for name in ("target", "eagle3", "small_draft", "longspec", "longspec_plain")]
    for d in dirs:
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"demo model {d} is missing; rebuild the assets with "
                                    f"`python -m specpv_jax.train.demo_models` (see its docstring)")
    target = load_target(dirs[0], dtype=dtype, progress=False)
    return DemoModels(target, load_draft(dirs[1], target), target.tokenizer,
                      *(load_draft(d, target) for d in dirs[2:]))


def demo_prompt(tokenizer, length: int) -> np.ndarray:
    """The first `length` tokens of the longest held-out standard-library document (never trained on)."""
    return heldout_prompts(tokenizer, length)[0]


def heldout_prompts(tokenizer, length: int, count: int = 1, option: str = "count") -> list[np.ndarray]:
    """The first `length` tokens of each of the `count` longest held-out standard-library documents (never
    trained on), longest first: distinct texts, for figures that do not hang on one document. `option`: what
    an error calls `count` (a CLI option's name)."""
    if length < 1:
        raise ValueError(f"a prompt needs at least one token, got length {length}")
    if count < 1:
        raise ValueError(f"{option} must be at least 1, got {count}")
    docs = _heldout_documents(tokenizer)
    if docs[0].size < length:
        raise ValueError(f"the longest held-out document has {docs[0].size} tokens, fewer than {length}")
    long_enough = [d for d in docs if d.size >= length]
    if len(long_enough) < count:
        raise ValueError(f"{option} {count}: {len(long_enough)} held-out documents have {length} tokens or more, "
                         f"fewer than the {count} prompts asked for")
    return [d[:length].copy() for d in long_enough[:count]]


@functools.lru_cache(maxsize=2)
def _heldout_documents(tokenizer) -> list[np.ndarray]:
    """The held-out documents' token ids, longest first."""
    from specpv_jax.train import corpus

    _, heldout = corpus.split(corpus.documents())  # reads the whole standard library: seconds
    return sorted(corpus.encode_documents(tokenizer, heldout), key=len, reverse=True)


DEMO_CONFIG = ModelConfig(arch="llama", vocab_size=2048, hidden_size=256, intermediate_size=768, num_layers=4,
                          num_heads=8, num_kv_heads=2, head_dim=32, max_position_embeddings=32768,
                          rope=RopeConfig(theta=500000.0))


def random_demo_model(seed: int = 0) -> Model:
    """A random-weight model shaped like a small LLaMA (speed benchmarks without the assets)."""
    return Model(DEMO_CONFIG, init_params(DEMO_CONFIG, jax.random.key(seed)), source="random")


def random_head(target: Model, seed: int = 1) -> eagle3.Eagle3:
    """A random EAGLE-3 head shaped like the target's layers."""
    cfg = target.cfg
    dcfg = DraftConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                       vocab_size=cfg.vocab_size, draft_vocab_size=cfg.vocab_size,
                       target_hidden_size=cfg.hidden_size,
                       feature_layers=DraftConfig.default_feature_layers(cfg.num_layers), rope=cfg.rope)
    return eagle3.Eagle3(dcfg, eagle3.init_params(dcfg, jax.random.key(seed), target.dtype),
                         eagle3.identity_d2t(dcfg), source="random")


def draft_for(models: DemoModels, mode: str):
    """The demo draft a mode runs with (None for "ar")."""
    return {"ar": None, "specextend": models.small_draft, "longspec": models.longspec}.get(mode, models.eagle3)


def run_demo(context: int = 16384, new_tokens: int = 128, modes: tuple[str, ...] = MODES,
             spec: SpecConfig | None = None, progress: bool = True) -> list[dict]:
    """Continues a held-out module's source (`context` tokens) with each of `modes` on the demo models and
    prints the code written, then a table: tokens/s, speedup over the first mode, mean accepted length,
    full/partial verifications and fidelity (share of tokens equal to the full-context target's greedy
    choice). Returns the table's rows."""
    from tqdm.auto import tqdm

    from specpv_jax.generate import fidelity, generate

    if new_tokens < 2:
        raise ValueError(f"the demo needs at least 2 new tokens (the first comes from the prefill, the speeds "
                         f"from the rest), got {new_tokens}")
    models = demo_models()
    prompt = demo_prompt(models.tokenizer, context)
    print(f"specpv-jax demo: a {models.target.cfg.num_layers}-layer target with its EAGLE-3 head, a "
          f"{models.small_draft.cfg.num_layers}-layer draft model and a LongSpec draft, trained on the Python "
          f"standard library, "
          f"continue {context} tokens of a held-out module's source.")
    rows, outputs = [], {}
    for mode in tqdm(modes, desc="modes", disable=not progress):
        out = generate(models.target, prompt, max_new_tokens=new_tokens, mode=mode, draft=draft_for(models, mode),
                       spec=spec or DEMO_SPEC, eos_token_ids=())
        outputs[mode] = out
        lossless_match = mode != "specpv" and modes[0] == "ar" and np.array_equal(out.tokens, outputs["ar"].tokens)
        s = out.stats
        rows.append({"mode": mode, "tokens_per_s": s["tokens_per_s"], "mean_accept_len": s["mean_accept_len"],
                     "full": s["full_verifications"], "partial": s["partial_verifications"],
                     "fidelity": 1.0 if lossless_match else fidelity(models.target, prompt, out)})
    base = rows[0]["tokens_per_s"]
    first = outputs[modes[0]]
    print(f"\n--- {modes[0]} wrote ({first.lengths[0]} tokens) ---\n"
          f"{text.decode(models.tokenizer, first.tokens[0, :first.lengths[0]].tolist())}\n---\n")
    width = max(8, *(len(m) for m in modes))
    print(f"{'mode':>{width}} {'tok/s':>8} {'speedup':>8} {'accept':>7} {'full':>5} {'partial':>8} {'fidelity':>9}")
    for r in rows:
        print(f"{r['mode']:>{width}} {r['tokens_per_s']:>8.1f} {r['tokens_per_s'] / base:>7.2f}x "
              f"{r['mean_accept_len']:>7.2f} {r['full']:>5} {r['partial']:>8} {r['fidelity']:>9.3f}")
    threshold = (spec or DEMO_SPEC).partial_threshold
    if context + new_tokens <= threshold and any(mode in PARTIAL_MODES for mode in modes):
        print(f"\nspecpv and exact verify against the partial cache only past {threshold} tokens of context "
              f"(sink + retrieval + window): at {context} + {new_tokens} new tokens every verification is a full "
              f"one (try --context {max(16384, 2 * threshold)}).")
    if jax.default_backend() == "cpu":
        print(CPU_NOTE)
    return rows


CPU_NOTE = """
On a CPU, verifying a tree of drafted tokens costs compute in proportion to its
tokens, so speculation gains little or nothing over `ar` (on some CPUs it is
slower); on a GPU with a large model, verifying 60 tokens costs about one `ar`
step (the regime the papers report; on an H200 at Llama-3.1-8B shapes, 1.2x
at 16K: BENCHMARKS.md). One run per mode: speeds on a shared machine vary;
`specpv-jax bench` repeats them."""
