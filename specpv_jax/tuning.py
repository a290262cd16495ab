"""Picking SpecPV's tree size and partial budget for this device by timing candidates.

SpecPV picks its node count from {40, 48, 50, 56, 60} by timing the target on a
GPU. Here every candidate runs a short real generation (so the timing includes
drafting, acceptance and the switching between full and partial steps): first
the tree shapes at a default budget, then the partial budgets with the best
tree, keeping the fastest budget whose fidelity stays above `min_fidelity` (if none does, the most
faithful, with a warning).
Candidates within `TIE` of the fastest count as tied (timing noise): the
smaller tree, or the larger budget, wins a tie, so repeated tuning agrees more often.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from specpv_jax.config import ConfigError, SpecConfig
from specpv_jax.warning import warn

# (tree_depth, tree_top_k, tree_nodes). A 2-core CPU is compute-bound in verification: small trees win there.
GPU_TREES = ((7, 10, 40), (7, 10, 48), (7, 10, 50), (7, 10, 56), (7, 10, 60))
CPU_TREES = ((4, 4, 8), (5, 6, 16), (6, 8, 24), (6, 8, 32))
BUDGETS = (1024, 2048, 4096)
TIE = 0.03  # relative speed difference below which two candidates count as equally fast


@dataclasses.dataclass(frozen=True)
class Trial:
    spec: SpecConfig
    tokens_per_s: float
    mean_accept_len: float
    fidelity: float | None


def _budget(spec: SpecConfig, retrieval: int, context: int) -> SpecConfig | None:
    """`spec` with that retrieval budget, or None when the context is too short for partial steps to start."""
    candidate = dataclasses.replace(spec, retrieval_tokens=retrieval)
    return candidate if candidate.partial_threshold < context else None


def tune(target: Any, draft: Any, context: int | Sequence[int], mode: str = "specpv",
         trees: Sequence[tuple[int, int, int]] | None = None, budgets: Sequence[int] = BUDGETS,
         new_tokens: int = 32, min_fidelity: float = 0.99, base: SpecConfig | None = None,
         verbose: bool = False, progress: bool = True) -> tuple[SpecConfig, list[Trial]]:
    """Returns the fastest `SpecConfig` found and every trial. If no budget keeps `min_fidelity`, the most
    faithful one, with a `SpecPVWarning`.

    context: a prompt (token ids `[T]`, or `[B, T]` for rows of one length) or a length, for which random ids
    are used.
    trees: (depth, top_k, nodes) candidates (default: SpecPV's set on GPU/TPU, small trees on CPU).
    verbose: prints each trial; progress: a progress bar over the trials (each compiles and runs twice).
    """
    from specpv_jax.generate import draft_vocab_size, fidelity, generate

    if isinstance(context, (int, np.integer)) and not isinstance(context, bool):
        if context < 1:
            raise ValueError(f"context must be a positive length or token ids, got {context}")
        prompt = np.random.default_rng(0).integers(0, target.cfg.vocab_size, int(context))
    else:
        prompt = np.asarray(context)
        if prompt.ndim not in (1, 2) or not np.issubdtype(prompt.dtype, np.integer):
            raise ValueError(f"context must be a length or token ids [T] or [B, T], got an array of shape "
                             f"{prompt.shape}, dtype {prompt.dtype}")
    length = prompt.shape[-1]  # a row's: partial steps start once every row is past the threshold
    trees = trees or (CPU_TREES if jax.default_backend() == "cpu" else GPU_TREES)
    base = base or SpecConfig()
    trials: list[Trial] = []

    def run(spec: SpecConfig, with_fidelity: bool) -> Trial:
        # The first run of a fresh executable pays one-time costs; the second is the one timed.
        out = max((generate(target, prompt, new_tokens, draft=draft, mode=mode, spec=spec, eos_token_ids=())
                   for _ in range(2)), key=lambda o: o.stats["tokens_per_s"])
        trial = Trial(spec, out.stats["tokens_per_s"], out.stats["mean_accept_len"],
                      fidelity(target, prompt, out) if with_fidelity else None)
        trials.append(trial)
        bar.update()
        if verbose:
            print(f"  depth {spec.tree_depth} top-k {spec.tree_top_k} nodes {spec.tree_nodes} retrieval "
                  f"{spec.retrieval_tokens}: {trial.tokens_per_s:.1f} tok/s, accept {trial.mean_accept_len:.2f}"
                  + (f", fidelity {trial.fidelity:.3f}" if trial.fidelity is not None else ""))
        return trial

    usable = [b for b in budgets if _budget(base, b, length) is not None]
    default_budget = max(usable) if usable else base.retrieval_tokens
    vocab = draft_vocab_size(target.cfg, draft.cfg)

    def candidate(depth: int, top_k: int, nodes: int) -> SpecConfig | None:
        """`base` with this tree, where it is a valid SpecConfig (its buffer holds the tree) that the draft can
        fill (a node's children within its vocabulary)."""
        try:
            spec = dataclasses.replace(base, tree_depth=depth, tree_top_k=top_k, tree_nodes=nodes,
                                       retrieval_tokens=default_budget)
        except ConfigError:
            return None
        return spec if spec.tree_branching <= vocab else None

    candidates = [spec for spec in (candidate(*tree) for tree in trees) if spec is not None]
    if not candidates:
        branching = "tree_top_k**2 (a beam tree below level 1)" if base.tree_beam else "tree_top_k"
        raise ValueError(f"no candidate tree fits: each needs {branching} <= the draft's {vocab} tokens"
                         + (f" and tree_nodes < buffer_tokens={base.buffer_tokens}" if base.buffer_tokens else ""))
    bar = tqdm(total=len(candidates) + len(usable), desc="tuning", unit="trial", leave=False, disable=not progress)
    tree_trials = [run(spec, False) for spec in candidates]
    best = _fastest(sorted(tree_trials, key=lambda t: t.spec.tree_nodes)).spec
    if not usable:  # the context is below every budget's threshold: partial steps never start
        bar.close()
        if verbose:
            print(f"  {length} tokens: too short for partial steps with any budget in {list(budgets)} "
                  f"(each needs a context past sink + budget + window); tuned the tree only")
        return best, trials
    budget_trials = [run(dataclasses.replace(best, retrieval_tokens=b), True) for b in usable]
    bar.close()
    good = [t for t in budget_trials if t.fidelity >= min_fidelity]
    if not good:
        good = [max(budget_trials, key=lambda t: t.fidelity)]
        warn(f"no partial budget in {list(usable)} kept fidelity >= {min_fidelity} at {length} tokens; tuned to the "
             f"most faithful, retrieval_tokens={good[0].spec.retrieval_tokens} (fidelity {good[0].fidelity:.3f})")
    return _fastest(sorted(good, key=lambda t: -t.spec.retrieval_tokens)).spec, trials


def _fastest(trials: list[Trial]) -> Trial:
    """The first of `trials` within `TIE` of the fastest."""
    top = max(t.tokens_per_s for t in trials)
    return next(t for t in trials if t.tokens_per_s >= (1 - TIE) * top)
