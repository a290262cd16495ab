"""The bundled demo models: real trained weights through the converters, `transformers` parity, the demo."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import numpy as np
import pytest

from test_eagle import make_target

import specpv_jax as sj
from specpv_jax.demo import ASSETS, demo_prompt, run_demo


def test_assets_fit_the_size_limit():
    files = [f for f in ASSETS.rglob("*") if f.is_file()]
    assert {f.name for f in files} >= {"config.json", "model.safetensors", "tokenizer.json", "report.json"}
    assert sum(f.stat().st_size for f in files) <= 40 * 2 ** 20
    for draft in ("small_draft", "longspec", "longspec_plain"):  # the SpecExtend and LongSpec issues' limit
        assert (ASSETS / draft / "model.safetensors").stat().st_size <= 10 * 2 ** 20


@pytest.fixture(scope="module")
def heldout():
    """The demo models, a held-out prompt of 2500 tokens (longer than LongSpec's window and the drafts' training
    windows) and `ar`'s 48 tokens after it, which the lossless modes must reproduce."""
    models = sj.demo_models()
    prompt = demo_prompt(models.tokenizer, 2500)
    return models, prompt, sj.generate(models.target, prompt, 48, eos_token_ids=()).tokens


def test_longspec_is_lossless_with_the_trained_draft(heldout):
    models, prompt, ar_tokens = heldout
    assert models.longspec.kind == "longspec" and models.longspec.cfg.window == 512
    spec = sj.SpecConfig(tree_depth=4, tree_top_k=3, tree_nodes=10)
    out = sj.generate(models.target, prompt, 48, mode="longspec", draft=models.longspec, spec=spec, eos_token_ids=())
    np.testing.assert_array_equal(out.tokens, ar_tokens)
    assert out.stats["mean_accept_len"] > 1.5  # a trained draft: most steps accept drafted tokens


@pytest.mark.torch
def test_bundled_target_matches_transformers_on_heldout_text():
    import torch
    import transformers

    models = sj.demo_models()
    ids = demo_prompt(models.tokenizer, 300)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ASSETS / "target", dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        expected = hf(torch.tensor(ids[None], dtype=torch.long)).logits.numpy()
    ours = sj.forward_logits(models.target, ids[None])
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def test_specextend_is_lossless_with_the_trained_small_draft(heldout):
    models, prompt, ar_tokens = heldout
    assert models.small_draft.kind == "small" and models.small_draft.cfg.num_layers < models.target.cfg.num_layers
    spec = sj.SpecConfig(tree_depth=4, tree_top_k=3, tree_nodes=10, draft_chunks=16, retrieve_every=2)
    out = sj.generate(models.target, prompt, 48, mode="specextend", draft=models.small_draft, spec=spec,
                      eos_token_ids=())
    np.testing.assert_array_equal(out.tokens, ar_tokens)
    assert out.stats["mean_accept_len"] > 1.5  # a trained draft: most steps accept drafted tokens


@pytest.mark.parametrize("spec", [
    sj.SpecConfig(tree_depth=5, tree_top_k=6, tree_nodes=16, retrieval_tokens=512, window_tokens=64),
    sj.SpecConfig(tree_depth=3, tree_top_k=3, tree_nodes=6, retrieval_tokens=64, window_tokens=32,
                  buffer_tokens=8),  # a tiny partial cache and buffer: many full steps and rollbacks
], ids=["512-budget", "tiny-budget"])
def test_exact_equals_ar_on_the_demo_models(spec, heldout):
    models, prompt, ar_tokens = heldout
    exact = sj.generate(models.target, prompt, 48, mode="exact", draft=models.eagle3, spec=spec, eos_token_ids=())
    np.testing.assert_array_equal(exact.tokens, ar_tokens)
    assert exact.stats["partial_verifications"] > 0 and exact.stats["full_verifications"] > 1


@pytest.mark.slow
@pytest.mark.parametrize("context", [8192, 16384])
def test_exact_equals_ar_on_the_demo_models_long(context):
    """The long end of the range (run with `make test-slow`)."""
    models = sj.demo_models()
    prompt = demo_prompt(models.tokenizer, context)
    ar = sj.generate(models.target, prompt, 64, eos_token_ids=())
    spec = sj.SpecConfig(tree_depth=5, tree_top_k=6, tree_nodes=16, retrieval_tokens=context // 4)
    exact = sj.generate(models.target, prompt, 64, mode="exact", draft=models.eagle3, spec=spec, eos_token_ids=())
    np.testing.assert_array_equal(exact.tokens, ar.tokens)
    assert exact.stats["partial_verifications"] > 0


def test_run_demo_prints_a_row_per_mode(capsys):
    """ar, eagle (lossless with the trained head) and specpv on held-out text; the other modes on these models:
    the tests above."""
    models = sj.demo_models()
    assert models.eagle3.cfg.rope.kind == "yarn" and models.tokenizer is models.target.tokenizer
    spec = sj.SpecConfig(tree_depth=4, tree_top_k=4, tree_nodes=12, retrieval_tokens=256, window_tokens=64)
    rows = run_demo(context=600, new_tokens=24, modes=("ar", "eagle", "specpv"), spec=spec, progress=False)
    out = capsys.readouterr().out
    assert [r["mode"] for r in rows] == ["ar", "eagle", "specpv"]
    assert "speedup" in out and "ar wrote" in out and all(f"\n{m:>8} " in out for m in ("ar", "eagle", "specpv"))
    assert ("On a CPU, verifying a tree" in out) == (jax.default_backend() == "cpu")  # why speedups are small
    assert rows[0]["fidelity"] == rows[1]["fidelity"] == 1.0  # eagle's tokens equal ar's
    assert rows[1]["mean_accept_len"] > 1.5  # a trained head: most steps accept drafted tokens
    assert rows[2]["partial"] > 0 and 0.0 <= rows[2]["fidelity"] <= 1.0
    assert "partial cache only past" not in out
    # below sink + retrieval + window specpv runs full verifications only, and the demo says so (ar's loop is
    # the one compiled above: the same shapes)
    rows = run_demo(context=600, new_tokens=24, modes=("ar", "specpv"), progress=False,
                    spec=dataclasses.replace(spec, retrieval_tokens=1024))
    assert rows[1]["partial"] == 0
    assert "verify against the partial cache only past 1120 tokens of context" in capsys.readouterr().out


@pytest.mark.torch  # the bench's transformers peer
def test_bench_writes_json_markdown_and_plot(tmp_path, capsys):
    import torch

    from specpv_jax.cli import main

    assert main(["bench", "--contexts", "300", "--new-tokens", "8", "--modes", "eagle", "specextend",
                 "--tree", "3", "3", "8", "--out", str(tmp_path)]) == 0  # ar runs too: the ratios' baseline
    printed = capsys.readouterr().out
    assert "x1.00 vs ar" in printed and re.search(r"hf .* tok/s  x[\d.]+ vs ar  \(transformers greedy\)", printed)
    assert re.search(r"eagle .* x[\d.]+ vs ar  x[\d.]+ vs hf", printed), printed
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["title"].endswith(f"; transformers: torch {torch.__version__}, {torch.get_num_threads()} threads")
    assert data["contexts"] == [300] and data["pending"] == [] and data["modes"] == ["ar", "eagle", "specextend"]
    assert [(r["context"], r["mode"]) for r in data["rows"]] == [
        (300, m) for m in ("ar", "eagle", "specextend", "transformers", "transformers-assisted")]
    eagle, specextend, assisted = data["rows"][1], data["rows"][2], data["rows"][4]
    assert eagle["tokens_per_s"] > 0 and eagle["accept"] >= 1 and eagle["fidelity"] == 1.0
    assert specextend["accept"] >= 1 and specextend["fidelity"] == 1.0
    assert data["rows"][0]["vs_ar"] == 1.0 and eagle["vs_hf"] > 0 and assisted["tokens_per_s"] > 0
    # A mean over no verifications of a kind is missing, not 0.
    assert eagle["accept_full"] >= 1 and eagle["accept_partial"] is None and data["rows"][0]["accept_full"] is None
    table = (tmp_path / "bench.md").read_text().splitlines()
    assert table[2].startswith("| context | mode |") and len(table) == 4 + 5
    assert table[5].split("|")[7:9] == [f" {eagle['accept_full']:.2f} ", " - "]  # eagle's accept full/partial
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_samples_at_a_temperature(tmp_path, capsys, monkeypatch):
    """--temperature: every mode samples (seed 0), fidelity (a greedy measure) is left out, transformers samples
    from the whole distribution too."""
    from specpv_jax import bench
    from specpv_jax.cli import main

    temperatures, real = [], bench.run_mode
    monkeypatch.setattr(bench, "run_mode", lambda *a: temperatures.append(a[6]) or real(*a))
    assert main(["bench", "--contexts", "300", "--new-tokens", "8", "--modes", "eagle", "--tree", "3", "3", "8",
                 "--temperature", "0.7", "--no-hf", "--out", str(tmp_path)]) == 0
    assert set(temperatures) == {0.7} and len(temperatures) == 2 * (1 + bench.TIMED_ROUNDS)
    assert "fidelity" not in capsys.readouterr().out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["title"].endswith("sampling at temperature 0.7") and len(data["rows"]) == 2
    assert all(r["fidelity"] is None and r["tokens_per_s"] > 0 for r in data["rows"])
    assert bench.hf_decoding(0.7) == dict(do_sample=True, temperature=0.7, top_k=0)
    assert bench.hf_decoding(0.0) == dict(do_sample=False)
    assert main(["bench", "--temperature", "-1"]) == 1  # checked as generate checks it, before any model loads
    assert "temperature must be finite in float32 (at most 3.4e38) and >= 0, got -1.0" in capsys.readouterr().err


@pytest.mark.torch
def test_assisted_timing_is_measured_again_after_a_busy_moment(monkeypatch):
    """transformers' assisted generation timed no slower for 8 tokens than for 1 (a busy moment: the bench test
    failed so while other jobs ran) is measured again; three such rounds in a row are an error."""
    import types

    from specpv_jax import bench

    clock, calls, busy_calls = [0.0], [], [0]

    class Model:
        def generate(self, ids, max_new_tokens, **kwargs):  # 1 s a call while busy, else 10 ms a token
            calls.append(max_new_tokens)
            clock[0] += 1.0 if len(calls) <= busy_calls[0] else 0.01 * max_new_tokens

    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    busy_calls[0] = 1 + 6  # the warm-up and the first round of six
    assert bench.hf_assisted_tokens_per_s(Model(), Model(), np.arange(4), 8) == pytest.approx(7 / 0.07)
    assert len(calls) == 1 + 6 + 6
    calls.clear()
    busy_calls[0] = 1 + 3 * 6
    with pytest.raises(RuntimeError, match="no slower than 1, three times"):
        bench.hf_assisted_tokens_per_s(Model(), Model(), np.arange(4), 8)


def test_bench_keeps_transformers_advice_out_of_its_output():
    """The peers' runs printed transformers' deprecation of generate's arguments and that the demo's small
    draft ran past its trained length."""
    import logging

    import transformers

    from specpv_jax.bench import _transformers_quiet

    logger = transformers.logging.get_logger("transformers.generation.utils")
    before = transformers.logging.get_verbosity()
    with _transformers_quiet():
        assert not logger.isEnabledFor(logging.WARNING) and logger.isEnabledFor(logging.ERROR)
    assert transformers.logging.get_verbosity() == before


@pytest.mark.torch
def test_bench_of_an_orbax_target_deletes_its_transformers_copy(tmp_path, monkeypatch, capsys):
    """transformers' side of the bench needs an HF directory: one exported for the run, deleted after it (an 8B
    model's copy is 16 GB). The modes without their draft are named (they were left out in silence)."""
    import tempfile

    from specpv_jax.cli import main

    target = make_target(64, layers=2)
    sj.save_target(target, tmp_path / "ckpt")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert main(["bench", "--target", str(tmp_path / "ckpt"), "--contexts", "64", "--new-tokens", "4",
                 "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["ar", "transformers"]
    assert not list((tmp_path / "tmp").rglob("*.safetensors"))
    assert ("not run, no draft given for them: eagle (--draft), specpv (--draft), exact (--draft), specextend "
            "(--small-draft), longspec (--longspec-draft)") in capsys.readouterr().out


def test_bench_takes_each_modes_fastest_timed_run_in_turns(monkeypatch):
    """Modes, and transformers beside them, take turns (a slow spell of the machine spreads over them: timed
    apart, transformers' one run gave 28-84 tok/s beside our ar's 464-509); the warm-up round is not reported."""
    from types import SimpleNamespace

    from specpv_jax import bench

    calls, speeds = [], iter([900, 900, 10, 20, 30, 5])  # warm-up ar, eagle; round 1; round 2
    hf_speeds = iter([1000, 7, 9])
    monkeypatch.setattr(bench, "run_mode", lambda *args: calls.append(args[4]) or SimpleNamespace(
        stats={"tokens_per_s": next(speeds)}))
    best, peers = bench.fastest_runs(None, {}, None, 4, ["ar", "eagle"], None,
                                     {"transformers": lambda: calls.append("hf") or next(hf_speeds)})
    assert calls == ["ar", "eagle", "hf"] * 3
    assert {mode: out.stats["tokens_per_s"] for mode, out in best.items()} == {"ar": 30, "eagle": 20}
    assert peers == {"transformers": 9}


def test_bench_pools_its_prompts_runs(tmp_path, monkeypatch):
    """--prompts 2: each context runs each mode on two different prompts; a row's speed is all their decode
    tokens over all their decode time, its accepted lengths weighted by the verifications they average over."""
    from specpv_jax import bench
    from specpv_jax.cli import main

    one = dict(tokens_per_s=100.0, time_s=1.0, steps=40, mean_accept_len=2.5, full_verifications=10,
               mean_accept_len_full=2.0, partial_verifications=30, mean_accept_len_partial=2.0)
    other = dict(one, tokens_per_s=20.0, time_s=3.0, steps=10, mean_accept_len=1.0, partial_verifications=0,
                 mean_accept_len_partial=0.0)
    assert bench.pooled([one, other]) == dict(tokens_per_s=40.0, accept=2.2, accept_full=2.0, accept_partial=2.0,
                                              full=20, partial=30)
    assert bench.pooled([other])["accept_partial"] is None  # a mean over no partial verifications

    target = make_target(64, layers=2)
    sj.save_target(target, tmp_path / "ckpt")
    prompts, real = [], bench.fastest_runs
    monkeypatch.setattr(bench, "fastest_runs", lambda *a: prompts.append(a[2]) or real(*a))
    assert main(["bench", "--target", str(tmp_path / "ckpt"), "--contexts", "40", "48", "--new-tokens", "4",
                 "--prompts", "2", "--no-hf", "--out", str(tmp_path / "out")]) == 0
    assert [p.size for p in prompts] == [40, 40, 48, 48] and not np.array_equal(prompts[0], prompts[1])
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert data["prompts"] == 2 and data["title"].endswith("4 new tokens, 2 prompts per context")
    assert [(r["context"], r["mode"], r["accept"]) for r in data["rows"]] == [(40, "ar", 1.0), (48, "ar", 1.0)]


def test_heldout_prompts_are_different_documents(tmp_path, capsys):
    from specpv_jax.cli import main
    from specpv_jax.demo import heldout_prompts

    tokenizer = sj.demo_models().tokenizer
    prompts = heldout_prompts(tokenizer, 8192, 3)
    assert [p.size for p in prompts] == [8192] * 3 and np.array_equal(prompts[0], demo_prompt(tokenizer, 8192))
    assert len({p[1:64].tobytes() for p in prompts}) == 3  # after the BOS: three texts
    with pytest.raises(ValueError, match=r"\d+ held-out documents have 16384 tokens or more, fewer than the 30 "):
        heldout_prompts(tokenizer, 16384, 30)
    with pytest.raises(ValueError, match="count must be at least 1, got 0"):
        heldout_prompts(tokenizer, 100, 0)
    assert main(["bench", "--contexts", "16384", "--prompts", "30", "--no-hf", "--out", str(tmp_path / "out")]) == 1
    assert "--prompts 30: " in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_bench_reference_tree_modes_run_each_peer_with_its_reference_codes_tree():
    from specpv_jax import bench
    from specpv_jax.longspec import LONGSPEC_TREE
    from specpv_jax.specextend import SPECEXTEND_TREE

    base = sj.SpecConfig(tree_depth=3, tree_top_k=3, tree_nodes=6, retrieval_tokens=512, draft_chunks=8)
    for mode, name, tree, draft in (("specextend-ref", "specextend", SPECEXTEND_TREE, "small"),
                                    ("longspec-ref", "longspec", LONGSPEC_TREE, "longspec")):
        got_name, spec = bench.generate_mode(mode, base)
        assert (got_name, bench.draft_kind(mode)) == (name, draft)
        assert spec == dataclasses.replace(tree, retrieval_tokens=512, draft_chunks=8)  # the rest: the bench's
    assert bench.generate_mode("specextend", base) == ("specextend", base)
    # --spec bounded_draft=true reaches the modes with partial steps only (the others would warn it does nothing)
    bounded = dataclasses.replace(base, bounded_draft=True)
    assert bench.generate_mode("eagle", bounded) == ("eagle", base)
    assert bench.generate_mode("specpv", bounded) == ("specpv", bounded)
    assert bench.generate_mode("ar", bounded) == ("ar", sj.SpecConfig())  # the target alone: no tree, no cache
    for mode in ("specpv", "exact"):
        assert bench.generate_mode(f"{mode}-bd", base) == (mode, bounded)
        assert bench.draft_kind(f"{mode}-bd") == "eagle3"


def test_bench_without_torch_skips_the_transformers_rows(tmp_path, monkeypatch, capsys):
    """torch is optional: without it the bench runs our modes and says why the transformers rows are missing."""
    import sys

    from specpv_jax.cli import main

    target = make_target(64, layers=2)
    sj.save_target(target, tmp_path / "ckpt")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if not installed: find_spec gives None, import fails
    assert main(["bench", "--target", str(tmp_path / "ckpt"), "--contexts", "64", "--new-tokens", "4",
                 "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["ar"] and rows[0]["vs_hf"] is None
    assert "transformers rows skipped: torch is not installed" in capsys.readouterr().out


def test_bench_results_say_which_contexts_ran(tmp_path, monkeypatch):
    """Results are written after each context: a bench failing part-way leaves the contexts measured and those
    pending, and one failing at its first context leaves no earlier bench's rows looking fresh."""
    from specpv_jax import bench
    from specpv_jax.cli import main

    target = make_target(64, layers=2)
    sj.save_target(target, tmp_path / "ckpt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "bench.json").write_text(json.dumps({"contexts": [4096], "rows": [{"context": 4096, "mode": "ar"}]}))
    measure = bench.fastest_runs

    def fails_at(context):
        def fastest_runs(target, drafts, prompt, *args):
            if prompt.size == context:
                raise RuntimeError("out of memory")
            return measure(target, drafts, prompt, *args)
        return fastest_runs

    argv = ["bench", "--target", str(tmp_path / "ckpt"), "--contexts", "40", "48", "--new-tokens", "4", "--no-hf",
            "--out", str(out)]
    for context, done in ((40, []), (48, [40])):
        monkeypatch.setattr(bench, "fastest_runs", fails_at(context))
        with pytest.raises(RuntimeError, match="out of memory"):
            main(argv)
        data = json.loads((out / "bench.json").read_text())
        assert data["contexts"] == done and data["pending"] == [c for c in (40, 48) if c not in done]
        assert [(r["context"], r["mode"]) for r in data["rows"]] == [(c, "ar") for c in done]
        assert len((out / "bench.md").read_text().splitlines()) == 4 + len(done)


def test_bench_refuses_what_generate_would_before_loading_or_writing(tmp_path, capsys, monkeypatch):
    """A setting generate refuses for one of the modes stops the bench before it loads a model or writes its
    results (it loaded every model and wrote empty ones)."""
    from test_eagle import make_head

    from specpv_jax.cli import main

    target = make_target(64, layers=2)
    sj.save_target(target, tmp_path / "target")
    sj.save_draft(make_head(target), tmp_path / "draft")
    monkeypatch.setattr(sj, "load_target", lambda *a, **k: pytest.fail("loaded the target"))
    for extra, message in ((["--spec", "window_tokens=0"], "window_tokens=0 must hold the tree_depth + 1"),
                           (["--tree", "1", "80", "10"], "tree_top_k=80 exceeds the draft's vocabulary of 64")):
        assert main(["bench", "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"),
                     "--modes", "ar", "specpv", "--contexts", "64", "--no-hf", *extra,
                     "--out", str(tmp_path / "out")]) == 1
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()
    assert main(["bench", "--spec", "window_tokens=0", "--out", str(tmp_path / "out")]) == 1  # the demo models
    assert "window_tokens=0 must hold" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_bench_checks_contexts_against_the_model(tmp_path, capsys):
    from specpv_jax.cli import main

    assert main(["bench", "--contexts", "256", "40000", "--out", str(tmp_path / "out")]) == 1
    assert "--contexts 40000 plus 64 new tokens exceed the model's max_position_embeddings (32768)" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bench_refuses_tune_with_a_tree_or_budget(capsys):
    from specpv_jax.cli import main

    for extra in (["--tree", "3", "3", "8"], ["--budget-fraction", "0.5"]):
        assert main(["bench", "--tune", *extra, "--out", "unused"]) == 1
        assert "--tune picks the tree and the retrieval budget itself" in capsys.readouterr().err


def test_bench_takes_spec_fields_but_not_the_ones_it_sets(tmp_path, monkeypatch, capsys):
    from test_eagle import make_head

    from specpv_jax import bench
    from specpv_jax.cli import main

    for item, option in (("retrieval_tokens=64", "--budget-fraction"), ("tree-depth=3", "--tree")):
        assert main(["bench", "--spec", item, "--out", "unused"]) == 1
        assert f"--spec {item!r}: the bench sets {item.split('=')[0].replace('-', '_')} from {option}" in \
            capsys.readouterr().err
    assert main(["bench", "--spec", "tree_beam=maybe", "--out", "unused"]) == 1
    assert "tree_beam takes true or false" in capsys.readouterr().err

    target = make_target(64, layers=2)
    sj.save_target(target, tmp_path / "target")
    sj.save_draft(make_head(target), tmp_path / "draft")
    used = []
    real = bench.fastest_runs
    monkeypatch.setattr(bench, "fastest_runs", lambda *a: used.append(a[5]) or real(*a))
    # buffer_tokens=10 holds this 5-node tree, not the default 61-node one: --tree applies first
    assert main(["bench", "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"),
                 "--contexts", "40", "--new-tokens", "4", "--modes", "ar", "eagle", "specpv-bd", "--no-hf",
                 "--tree", "2", "2", "4", "--spec", "tree_beam=true", "--spec", "buffer_tokens=10",
                 "--spec", "offload=true", "--out", str(tmp_path / "out")]) == 0
    assert [(s.tree_depth, s.tree_top_k, s.tree_nodes, s.tree_beam, s.buffer_tokens) for s in used] == [
        (2, 2, 4, True, 10)]
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    assert [(r["mode"], r["spec"]["tree_beam"], r["spec"]["bounded_draft"], r["spec"]["offload"], r["tree"])
            for r in rows] == [("ar", False, False, False, None), ("eagle", True, False, False, [2, 2, 4]),
                               ("specpv-bd", True, True, True, [2, 2, 4])]  # offload where the mode offloads


def test_bench_tunes_at_each_context(tmp_path, monkeypatch):
    """A budget tuned at the longest context could leave a short one without partial steps: each context gets
    the config tuned on its own prompt, and its rows record it."""
    from test_eagle import make_head

    from specpv_jax.cli import main

    target = make_target(64, layers=2)
    sj.save_target(target, tmp_path / "target")
    sj.save_draft(make_head(target), tmp_path / "draft")
    tuned_for = {40: sj.SpecConfig(tree_depth=2, tree_top_k=2, tree_nodes=3, retrieval_tokens=16),
                 48: sj.SpecConfig(tree_depth=3, tree_top_k=2, tree_nodes=5, retrieval_tokens=32)}
    monkeypatch.setattr(sj.SpecConfig, "tuned", classmethod(lambda cls, t, d, prompt, **_: tuned_for[len(prompt)]))
    assert main(["bench", "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"), "--tune",
                 "--contexts", "40", "48", "--new-tokens", "4", "--modes", "ar", "specpv", "--no-hf",
                 "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    assert [(r["context"], r["tree"], r["retrieval_tokens"]) for r in rows if r["mode"] != "ar"] == [
        (40, [2, 2, 3], 16), (48, [3, 2, 5], 32)]
    assert [r["retrieval_tokens"] for r in rows if r["mode"] == "ar"] == [None, None]  # it had specpv's budget


def test_cli_generate_passes_spec_fields(monkeypatch, capsys):
    import importlib

    from specpv_jax.cli import main

    generate_module = importlib.import_module("specpv_jax.generate")  # the package's `generate` is the function

    specs = []
    real_generate = generate_module.generate

    def recording_generate(*args, spec, **kwargs):
        specs.append(spec)
        return real_generate(*args, spec=spec, **kwargs)

    monkeypatch.setattr(generate_module, "generate", recording_generate)
    assert main(["generate", str(ASSETS / "target"), "--draft", str(ASSETS / "eagle3"), "--mode", "eagle",
                 "--prompt", "def add(a, b):", "--no-chat", "--no-stream", "--max-new-tokens", "6",
                 "--spec", "tree_depth=3", "--spec", "tree_top_k=3", "--spec", "tree_nodes=8"]) == 0
    assert specs == [sj.SpecConfig(tree_depth=3, tree_top_k=3, tree_nodes=8)]
    out = capsys.readouterr()
    assert out.out.strip()  # the generated text
    assert "partial cache" not in out.err
    # specpv on a prompt that never reaches the partial cache says so (its stats showed 0 partial steps, unsaid)
    assert main(["generate", str(ASSETS / "target"), "--draft", str(ASSETS / "eagle3"), "--mode", "specpv",
                 "--prompt", "def add(a, b):", "--no-chat", "--no-stream", "--max-new-tokens", "6",
                 "--spec", "tree_depth=3", "--spec", "tree_top_k=3", "--spec", "tree_nodes=8"]) == 0
    assert re.search(r"note: specpv verifies against the partial cache only past 4256 tokens of context \(sink \+ "
                     r"retrieval \+ window\): at \d+ \+ 6 new tokens every verification is a full one",
                     capsys.readouterr().err)


def test_cli_generate_on_a_cpu_points_to_a_small_tree(capsys):
    """The default tree (7/10/60) ran every speculative mode 2-5x slower than ar on a CPU, unsaid."""
    from specpv_jax.cli import main

    run = ["generate", str(ASSETS / "target"), "--draft", str(ASSETS / "eagle3"), "--mode", "eagle", "--prompt",
           "x", "--max-new-tokens", "100000"]  # refused after the note, before anything compiles
    for tree, noted in (([], True), (["--spec", "tree_nodes=8"], False)):
        assert main([*run, *tree]) == 1
        err = capsys.readouterr().err
        assert ("note: on a CPU the default tree (tree_depth=7, tree_top_k=10, tree_nodes=60, for GPUs) costs more "
                "per step than it saves" in err) == (noted and jax.default_backend() == "cpu"), err
        assert "over the model's max_position_embeddings" in err


def test_cli_reads_a_prompt_file_named_dash_from_stdin(monkeypatch):
    import io

    from specpv_jax import cli

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"a prompt\n")))
    assert cli._read_prompt("-") == "a prompt\n"


def test_cli_mistakes_are_caught_before_any_model_loads(monkeypatch, tmp_path, capsys):
    from specpv_jax import loading
    from specpv_jax.checkpoint import META_FILE
    from specpv_jax.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_target", no_loading)
    monkeypatch.setattr(sj, "load_target", no_loading)
    monkeypatch.setattr(sj, "demo_models", no_loading)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "untokenized").mkdir()
    (tmp_path / "untokenized" / "config.json").write_text("{}")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / META_FILE).write_text("{}")
    target = str(ASSETS / "target")
    for argv, message in [
        (["generate", target, "--prompt", "x", "--mode", "eagle"], "--mode eagle needs --draft DIR"),
        (["generate", target, "--prompt", "x", "--draft", str(ASSETS / "eagle3")], "--mode ar uses no draft"),
        (["generate", target, "--prompt", "x", "--spec", "tree_nodes=30"],
         "--mode ar decodes with the target alone: --spec sets the speculative modes' tree and caches"),
        (["generate", target, "--prompt", "x", "--mode", "eagle", "--draft", str(tmp_path / "nope")], "does not exist"),
        (["generate", target, "--prompt-file", str(tmp_path / "nope.txt")],
         "--prompt-file " + str(tmp_path / "nope.txt") + ": No such file"),
        (["generate", target, "--prompt-file", str(tmp_path)], ": Is a directory"),
        (["generate", str(tmp_path / "untokenized"), "--prompt", "x"], "untokenized has no tokenizer files"),
        (["generate", str(tmp_path / "export"), "--prompt", "x"],
         "directory into " + str(tmp_path / "export" / "tokenizer")),
        (["train-draft", "--target", str(tmp_path / "untokenized"), "--data", "x.txt", "--out", str(tmp_path / "new")],
         "untokenized has no tokenizer files"),
        (["train-draft", "--target", target, "--data", "x.txt", "--out", str(tmp_path / "new"), "--long-steps", "5"],
         "--long-steps set the --long-context fine-tune: add --long-context"),
        (["train-draft", "--target", target, "--data", "x.txt", "--out", str(tmp_path / "new"), "--long-context",
          "65536"], "--long-context 65536 exceeds the target's max_position_embeddings (32768)"),
        # --long-length defaults to --long-context where that is shorter (2048 was refused as too long)
        (["train-draft", "--target", target, "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "new"),
          "--long-context", "1024"], "--data: no such file or directory"),
        (["plan", "--model", str(tmp_path / "afile"), "--context", "9"], "afile is a file; pass the model directory"),
        (["generate", target, "--prompt-file", str(tmp_path / "latin1.txt")], "latin1.txt is not UTF-8 text"),
        # a missing model said "this model has no tokenizer files; pass token ids instead of text"
        (["generate", str(tmp_path / "nomodel"), "--prompt", "x"], f"model directory {tmp_path / 'nomodel'} does not"),
        (["generate", "llama-3.1-8b", "--prompt", "x"], "model directory llama-3.1-8b does not exist"),
        (["generate", str(tmp_path / "afile"), "--prompt", "x"], "afile is a file; pass the model directory"),
        (["generate", target, "--prompt", "x", "--mode", "eagle", "--draft", str(tmp_path / "afile")],
         "afile is a file; pass the draft directory"),  # was: "does not exist"
        # refused before the weights load (they were loaded first)
        (["generate", target, "--prompt", "x", "--mode", "eagle", "--draft", str(ASSETS / "eagle3"), "--spec",
          "offload=true"], "SpecConfig(offload=True) works with modes specpv and exact"),
        # fields a mode does not read, at other values than their defaults, were taken in silence
        (["generate", target, "--prompt", "x", "--mode", "specextend", "--draft", str(ASSETS / "small_draft"),
          "--spec", "tree_nodes=8", "--spec", "retrieval-tokens=256", "--spec", "window_tokens=128", "--spec",
          "offload=true"], "specpv-jax generate: warning: --mode specextend does not read --spec retrieval_tokens "
                           "(read by specpv, exact), offload (read by specpv, exact): no effect\n"),
        # (each refused for its mesh, after the warning)
        (["generate", target, "--prompt", "x", "--mode", "specpv", "--draft", str(ASSETS / "eagle3"), "--spec",
          "full_step_cost=7", "--mesh", "2x4"],
         "warning: --mode specpv does not read --spec full_step_cost (read by exact): no effect"),
        (["generate", target, "--prompt", "x", "--mode", "exact", "--draft", str(ASSETS / "eagle3"), "--spec",
          "full_step_cost=7", "--mesh", "2x4"],
         "warning: --spec full_step_cost has no effect with --temperature 0: greedy exact mode"),
        (["generate", target, "--prompt", "x", "--mode", "longspec", "--draft", str(ASSETS / "eagle3")],
         "mode 'longspec' needs the config of a LongSpec draft, got that of an EAGLE-3 head"),
        (["generate", target, "--prompt", "  "], "the prompt is empty"),
        (["train-draft", "--target", target, "--data", "x.txt", "--out", str(tmp_path / "out")], "already exists"),
        (["train-draft", "--target", target, "--data", "x.txt", "--out", str(tmp_path / "new"),
          "--long-context", "64", "--length", "64"], "--long-context 64 must exceed --length 64"),
        (["train-draft", "--target", target, "--data", "x.txt", "--out", target, "--force"], "delete it"),
        (["train-draft", "--target", target, "--data", "x.txt", "--out", str(tmp_path / "new"), "--save-every",
          "50"], "--save-every sets how often --work DIR is saved: add --work"),
        (["train-draft", "--target", target, "--data", "x.txt", "--out", str(tmp_path / "new"), "--work",
          str(tmp_path / "new" / "ckpt")], "must be separate directories"),
        # found once the target had loaded and the data was tokenized: "[Errno 20] Not a directory"
        (["train-draft", "--target", target, "--data", "x.txt", "--out", str(tmp_path / "new"), "--work",
          str(tmp_path / "afile" / "ckpt")], f"--work {tmp_path / 'afile' / 'ckpt'}: {tmp_path / 'afile'} is a file"),
        (["train-draft", "--target", target, "--data", str(tmp_path / "out" / "keep.txt"), "--out", str(tmp_path),
          "--force"], "is not a model directory"),
        (["train-draft", "--target", target, "--data", "x.txt", "--out", str(tmp_path / "new"), "--length", "4",
          "--unroll", "4"], "--unroll 4 must be below --length 4"),
        (["train-draft", "--target", target, "--data", "x.txt", "--out", str(tmp_path / "new"),
          "--length", "64", "--long-context", "512", "--long-length", "1024"], "--long-length 1024 must not exceed"),
        (["plan", "--model", "llama-3.1-8b", "--context", "131072"], "exceed the model's max_position_embeddings"),
        (["plan", "--model", "llama-3.1-8b", "--context", "9", "--draft", str(tmp_path / "nohead")],
         "draft directory " + str(tmp_path / "nohead") + " does not exist"),
        (["plan", "--model", "llama-3.1-8b", "--context", "9", "--draft", str(ASSETS / "eagle3")],
         "this EAGLE-3 head does not fit the target: vocab_size=4096"),
        (["generate", target, "--prompt", "x", "--mesh", "2x4"], "a 2 x 4 mesh needs 8 devices, 1 given"),
        (["generate", target, "--prompt", "x", "--mesh", "1x2", "--mode", "exact", "--draft", str(ASSETS / "eagle3"),
          "--spec", "offload=true"], "--spec offload=true runs on one device, not a 1x2 mesh: leave out --mesh"),
        (["bench", "--draft", str(ASSETS / "eagle3")], "--draft needs --target"),
        (["bench", "--target", target, "--modes", "ar", "eagle"], "mode eagle needs --draft with --target"),
        (["bench", "--target", target, "--contexts", "40000"],
         "--contexts 40000 plus 64 new tokens exceed the model's max_position_embeddings (32768)"),
        (["bench", "--out", str(tmp_path / "afile")], "is a file"),
        (["bench", "--out", str(tmp_path / "afile" / "results")], "afile is a file"),
    ]:
        assert main(argv) == 1, argv
        assert message in capsys.readouterr().err, argv
    for argv in (["generate", target, "--prompt", "x", "--mode", "fast"], ["generate", target, "--prompt", "x",
                 "--max-new-tokens", "0"], ["plan", "--model", "llama-3.1-8b", "--context", "0"],
                 ["plan", "--model", "llama-3.1-8b", "--context", "9", "--batch", "0"],
                 ["plan", "--model", "llama-3.1-8b", "--context", "9", "--mesh", "2by4"],
                 ["generate", target, "--prompt", "x", "--mesh", "0x8"],
                 ["train-draft", "--target", target, "--data", "x", "--out", "y", "--unroll", "0"],
                 ["train-draft", "--target", target, "--data", "x", "--out", "y", "--work", "w", "--save-every", "0"],
                 ["train-draft", "--target", target, "--data", "x", "--out", "y", "--lr", "nan"],
                 ["bench", "--contexts", "-5"], ["bench", "--new-tokens", "1"],
                 ["bench", "--budget-fraction", "-1"], ["demo", "--context", "-3"],
                 ["demo", "--max-new-tokens", "1"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2, argv
        assert "error: argument" in capsys.readouterr().err, argv


def test_a_failing_stream_callback_raises_its_own_error():
    models = sj.demo_models()
    calls = []

    def stream(new_per_row):
        calls.append(new_per_row)
        raise BrokenPipeError("the reader went away")

    with pytest.raises(BrokenPipeError, match="the reader went away"):
        sj.generate(models.target, [5, 6, 7], 8, stream=stream, eos_token_ids=())
    assert len(calls) == 1  # not called again after it failed
    with pytest.raises(ValueError, match="seed must be a 64-bit signed integer"):
        sj.generate(models.target, [5, 6, 7], 8, seed=2 ** 64)


def test_a_stream_callback_interrupted_raises_keyboard_interrupt():
    """Not an opaque runtime error: a stream function that stops the program (Ctrl-C while printing) does."""
    models = sj.demo_models()

    def stream(new_per_row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sj.generate(models.target, [5, 6, 7], 8, stream=stream, eos_token_ids=())
    assert sj.generate(models.target, [5, 6, 7], 8, eos_token_ids=()).tokens.shape == (1, 8)


def test_a_stream_function_that_streams_another_generate_is_refused():
    """It waited for the lock its own call held: a hang, with nothing said."""
    import threading

    models = sj.demo_models()
    nested = []

    def stream(new_per_row):
        if not nested:
            nested.append(sj.generate(models.target, [5, 6], 2, eos_token_ids=()))  # without stream=: runs
            sj.generate(models.target, [5, 6], 2, stream=print, eos_token_ids=())

    result = {}

    def run():
        try:
            sj.generate(models.target, [5, 6, 7], 4, stream=stream, eos_token_ids=())
        except RuntimeError as e:
            result["error"] = e

    worker = threading.Thread(target=run, daemon=True)  # a hang fails the test, not the run
    worker.start()
    worker.join(120)
    assert not worker.is_alive() and "cannot run inside a stream function" in str(result.get("error"))
    assert nested[0].tokens.shape == (1, 2)


def test_cli_reports_a_run_that_cannot_fit_as_an_error(monkeypatch, capsys):
    from specpv_jax import memory
    from specpv_jax.cli import main

    monkeypatch.setattr(memory, "device_bytes_limit", lambda device=None: 10_000)  # a tiny device
    assert main(["generate", str(ASSETS / "target"), "--prompt", "def add(a, b):", "--no-chat", "--no-stream",
                 "--max-new-tokens", "4"]) == 1
    assert "specpv-jax generate: error: mode 'ar' needs about" in capsys.readouterr().err
