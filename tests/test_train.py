"""Training: corpus, tokenizer, the optax loop, LM and EAGLE-3 (training-time test) losses, the demo pipeline."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specpv_jax as sj
from specpv_jax import model
from specpv_jax.checkpoint import CheckpointError
from specpv_jax.config import ModelConfig, RopeConfig
from specpv_jax.draft import eagle3
from specpv_jax.speculative import flat_features
from specpv_jax.train import corpus, demo_models, eagle, lm, tokenizer
from specpv_jax.train.trainer import TrainConfig, fit, params_digest

TINY_CFG = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
                       num_kv_heads=2, head_dim=8, max_position_embeddings=512, rope=RopeConfig(theta=10000.0))


def _fake_stdlib(root):
    (root / "pkg").mkdir()
    (root / "pkg" / "__init__.py").write_text("from .b import name\n")
    (root / "pkg" / "b.py").write_text("name = 1\n")
    (root / "pkg" / "tests").mkdir()
    (root / "pkg" / "tests" / "test_b.py").write_text("assert True\n")
    (root / "encodings").mkdir()
    (root / "encodings" / "cp1.py").write_text("table = ()\n")
    (root / "mod.py").write_text("def f():\n    return 2\n")
    return root


def test_corpus_documents_concatenate_packages_and_skip_tests(tmp_path):
    docs = corpus.documents(_fake_stdlib(tmp_path))
    assert [d.name for d in docs] == ["mod", "pkg"]
    pkg = docs[1].text
    assert pkg.index("# file: pkg/__init__.py") < pkg.index("# file: pkg/b.py")
    assert "assert True" not in pkg and "table" not in "".join(d.text for d in docs)
    with pytest.raises(FileNotFoundError, match="no Python source"):
        corpus.documents(tmp_path / "pkg" / "tests" / "none")


def test_documents_encode_without_a_bos_token():
    class QwenLike:  # Qwen tokenizers have no BOS
        bos_token_id, eos_token_id = None, 7

        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [[len(t), 3] for t in texts]}

    docs = corpus.encode_documents(QwenLike(), [corpus.Document("a.txt", "abc")])
    assert [d.tolist() for d in docs] == [[3, 3, 7]]


def test_split_is_a_fixed_rule_on_names():
    docs = [corpus.Document(f"m{i}", "x") for i in range(200)]
    train, heldout = corpus.split(docs)
    assert 5 <= len(heldout) <= 40 and len(train) + len(heldout) == 200
    assert [d.name for d in corpus.split(list(reversed(docs)))[1]] == [d.name for d in reversed(heldout)]
    real_train, real_heldout = corpus.split(corpus.documents())
    assert {d.name for d in real_heldout} >= {"tarfile", "datetime", "pickle"}  # long prompts for the demo


def test_batches_are_windows_of_the_stream():
    docs = [np.arange(10, dtype=np.int32), np.arange(100, 150, dtype=np.int32)]
    stream = np.concatenate(docs)
    batch = next(corpus.batches(docs, 4, 8, seed=0))
    assert batch.shape == (4, 8) and batch.dtype == np.int32
    for row in batch:
        start = int(np.flatnonzero(stream == row[0])[0])
        np.testing.assert_array_equal(row, stream[start:start + 8])
    with pytest.raises(ValueError, match="fewer than one sequence"):
        next(corpus.batches(docs, 1, 100, seed=0))


def test_tokenizer_round_trips_and_loads_with_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    texts = ["def add(a, b):\n    return a + b\n", "class Foo:\n    pass\n"] * 20
    tokenizer.train_tokenizer(texts, 300, tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    ids = tok("def add(x):\n\treturn x  # é")["input_ids"]
    assert ids[0] == tok.bos_token_id == 0 and tok.eos_token_id == 1
    assert tok.decode(ids, skip_special_tokens=True) == "def add(x):\n\treturn x  # é"
    assert max(ids) < len(tok)
    with pytest.raises(ValueError, match="too small"):
        tokenizer.train_tokenizer(texts, 100)


def test_read_text_files_takes_text_and_says_what_it_skipped(tmp_path):
    """A directory's hidden files (.git), the run's own output, binary or non-UTF-8 files and empty ones are not
    trained on (they were: U+FFFD for every undecodable byte); a named file that is not text is an error."""
    data = tmp_path / "data"
    (data / ".git" / "objects").mkdir(parents=True)
    (data / ".git" / "objects" / "pack").write_bytes(b"\x00\xff" * 50)
    (data / "work").mkdir()
    (data / "work" / "step.json").write_text("{}")
    (data / "a.py").write_text("x = 1\n")
    (data / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    (data / "empty.txt").write_text("  \n")
    files = corpus.read_text_files([data, data / "a.py"], exclude=(data / "work",))
    assert [d.name for d in files.docs] == [str((data / "a.py").resolve())]  # once, though named twice
    assert files.not_text == [str((data / "image.png").resolve())]
    assert files.empty == [str((data / "empty.txt").resolve())]
    with pytest.raises(ValueError, match=r"image\.png is not UTF-8 text \(byte 0\)"):
        corpus.read_text_files([data / "image.png"])
    with pytest.raises(ValueError, match=r"no text to train on \(1 files: 1 empty, 0 not UTF-8 text\)"):
        corpus.read_text_files([data / "empty.txt"])
    with pytest.raises(FileNotFoundError, match="no such file or directory: .*missing.txt"):
        corpus.read_text_files([data / "missing.txt"])


def test_train_draft_refuses_a_tokenizer_the_model_is_too_small_for(tmp_path, capsys):
    """Token ids at or past the model's vocabulary ended in "loss became nan ... lower the learning rate"."""
    import transformers
    from test_eagle import make_target

    import specpv_jax as sj
    from specpv_jax.cli import main
    from specpv_jax.demo import ASSETS

    target = make_target(64, layers=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ASSETS / "target")
    sj.save_target(dataclasses.replace(target, tokenizer=tokenizer), tmp_path / "target")
    (tmp_path / "a.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    assert main(["train-draft", "--target", str(tmp_path / "target"), "--data", str(tmp_path / "a.txt"),
                 "--out", str(tmp_path / "head"), "--steps", "1", "--length", "16"]) == 1
    assert "gives token ids the model does not have" in capsys.readouterr().err
    assert not (tmp_path / "head").exists()


def _repeating_batches(batch, length):
    pattern = np.array([5, 9, 2, 7, 7, 3, 11, 4], np.int32)
    rng = np.random.default_rng(0)
    while True:
        starts = rng.integers(0, len(pattern), batch)
        yield np.stack([np.roll(np.tile(pattern, length // 8 + 2), -s)[:length] for s in starts])


def test_lm_training_learns_a_pattern_and_resumes(tmp_path):
    params = model.init_params(TINY_CFG, jax.random.key(0))
    tc = TrainConfig(steps=40, batch=4, length=32, lr=1e-2, warmup=5, save_every=20)
    trained, history = lm.train_lm(params, TINY_CFG, _repeating_batches(4, 33), tc, tmp_path / "ckpt", progress=False)
    assert history[-1]["loss"] < 0.3 * history[0]["loss"]
    # A longer run over the same directory resumes at step 40: only 5 new steps.
    _, more = lm.train_lm(params, TINY_CFG, _repeating_batches(4, 33), dataclasses.replace(tc, steps=45),
                          tmp_path / "ckpt", progress=False)
    assert len(more) == 5 and more[0]["loss"] < 0.5 * history[0]["loss"]


def test_a_resumed_run_continues_the_batch_stream(tmp_path, capsys):
    def loss(p, batch):
        return jnp.sum((p["w"] - batch) ** 2), {}

    def batches(stop_at=None):
        for i in range(100):
            if i == stop_at:
                raise KeyboardInterrupt
            yield np.full(3, float(i), np.float32)

    tc = TrainConfig(10, 1, 1, lr=0.1, warmup=1, save_every=5)
    straight, _ = fit(loss, {"w": jnp.zeros(3)}, batches(), tc, progress=False)
    with pytest.raises(KeyboardInterrupt):  # no checkpoint directory: says so, and how to get one
        fit(loss, {"w": jnp.zeros(3)}, batches(stop_at=3), tc)
    assert "train: interrupted; nothing saved (a checkpoint directory, train-draft's --work DIR, makes a run " \
           "resumable)" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):  # stopped at step 8, saved at 5
        fit(loss, {"w": jnp.zeros(3)}, batches(stop_at=8), tc, checkpoint_dir=tmp_path / "w")
    assert f"train: interrupted; {tmp_path / 'w'} holds step 5: the same command resumes there" in \
        capsys.readouterr().err
    resumed, history = fit(loss, {"w": jnp.zeros(3)}, batches(), tc, checkpoint_dir=tmp_path / "w")
    assert len(history) == 5
    assert f"train: resuming at step 5 of 10 from {tmp_path / 'w'} (saved every 5 steps)" in capsys.readouterr().err
    np.testing.assert_allclose(resumed["w"], straight["w"], rtol=1e-6)
    again, history = fit(loss, {"w": jnp.zeros(3)}, batches(), tc, checkpoint_dir=tmp_path / "w", progress=False)
    assert history == [] and np.array_equal(again["w"], resumed["w"])  # a finished run: nothing to do
    with pytest.raises(ValueError, match="holds step 10, beyond the 8 steps asked for"):  # not a silent 10
        fit(loss, {"w": jnp.zeros(3)}, batches(), dataclasses.replace(tc, steps=8), checkpoint_dir=tmp_path / "w",
            progress=False)
    with pytest.raises(ValueError, match=r"another training run \(its train differ"):  # (no "data" recorded)
        fit(loss, {"w": jnp.zeros(3)}, batches(), dataclasses.replace(tc, lr=0.2), checkpoint_dir=tmp_path / "w",
            progress=False, run={"data": "other"})
    (tmp_path / "w" / "run.json").write_text('{"train": ')  # damaged: the error names it (it said "Expecting value")
    with pytest.raises(ValueError, match=f"{tmp_path / 'w' / 'run.json'} is damaged"):
        fit(loss, {"w": jnp.zeros(3)}, batches(), tc, checkpoint_dir=tmp_path / "w", progress=False)
    # Interrupted before a run shorter than --save-every saved its only step, its last: that step is named.
    with pytest.raises(KeyboardInterrupt):
        fit(loss, {"w": jnp.zeros(3)}, batches(stop_at=2), dataclasses.replace(tc, save_every=200),
            checkpoint_dir=tmp_path / "short")
    assert "nothing saved yet (the first save is at step 10)" in capsys.readouterr().err


def test_a_failed_save_names_the_directory_and_the_step_to_resume(tmp_path, monkeypatch):
    """A full disk under --work: one error naming the directory and the step a rerun resumes from (it was
    TensorStore's RESOURCE_EXHAUSTED after 31 tracebacks of orbax's writer threads)."""
    import orbax.checkpoint as ocp

    def loss(p, batch):
        return jnp.sum((p["w"] - batch) ** 2), {}

    save = ocp.CheckpointManager.save

    def fills_the_disk(manager, step, *args, **kwargs):
        if step > 5:
            raise ValueError('RESOURCE_EXHAUSTED: Error writing "opt.1.0.mu": No space left on device')
        return save(manager, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", fills_the_disk)
    message = f"cannot save the training state to {tmp_path / 'w'}: RESOURCE_EXHAUSTED: .*; the same command resumes"
    with pytest.raises(CheckpointError, match=message + " from step 5"):
        fit(loss, {"w": jnp.zeros(3)}, iter([np.ones(3, np.float32)] * 10), TrainConfig(10, 1, 1, save_every=5),
            checkpoint_dir=tmp_path / "w", progress=False)


def test_fit_progress_bar_ends_on_the_last_steps_metrics(capsys):
    """Metrics are read a step late; the last step's reach the bar before it closes (it showed the one before)."""
    def loss(p, batch):
        return jnp.sum((p["w"] - batch) ** 2), {}

    _, history = fit(loss, {"w": jnp.zeros(3)}, iter([np.ones(3)] * 4), TrainConfig(4, 1, 1, lr=0.1, warmup=1),
                     desc="quadratic")
    last_line = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "4/4" in last_line and f"loss={history[-1]['loss']:.3f}" in last_line, last_line


def test_fit_stops_on_a_non_finite_loss():
    def loss(p, batch):
        return jnp.sum(p["w"]) * jnp.nan, {}

    with pytest.raises(FloatingPointError, match="step 0"):
        fit(loss, {"w": jnp.ones(3)}, iter([np.zeros(1)] * 3), TrainConfig(3, 1, 1), progress=False)


def test_a_non_finite_loss_at_a_save_step_is_not_saved(tmp_path):
    """Metrics are read a step late (no wait per step), except before a save."""
    import orbax.checkpoint as ocp

    def loss(p, batch):
        return jnp.sum(p["w"] * batch[0]), {}

    batches = iter([np.ones(1), np.ones(1), np.full(1, np.nan), np.ones(1)])
    with pytest.raises(FloatingPointError, match="step 2; lower the learning rate and start again in another "
                                                 f"checkpoint directory \\({tmp_path} holds this run's steps"):
        fit(loss, {"w": jnp.ones(3)}, batches, TrainConfig(4, 1, 1, save_every=3), checkpoint_dir=tmp_path,
            progress=False)
    assert ocp.CheckpointManager(tmp_path).latest_step() is None
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(0, 1, 1)


def test_token_losses_match_the_training_loss():
    params = model.init_params(TINY_CFG, jax.random.key(1))
    ids = np.asarray(jax.random.randint(jax.random.key(2), (77,), 0, TINY_CFG.vocab_size), np.int32)
    per_token = lm.token_losses(params, TINY_CFG, ids, chunk=16)  # cached, chunked inference path
    full, _ = lm.lm_loss(params, TINY_CFG, jnp.asarray(ids[None]))  # cache-free training path
    assert per_token.shape == (76,)
    np.testing.assert_allclose(per_token.mean(), float(full), rtol=1e-5)
    gain = lm.context_gain(params, TINY_CFG, [ids], 77, short=8, scored=16)
    assert set(gain) == {"long", "short", "gain", "documents"} and gain["documents"] == 1
    with pytest.raises(ValueError, match="no document"):
        lm.context_gain(params, TINY_CFG, [ids], 500)


def test_draft_vocabulary_takes_the_most_frequent_ids():
    docs = [np.array([3, 3, 3, 7, 7, 1, 9], np.int32), np.array([9, 9, 9, 9], np.int32)]
    ids = eagle.draft_vocabulary(docs, 12, 3)
    np.testing.assert_array_equal(ids, [3, 7, 9])
    d2t = eagle3.d2t_from_token_ids(ids)
    np.testing.assert_array_equal(np.arange(3) + d2t, ids)


@pytest.mark.parametrize("variant", [{}, {"sliding_window": 3, "norm_output": True}], ids=["reference", "windowed"])
def test_ttt_unroll_matches_drafting_attention(variant):
    """Step j at slot n of the training unroll == the head run as at inference: pairs 0..n committed to its
    cache, then j drafted levels each attending to the cache, its ancestors and itself (with a sliding
    window, the cache within it by position, at every level)."""
    head = eagle.new_head(TINY_CFG, np.arange(48, dtype=np.int32), seed=3)
    head = dataclasses.replace(head, cfg=dataclasses.replace(head.cfg, **variant))
    params = model.init_params(TINY_CFG, jax.random.key(4))
    embed = params["embed_tokens"]["embedding"]
    t, n, steps = 12, 6, 3
    ids = jax.random.randint(jax.random.key(5), (1, t), 0, TINY_CFG.vocab_size)
    out = model.forward(params, TINY_CFG, ids, lm.positions_for(ids), None, capture_layers=head.cfg.feature_layers)
    features = flat_features(out.features)
    trained = eagle.unroll(head.params, head.cfg, embed, features, ids, steps)

    cache = eagle3.empty_cache(head.cfg, 1, 64, head.params)
    cache, last, _, _ = eagle3.advance(head.params, head.cfg, embed, cache, features[:, :n + 1], ids[:, 1:n + 2],
                                       jnp.array([n + 1]))
    np.testing.assert_allclose(trained[0][0, n], last[0], atol=1e-5)
    hidden, k_buf, v_buf = last[:, None], None, None
    for j in range(1, steps):
        mask = jnp.ones((1, 1, j), bool)
        hidden, k, v, _ = eagle3.head_forward(head.params, head.cfg, embed, ids[:, n + j + 1: n + j + 2], hidden,
                                              jnp.array([[n + j]]), cache, mask, k_buf, v_buf, write=False)
        k_buf = k if k_buf is None else jnp.concatenate([k_buf, k], axis=2)
        v_buf = v if v_buf is None else jnp.concatenate([v_buf, v], axis=2)
        np.testing.assert_allclose(trained[j][0, n], hidden[0, 0], atol=1e-5)


def test_head_training_raises_accuracy():
    params = model.init_params(TINY_CFG, jax.random.key(6))
    head = eagle.new_head(TINY_CFG, np.arange(TINY_CFG.vocab_size, dtype=np.int32), seed=7)
    ids = jnp.asarray(next(_repeating_batches(4, 32)))
    draft_ids = jnp.arange(TINY_CFG.vocab_size)
    before, m0 = eagle.ttt_loss(head.params, head.cfg, params, TINY_CFG, draft_ids, ids, 3)
    trained, _ = eagle.train_head(head, params, TINY_CFG, np.arange(TINY_CFG.vocab_size),
                                  _repeating_batches(4, 32), TrainConfig(30, 4, 32, lr=1e-2, warmup=3), steps=3,
                                  progress=False)
    after, m1 = eagle.ttt_loss(trained.params, trained.cfg, params, TINY_CFG, draft_ids, ids, 3)
    assert float(after) < float(before) - 0.4  # the bound is the random target's entropy, not 0
    assert float(m1["acc2"]) > float(m0["acc2"]) + 0.3
    with pytest.raises(ValueError, match="draft_ids"):
        eagle.train_head(head, params, TINY_CFG, np.arange(5), _repeating_batches(4, 32), TrainConfig(1, 4, 32))


def test_the_frozen_target_goes_to_the_training_step_as_an_argument(monkeypatch):
    """Closed over by the loss, the target's weights were compiled into the jitted step as constants: a second
    copy of the target in host memory (32 GB for an 8B target in float32) and a compile several times slower."""
    import re

    from specpv_jax.train import trainer

    params = model.init_params(TINY_CFG, jax.random.key(6))
    head = eagle.new_head(TINY_CFG, np.arange(TINY_CFG.vocab_size, dtype=np.int32), seed=7)
    lowered, jit = [], jax.jit

    def lowering_jit(fn, **options):
        jitted = jit(fn, **options)

        def call(*args):
            lowered.append(jitted.lower(*args).as_text())
            return jitted(*args)
        return call

    monkeypatch.setattr(trainer.jax, "jit", lowering_jit)
    eagle.train_head(head, params, TINY_CFG, np.arange(TINY_CFG.vocab_size), _repeating_batches(4, 32),
                     TrainConfig(1, 4, 32), steps=2, progress=False)
    constants = [len(c) // 2 for text in lowered for c in re.findall(r'dense<"0x([0-9A-F]+)"', text)]
    assert lowered and max(constants, default=0) < 1024, sorted(constants)[-3:]  # the embedding alone: 8 KiB


def test_a_head_checkpoint_is_not_resumed_for_another_target(tmp_path):
    """A work directory holds a head trained against one target: another target of the same shapes (a base
    model's instruct tune) is refused rather than resumed on other features."""
    head = eagle.new_head(TINY_CFG, np.arange(TINY_CFG.vocab_size, dtype=np.int32), seed=7)
    tc = TrainConfig(2, 2, 16, save_every=1)
    for seed, steps in ((6, 1), (6, 2), (8, 2)):
        target = model.init_params(TINY_CFG, jax.random.key(seed))
        run = lambda **kw: eagle.train_head(head, target, TINY_CFG, np.arange(TINY_CFG.vocab_size),  # noqa: E731
                                            _repeating_batches(2, 16), dataclasses.replace(tc, steps=steps),
                                            steps=2, checkpoint_dir=tmp_path, progress=False, **kw)
        if seed == 6:
            run()
        else:
            with pytest.raises(ValueError, match=r"another training run \(its target differ"):
                run()
    # A recipe whose earlier phase made the target (the demo models' YaRN target) starts the head over instead.
    with pytest.warns(sj.SpecPVWarning, match=r"its target changed\): it starts over"):
        _, history = run(restart_on=("target",))
    assert len(history) == 2


def test_positions_the_draft_vocabulary_cannot_hit_count_as_misses_and_train_nothing():
    """Where the target's argmax lies outside the draft vocabulary no draft token can be accepted: accuracy
    counts a miss there (it scored the argmax within the draft vocabulary: 0.73 with 2 draft tokens on a random
    target), and the loss leaves the position out (as EAGLE-3 does)."""
    params = model.init_params(TINY_CFG, jax.random.key(6))
    head = eagle.new_head(TINY_CFG, np.arange(TINY_CFG.vocab_size, dtype=np.int32), seed=7)
    ids = jnp.asarray(next(_repeating_batches(4, 32)))
    out = model.forward(params, TINY_CFG, ids, jnp.broadcast_to(jnp.arange(32), ids.shape), None)
    tops = set(np.asarray(jnp.argmax(model.logits(params, TINY_CFG, out.hidden), -1)).ravel().tolist())
    never = jnp.asarray([i for i in range(TINY_CFG.vocab_size) if i not in tops][:2], jnp.int32)
    small = eagle.new_head(TINY_CFG, np.asarray(never), seed=7)
    loss, metrics = eagle.ttt_loss(small.params, small.cfg, params, TINY_CFG, never, ids, 3)
    assert float(loss) == 0.0 and all(float(metrics[f"acc{j}"]) == 0.0 for j in range(3))
    # With every id in the draft vocabulary, a hit is the draft's token mapped back equal to the target's.
    _, metrics = eagle.ttt_loss(head.params, head.cfg, params, TINY_CFG, jnp.arange(TINY_CFG.vocab_size), ids, 3)
    assert 0.0 <= float(metrics["acc0"]) <= 1.0


def test_a_corpus_too_short_for_the_long_phase_fails_before_any_training(monkeypatch):
    monkeypatch.setattr(eagle, "train_head", lambda *a, **k: pytest.fail("trained before checking the data"))
    docs = [np.arange(300, dtype=np.int32) % TINY_CFG.vocab_size]
    params = model.init_params(TINY_CFG, jax.random.key(0))
    with pytest.raises(ValueError, match="corpus has 300 tokens, fewer than one sequence of 400"):
        eagle.train_eagle3(params, TINY_CFG, docs, 48, TrainConfig(5, 2, 32), TrainConfig(5, 1, 400), 1024,
                           progress=False)


def test_yarn_config_stretches_the_head():
    head = eagle.new_head(TINY_CFG, np.arange(48, dtype=np.int32))
    cfg = eagle.yarn_config(head.cfg, 128, 1024)
    assert cfg.rope.kind == "yarn" and cfg.rope.factor == 8 and cfg.rope.original_max_position_embeddings == 128
    with pytest.raises(ValueError, match="must exceed"):
        eagle.yarn_config(head.cfg, 128, 64)


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """The whole demo recipe at tiny size over a few standard-library documents."""
    root = tmp_path_factory.mktemp("demo")
    docs = [d for d in corpus.documents() if d.name in {"argparse", "json", "calendar", "copy", "tarfile", "glob"}]
    report = demo_models.train_demo_models(root / "out", root / "work", demo_models.TINY, docs, progress=False)
    return root / "out", report


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tiny_assets):
    """Assets load with the public loaders and eagle == ar on them."""
    import specpv_jax as sj

    out, report = tiny_assets
    assert (out / "report.json").is_file()
    assert set(report["heldout"]) >= {"loss", "head_accuracy", "context_512"}
    target = sj.load_target(out / "target")
    head = sj.load_draft(out / "eagle3", target)
    assert target.cfg.rope.kind == "yarn" and head.cfg.rope.kind == "yarn" and target.tokenizer is not None
    ids = target.tokenizer("import os\n")["input_ids"]
    spec = sj.SpecConfig(tree_depth=3, tree_top_k=3, tree_nodes=8)
    ar = sj.generate(target, ids, max_new_tokens=12, mode="ar", eos_token_ids=())
    eg = sj.generate(target, ids, max_new_tokens=12, mode="eagle", draft=head, spec=spec, eos_token_ids=())
    np.testing.assert_array_equal(ar.tokens, eg.tokens)


@pytest.mark.slow
def test_cli_train_draft(tiny_assets, tmp_path, capsys):
    import specpv_jax as sj
    from specpv_jax.cli import main

    out, _ = tiny_assets
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.py").write_text("def f(x):\n    return x + 1\n" * 40)
    args = ["train-draft", "--target", str(out / "target"), "--out", str(tmp_path / "head"), "--steps", "3",
            "--batch", "2", "--length", "32", "--unroll", "2", "--draft-vocab", "100"]
    assert main(args + ["--data", str(data / "missing.txt")]) == 1
    assert "missing.txt" in capsys.readouterr().err
    assert main(args + ["--data", str(data), "--long-context", "1024", "--long-length", "32"]) == 1
    assert "--long-length 32 must exceed --length 32" in capsys.readouterr().err
    assert main(args + ["--data", str(data), "--long-context", "1024", "--long-length", "1000"]) == 1
    assert "fewer than one --long-length window of 1000" in capsys.readouterr().err
    assert main(args + ["--data", str(data), "--long-context", "1024", "--long-steps", "2", "--long-length",
                        "64"]) == 0
    head = sj.load_draft(tmp_path / "head", sj.load_target(out / "target"))
    assert head.cfg.draft_vocab_size == 100 and head.cfg.rope.kind == "yarn" and head.cfg.rope.factor == 32
    # Run again over a finished run's --work: the head is written again, no new steps (a KeyError before).
    work = ["--data", str(data), "--work", str(tmp_path / "work"), "--force"]
    assert main(args + work) == 0
    capsys.readouterr()
    assert main(args + work) == 0
    assert "held the finished run: no new steps" in capsys.readouterr().out
    # --work inside (here: equal to) --data: its checkpoints are left out of the data, not the whole of --data
    assert main(args + ["--data", str(data), "--work", str(data), "--force"]) == 0
    assert "no text to train on" not in capsys.readouterr().err


def test_cli_reports_an_interrupt_in_one_line(monkeypatch, capsys):
    from specpv_jax import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_demo", interrupted)
    assert cli.main(["demo"]) == 130
    assert capsys.readouterr().err == "specpv-jax demo: interrupted\n"


def test_the_command_ends_at_once_after_an_interrupt(monkeypatch):
    """After Ctrl-C the `specpv-jax` command leaves with os._exit(130): interrupted mid-compilation, the
    interpreter's shutdown crashed (6 of 6 train-draft runs, 2 of 3 generate runs exited 139, a segfault)."""
    from specpv_jax import cli

    exits = []
    monkeypatch.setattr(cli.os, "_exit", exits.append)
    for status, left in ((130, [130]), (0, [])):
        monkeypatch.setattr(cli, "main", lambda status=status: status)
        exits.clear()
        with pytest.raises(SystemExit):  # os._exit patched: entry goes on to sys.exit
            cli.entry()
        assert exits == left


def test_an_interrupt_in_a_gc_callback_is_raised_again(monkeypatch):
    """Ctrl-C that lands in a garbage-collector callback (JAX runs one at each full collection) is printed as
    'Exception ignored' and dropped by Python: a `convert` interrupted while loading went on to the end. The
    command's unraisable-exception hook raises it again in the main thread."""
    import gc
    import signal
    import sys
    import time

    from specpv_jax import cli

    passed_on = []
    monkeypatch.setattr(sys, "unraisablehook", cli.redeliver_interrupts(passed_on.append))
    armed = [True]

    def ctrl_c_while_collecting(phase, info):
        if phase == "stop" and armed:
            armed.clear()
            signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    gc.callbacks.append(ctrl_c_while_collecting)
    try:
        with pytest.raises(KeyboardInterrupt):
            gc.collect()
            time.sleep(10)  # the interrupt comes back within it
    finally:
        gc.callbacks.remove(ctrl_c_while_collecting)
        signal.signal(signal.SIGINT, previous)
    assert not armed and passed_on == []


def test_train_draft_save_every_reaches_both_stages(tmp_path, monkeypatch):
    from specpv_jax.cli import main
    from specpv_jax.demo import ASSETS
    from specpv_jax.train import eagle

    seen = []

    def capture(params, cfg, docs, vocab, short, long, *rest):
        seen.extend([short, long])
        raise KeyboardInterrupt  # stop before training; main reports it (exit status 130)

    monkeypatch.setattr(eagle, "train_eagle3", capture)
    (tmp_path / "a.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    args = ["train-draft", "--target", str(ASSETS / "target"), "--data", str(tmp_path / "a.txt"), "--out",
            str(tmp_path / "head"), "--length", "16", "--long-context", "64", "--work", str(tmp_path / "work")]
    assert main(args + ["--save-every", "7"]) == 130
    assert [tc.save_every for tc in seen] == [7, 7]
    seen.clear()
    assert main(args) == 130
    assert [tc.save_every for tc in seen] == [TrainConfig.save_every] * 2


def test_a_later_phase_starts_over_when_its_starting_weights_changed(tmp_path):
    """Two chained phases, each resumable: extending the first changes the second's starting weights, so the
    second starts over (it resumed its old final state, throwing the extra training away). Only keys named
    in restart_on do that: other differences, and the same one not named, are refused."""
    def loss(p, batch):
        return jnp.sum((p["w"] - batch) ** 2), {}

    def batches():
        return (np.full(3, float(i), np.float32) for i in range(100))

    second = TrainConfig(3, 1, 1, lr=0.05, warmup=1)

    def recipe(first_steps, work):
        first, _ = fit(loss, {"w": jnp.zeros(3)}, batches(), TrainConfig(first_steps, 1, 1, lr=0.1, warmup=1),
                       checkpoint_dir=work / "first", progress=False)
        return fit(loss, first, batches(), second, desc="second", checkpoint_dir=work / "second", progress=False,
                   run={"start": params_digest(first)}, restart_on=("start",))

    recipe(2, tmp_path / "w")
    with pytest.warns(sj.SpecPVWarning, match="second: .* held this run trained from an earlier phase's older "
                                              "output \\(its start changed\\): it starts over"):
        extended, history = recipe(5, tmp_path / "w")
    straight, _ = recipe(5, tmp_path / "fresh")
    assert len(history) == 3
    np.testing.assert_allclose(extended["w"], straight["w"], rtol=1e-6)
    for tc, restart_on in ((dataclasses.replace(second, lr=0.5), ("start",)), (second, ())):
        with pytest.raises(ValueError, match=r"another training run \(its start(, train)? differ"):
            fit(loss, {"w": jnp.ones(3)}, batches(), tc, checkpoint_dir=tmp_path / "w" / "second", progress=False,
                run={"start": "other"}, restart_on=restart_on)


def test_params_digest_tells_weights_apart_from_a_sample():
    big = jax.random.normal(jax.random.key(0), (300, 500))
    assert params_digest({"a": big}) == params_digest({"a": big + 0})
    assert params_digest({"a": big}) != params_digest({"a": big * 1.001})  # a fine-tune moves every weight
    assert params_digest({"a": big}) != params_digest({"b": big})
    assert params_digest({"a": big}) != params_digest({"a": big.astype(jnp.bfloat16)})


def test_a_record_from_an_older_version_checks_the_keys_it_holds(tmp_path):
    """A work directory whose run.json predates a key (the target's digest, say) resumes, and records it from then
    on; a key it holds is still checked."""
    import json

    def loss(p, batch):
        return jnp.sum((p["w"] - batch) ** 2), {}

    def batches():
        return (np.full(3, float(i), np.float32) for i in range(100))

    tc = TrainConfig(2, 1, 1, lr=0.1, warmup=1)
    fit(loss, {"w": jnp.zeros(3)}, batches(), tc, checkpoint_dir=tmp_path, progress=False, run={"data": "d"})
    record = json.loads((tmp_path / "run.json").read_text())
    (tmp_path / "run.json").write_text(json.dumps({"train": record["train"]}))  # as an older version wrote it
    _, history = fit(loss, {"w": jnp.zeros(3)}, batches(), dataclasses.replace(tc, steps=3), checkpoint_dir=tmp_path,
                     progress=False, run={"data": "d", "target": "t"})
    assert len(history) == 1 and json.loads((tmp_path / "run.json").read_text())["target"] == "t"
    with pytest.raises(ValueError, match=r"its target differ"):
        fit(loss, {"w": jnp.zeros(3)}, batches(), dataclasses.replace(tc, steps=4), checkpoint_dir=tmp_path,
            progress=False, run={"data": "d", "target": "u"})
