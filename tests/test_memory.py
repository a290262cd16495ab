"""Memory estimates (`specpv-jax plan`) and generate's refusal before allocating."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from test_eagle import make_head, make_target

import specpv_jax as sj
from specpv_jax import memory, presets
from specpv_jax.cache import KVCache
from specpv_jax.demo import ASSETS
from specpv_jax.config import ModelConfig
from specpv_jax.model import init_params

LLAMA_31_8B = presets.hf_config("llama-3.1-8b")


def compiled_peak(exe) -> int:
    """Bytes one device holds at a compiled stage's peak: its arguments, outputs not aliasing them, temporaries."""
    m = exe.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


@pytest.mark.parametrize("qwen3_like", [False, True])
def test_param_count_matches_the_model(qwen3_like):
    cfg = make_target(16, layers=2).cfg
    if qwen3_like:
        cfg = dataclasses.replace(cfg, qkv_bias=True, qk_norm=True, tie_word_embeddings=True)
    params = init_params(cfg, jax.random.key(0))
    assert memory.param_count(cfg) == sum(x.size for x in jax.tree.leaves(params))


def test_full_cache_estimate_is_what_generate_allocates():
    cfg = make_target(16, layers=2).cfg
    est = memory.estimate(cfg, 1000, 64, batch=2, mode="ar", dtype="float32")
    cache = KVCache.for_model(cfg, 2, 1000 + 64 + 1)
    assert est.parts["full cache"] == cache.k.nbytes + cache.v.nbytes
    spec = sj.SpecConfig(retrieval_tokens=512)
    specpv = memory.estimate(cfg, 1000, 64, batch=2, mode="exact", spec=spec, dtype="float32")
    assert specpv.host == specpv.parts["full cache"] + specpv.parts["block summaries"] < specpv.total
    assert est.host == 0  # offload is a SpecPV option
    # A context that cannot pass sink + retrieval + window runs the eagle loop: its memory, in specpv's name
    short = memory.estimate(cfg, 1000, 64, batch=2, mode="specpv", spec=sj.SpecConfig(), dtype="float32")
    assert (short.mode, short.parts) == ("specpv", memory.estimate(cfg, 1000, 64, batch=2, mode="eagle",
                                                                   dtype="float32").parts)


def test_bounded_draft_cache_estimate_is_what_specpv_allocates():
    from specpv_jax import retrieval

    cfg = make_target(16, layers=2).cfg
    spec = sj.SpecConfig(tree_depth=4, tree_top_k=4, tree_nodes=12, retrieval_tokens=256, bounded_draft=True)
    est = memory.estimate(cfg, 1000, 64, batch=2, mode="specpv", spec=spec, dtype="float32")
    head_cache = KVCache.empty(1, 2, cfg.num_kv_heads, 1000, cfg.head_dim, np.float32)
    bounded = retrieval.empty_partial(head_cache, spec, extra=spec.tree_depth + 1)  # as specpv builds it
    assert est.parts["bounded draft cache"] == bounded.k.nbytes + bounded.v.nbytes
    unbounded = memory.estimate(cfg, 1000, 64, batch=2, mode="specpv", spec=dataclasses.replace(
        spec, bounded_draft=False), dtype="float32")
    assert est.total - unbounded.total == est.parts["bounded draft cache"]
    offloaded = [memory.estimate(cfg, 1000, 64, batch=2, mode="specpv", dtype="float32",
                                 spec=dataclasses.replace(spec, offload=True, bounded_draft=bounded))
                 for bounded in (True, False)]
    assert offloaded[0].device - offloaded[1].device == est.parts["bounded draft cache"]  # on the device


def test_estimate_covers_what_the_compiled_stages_take():
    """A long prefill chunk's attention scores grow with its square (the XLA path); the estimate counts them."""
    from specpv_jax import host

    target = make_target(16, layers=2)
    ids = np.arange(1024) % 16
    host._EXECUTABLES.clear()
    sj.generate(target, ids, 8, prefill_chunk=1024, eos_token_ids=(), attention="xla")
    est = memory.estimate(target.cfg, 1024, 8, mode="ar", dtype="float32", prefill_chunk=1024)
    for exe in host._EXECUTABLES.values():
        assert compiled_peak(exe) <= est.total, est.parts


@pytest.mark.parametrize("mode, heads, vocab, temperature, top_p, top_k, spec", [
    ("ar", 16, 64, 0.0, 1.0, 0, None),  # 8 KV heads: each holds its own prefix score tile
    # top-p and top-k sampling hold probabilities, their sorted copy and its prefix sums beside the logits;
    # exact mode's full steps verify the provisional tokens too, and keep their partial distributions
    ("exact", 4, 8192, 1.0, 0.9, 20, sj.SpecConfig(sink_tokens=16, retrieval_tokens=32, window_tokens=16)),
    # a beam tree drafts from 64 nodes per level: its draft logits outgrow the 9-node verification's
    ("eagle", 4, 32768, 0.0, 1.0, 0, sj.SpecConfig(tree_depth=3, tree_top_k=8, tree_nodes=8, tree_beam=True)),
    # a top-k tree's levels each hold their draft log-probabilities only while they draft (a NaN check on them
    # kept every level's to the end: 33.5 MB compiled against 29.7 estimated)
    ("eagle", 4, 32768, 0.0, 1.0, 0, sj.SpecConfig(tree_depth=4, tree_top_k=8, tree_nodes=8)),
    # offloaded, prefill holds the prompt's hidden states and features; a full step two layers and what it keeps
    ("exact", 4, 64, 0.0, 1.0, 0, sj.SpecConfig(sink_tokens=16, retrieval_tokens=32, window_tokens=16, offload=True)),
    # a 100-node tree over a 65536-token vocabulary: the greedy check for finite logits holds a boolean mask of
    # them beside them (a quarter more; 176.9 MiB compiled against 165.8 estimated at 4 rows)
    ("eagle", 4, 65536, 0.0, 1.0, 0, sj.SpecConfig(tree_depth=3, tree_top_k=10, tree_nodes=100)),
    # greedy exact mode also takes each provisional token's margin over the best other logit
    ("exact", 4, 65536, 0.0, 1.0, 0, sj.SpecConfig(sink_tokens=16, retrieval_tokens=32, window_tokens=16)),
], ids=["ar", "exact-top-p-top-k", "eagle-beam", "eagle-top-k", "exact-offload", "eagle-wide-vocab",
        "exact-wide-vocab"])
def test_estimate_covers_kv_heads_sampling_and_drafting(mode, heads, vocab, temperature, top_p, top_k, spec):
    from specpv_jax import host

    target = make_target(vocab, layers=2, heads=heads)
    draft = make_head(target) if mode != "ar" else None
    rows, n, chunk = (2, 2000, 256) if mode == "ar" or spec.offload else (2, 100, 16)
    host._EXECUTABLES.clear()
    sj.generate(target, np.zeros((rows, n), np.int32), 4, draft=draft, mode=mode, temperature=temperature,
                top_p=top_p, top_k=top_k, prefill_chunk=chunk, eos_token_ids=(), attention="xla", progress=False,
                spec=spec)
    est = memory.estimate(target.cfg, n, 4, rows, mode, spec=spec, dtype="float32", prefill_chunk=chunk,
                          temperature=temperature, top_p=top_p, top_k=top_k,
                          draft_cfg=None if draft is None else draft.cfg)
    for exe in host._EXECUTABLES.values():
        assert compiled_peak(exe) <= est.total, est.parts


def test_per_device_parts_follow_the_sharding_rule():
    cfg = ModelConfig.from_hf(LLAMA_31_8B)

    def per_device(batch, data, model):
        return memory.estimate(cfg, 65536, batch=batch, mode="exact", mesh_shape=(data, model)).parts

    est = per_device(8, 1, 1)
    replicated = per_device(8, data=8, model=1)  # rows split, weights on every device
    assert replicated["weights"] == est["weights"] and replicated["draft weights"] == est["draft weights"]
    assert replicated["full cache"] == est["full cache"] // 8
    tensor = per_device(8, data=1, model=8)  # 8 KV heads over 8 devices (weights: the next tests)
    assert tensor["partial cache"] == est["partial cache"] // 8 and tensor["draft cache"] == est["draft cache"] // 8
    assert per_device(8, data=1, model=16)["full cache"] == est["full cache"]  # 8 KV heads
    assert per_device(3, data=3, model=1)["activations"] < per_device(3, data=1, model=1)["activations"]
    assert per_device(3, data=2, model=1)["activations"] == per_device(3, data=1, model=1)["activations"]  # 3 rows
    # each device of a data axis holds the layer loop's slice of one layer's weights whole
    assert per_device(8, data=8, model=1)["activations"] > memory.layer_param_count(cfg) * 2


def placed_elements(params, model: int, cfg) -> int:
    """Elements of `params` of a model of `cfg` on one device, read off `sharding.param_specs` (as
    `shard_params` places them)."""
    from jax.sharding import PartitionSpec as P

    from specpv_jax import sharding

    specs = sharding.param_specs(params, SimpleNamespace(shape={"model": model}), cfg)  # only its size is read
    specs = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
    return sum(x.size // (model if "model" in spec else 1) for x, spec in zip(jax.tree.leaves(params), specs))


@pytest.mark.parametrize("kind, model", [("eagle3", 1), ("eagle3", 8), ("eagle3", 3), ("longspec", 8), ("narrow", 8)])
def test_draft_weights_per_device_follow_their_placement(kind, model):
    """A head's weights are counted from its own config and split as `shard_params` places them (before: a
    target-shaped layer with the target's vocabulary, whole on every device: 1.52 GiB per device for a
    Qwen2.5-7B head on 1x8, where 0.16 GiB is placed). A head narrower than its target brings its own embedding."""
    from specpv_jax.config import DraftConfig, LongSpecConfig
    from specpv_jax.draft import eagle3, longspec

    cfg = presets.model_config("llama-3.1-8b")
    if kind == "longspec":
        draft_cfg, init = LongSpecConfig.for_target(cfg), longspec.init_params
    else:
        draft_cfg, init = DraftConfig.for_target(cfg, draft_vocab_size=32000), eagle3.init_params
        if kind == "narrow":  # half the target's width
            draft_cfg = dataclasses.replace(draft_cfg, hidden_size=2048, head_dim=64)
    shapes = jax.eval_shape(lambda: init(draft_cfg, jax.random.key(0)))
    if kind == "narrow":
        shapes["embed_tokens"] = {"embedding": jax.ShapeDtypeStruct((cfg.vocab_size, 2048), np.float32)}
    mode = "longspec" if kind == "longspec" else "eagle"
    est = memory.estimate(cfg, 1024, mode=mode, dtype="bfloat16", draft_cfg=draft_cfg, mesh_shape=(1, model))
    assert est.parts["draft weights"] == 2 * placed_elements(shapes, model, draft_cfg)
    if model == 8:  # the MLP, projections and LM head split 8 ways; norms and the EAGLE-3 head's fc whole
        assert est.parts["draft weights"] < memory.estimate(cfg, 1024, mode=mode, draft_cfg=draft_cfg).parts[
            "draft weights"] / 4


def test_longspec_draft_cache_is_constant():
    cfg = ModelConfig.from_hf(LLAMA_31_8B)
    short, long = (memory.estimate(cfg, n, mode="longspec") for n in (1024, 131072))
    assert short.parts["draft cache"] == long.parts["draft cache"] == 2 * 8 * 512 * 128 * 2  # K+V, 512 slots, bf16
    assert long.parts["draft weights"] < memory.estimate(cfg, 1024, mode="eagle").parts["draft weights"]


@pytest.mark.parametrize("kwargs, message", [
    ({"context": 0}, "context must be an integer >= 1, got 0"),
    ({"new_tokens": -1}, "new_tokens must be an integer >= 0, got -1"),
    ({"batch": -2}, "batch must be an integer >= 1, got -2"),  # it gave less than batch 1
    ({"prefill_chunk": 0}, "prefill_chunk must be an integer >= 1"),  # ZeroDivisionError
    ({"mesh_shape": (0, 8)}, r"mesh_shape\[0\] must be an integer >= 1"),
    ({"dtype": "int8"}, "dtype must be a floating type, got 'int8'"),
])
def test_estimate_names_bad_input(kwargs, message):
    cfg = ModelConfig.from_hf(LLAMA_31_8B)
    with pytest.raises(ValueError, match=message):
        memory.estimate(cfg, **{"context": 1024, **kwargs})
    assert memory.estimate(cfg, 1024, new_tokens=0).total > 0


def test_generate_refuses_a_run_that_cannot_fit_before_allocating(monkeypatch):
    target = make_target(16, layers=2)
    monkeypatch.setattr(memory, "device_bytes_limit", lambda device=None: 10_000)
    with pytest.raises(MemoryError, match=r"mode 'ar' needs about .* GiB of device memory.*full cache"):
        sj.generate(target, np.arange(500) % 16, 8)


@pytest.mark.parametrize("mode", ["eagle", "exact", "specextend", "longspec"])
def test_generate_estimates_the_draft_it_is_given(monkeypatch, mode):
    """generate's check counts the draft it runs (an EAGLE-3 head's, a small draft model's, a LongSpec draft's
    own config), not one shaped like the target."""
    from specpv_jax.demo import demo_models, draft_for

    models = demo_models()
    draft = draft_for(models, mode)
    est = memory.estimate(models.target.cfg, 16, 4, mode=mode, dtype="float32", draft_cfg=draft.cfg,
                          prefill_chunk=16)  # generate's chunk: the 3-token prompt's 16-token bucket
    placed = sum(x.nbytes for x in jax.tree.leaves(draft.params))
    assert est.parts["draft weights"] == placed, (est.parts["draft weights"], placed)

    class Checked(Exception):
        pass

    def check_fits(checked, *limits, **advice):
        raise Checked(checked)

    monkeypatch.setattr(memory, "device_bytes_limit", lambda device=None: 2 ** 40)
    monkeypatch.setattr(memory, "check_fits", check_fits)
    with pytest.raises(Checked) as checked:  # before anything is compiled or allocated
        sj.generate(models.target, [1, 2, 3], 4, draft=draft, mode=mode)
    assert checked.value.args[0] == est


def test_estimate_counts_a_loaded_draft_at_its_dtype_with_its_own_embedding():
    """A float32 head beside a bfloat16 target (what generate's NaN warning advises) was counted in bfloat16,
    and a same-width head's own embedding table not at all: about 2 GiB under for Llama-3.1-8B at 64K."""
    from specpv_jax.config import DraftConfig
    from specpv_jax.draft import eagle3

    cfg = ModelConfig.from_hf(LLAMA_31_8B)
    head = DraftConfig.for_target(cfg, cfg.vocab_size)
    shapes = jax.eval_shape(lambda: eagle3.init_params(head, jax.random.key(0)))  # float32
    assumed = memory.estimate(cfg, 65536, mode="exact", draft_cfg=head)  # bfloat16, as the target
    loaded = memory.estimate(cfg, 65536, mode="exact", draft_cfg=head, draft_params=shapes)
    for part in ("draft weights", "draft cache"):
        assert loaded.parts[part] == 2 * assumed.parts[part]
    assert loaded.parts["full cache"] == assumed.parts["full cache"]
    own = {**shapes, "embed_tokens": {"embedding": jax.ShapeDtypeStruct((cfg.vocab_size, cfg.hidden_size),
                                                                        np.float32)}}
    with_table = memory.estimate(cfg, 65536, mode="exact", draft_cfg=head, draft_params=own)
    assert with_table.parts["draft weights"] - loaded.parts["draft weights"] == cfg.vocab_size * cfg.hidden_size * 4


def test_a_refusal_advises_what_would_fit(monkeypatch):
    """Offload where it fits, bfloat16 only for wider weights, no mesh under offload (which runs on one
    device); the advice had been the same list whatever the call."""
    target = make_target(16, layers=8, heads=8, head_dim=64)  # a cache large beside the activations
    head = make_head(target)
    spec = sj.SpecConfig(tree_depth=2, tree_top_k=2, tree_nodes=3, sink_tokens=16, retrieval_tokens=32,
                         window_tokens=16)
    prompt = np.arange(2000) % 16
    kw = dict(draft=head, mode="exact", spec=spec, prefill_chunk=64)
    est, off = (memory.estimate(target.cfg, 2000, 8, mode="exact", spec=dataclasses.replace(spec, offload=offload),
                                dtype="float32", draft_cfg=head.cfg, prefill_chunk=64, draft_params=head.params)
                for offload in (False, True))
    assert off.device < 0.7 * est.total
    monkeypatch.setattr(memory, "device_bytes_limit", lambda device=None: (off.device + est.total) // 2)
    monkeypatch.setattr(memory, "host_bytes_limit", lambda platform=None: None)
    with pytest.raises(MemoryError, match=r"; use SpecConfig\(offload=True\) \(about .* GiB on the device, .* GiB in "
                                          r"host memory\), a shorter context, a smaller batch, bfloat16 or several "
                                          r"devices \(mesh\)$"):
        sj.generate(target, prompt, 8, **kw)
    monkeypatch.setattr(memory, "device_bytes_limit", lambda device=None: off.device // 2)
    with pytest.raises(MemoryError, match=r"; use a shorter context, a smaller batch, bfloat16 or several devices"):
        sj.generate(target, prompt, 8, **kw)  # offload would not fit either: not suggested
    with pytest.raises(MemoryError, match=r"; use a shorter context, a smaller batch or bfloat16$"):  # no mesh
        sj.generate(target, prompt, 8, **{**kw, "spec": dataclasses.replace(spec, offload=True)})
    half = sj.Model(target.cfg, jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), target.params))
    with pytest.raises(MemoryError, match=r"; use a shorter context, a smaller batch or several devices \(mesh\)$"):
        sj.generate(half, prompt, 8, prefill_chunk=64)  # already 16-bit


def test_arrays_beside_the_models_count_against_the_device(monkeypatch):
    """Memory other arrays hold (a model loaded twice: the convert notebook on a 40 GB A100) was left out of
    the check: the run was let through and failed allocating."""
    target = make_target(16, layers=2)
    cpu = jax.devices()[0]
    assert memory.bytes_on(target.params, cpu) == sum(x.nbytes for x in jax.tree.leaves(target.params))
    host = jax.device_put(np.zeros(1000, np.float32), jax.sharding.SingleDeviceSharding(cpu, memory_kind="pinned_host"))
    assert memory.bytes_on({"host": host, "p": target.params}, cpu) == memory.bytes_on(target.params, cpu)

    class Device:  # another device, reporting what it holds
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    assert memory.device_bytes_held_beside(target.params, Device(None)) == 0
    assert memory.device_bytes_held_beside(target.params, Device({"bytes_in_use": 10_000})) == 10_000
    est = memory.estimate(target.cfg, 16, 4, dtype="float32", prefill_chunk=16)
    monkeypatch.setattr(memory, "device_bytes_limit", lambda device=None: 2 * est.total)
    monkeypatch.setattr(memory, "device_bytes_held_beside", lambda own, device=None: int(1.5 * est.total))
    with pytest.raises(MemoryError, match=r"the device has .* GiB, .* GiB of it taken by other arrays .*; free "
                                          r"the other arrays \(del the names that keep them\), or use a shorter"):
        sj.generate(target, [1, 2, 3], 4)
    monkeypatch.setattr(memory, "device_bytes_held_beside", lambda own, device=None: int(0.5 * est.total))
    assert sj.generate(target, [1, 2, 3], 4).tokens.shape == (1, 4)


@pytest.mark.parametrize("name", ["eagle3", "small_draft", "longspec"])
def test_draft_config_reads_what_load_draft_loads(tmp_path, name):
    """`loading.draft_config` (plan --draft) reads the config of each kind of draft, from its directory and its
    orbax export, without weights, and refuses one that does not fit the target."""
    from specpv_jax import loading
    from specpv_jax.demo import ASSETS, demo_models

    models = demo_models()
    draft = getattr(models, name)
    assert loading.draft_config(ASSETS / name, models.target.cfg) == draft.cfg
    assert loading.draft_config(sj.save_draft(draft, tmp_path / "orbax"), models.target.cfg) == draft.cfg
    other = dataclasses.replace(models.target.cfg, vocab_size=models.target.cfg.vocab_size * 2)
    with pytest.raises(ValueError, match="vocab"):
        loading.draft_config(ASSETS / name, other)


def test_plan_sizes_the_draft_it_is_given(tmp_path, capsys):
    """plan --draft: a public Llama-3.1-8B EAGLE-3 head's config (32K draft vocabulary) makes the EAGLE-3 rows
    0.73 GiB smaller in bf16; a small draft model's config adds the specextend row."""
    from specpv_jax.cli import main

    def rows(*draft):
        assert main(["plan", "--model", "llama-3.1-8b", "--context", "65536", "--mesh", "1x1", *draft]) == 0
        return {line.split()[0]: float(line.split()[1]) for line in capsys.readouterr().out.splitlines()[2:]}

    head, small = tmp_path / "head", tmp_path / "small"
    head.mkdir(), small.mkdir()
    (head / "config.json").write_text(json.dumps(dict(LLAMA_31_8B, architectures=["LlamaForCausalLMEagle3"],
                                                      num_hidden_layers=1, draft_vocab_size=32000)))
    (small / "config.json").write_text(json.dumps(dict(LLAMA_31_8B, num_hidden_layers=2)))
    plain, headed, drafted = rows(), rows("--draft", str(head)), rows("--draft", str(small))
    for mode in ("eagle", "specpv", "exact"):
        assert abs(plain[mode] - headed[mode] - (128256 - 32000) * 4096 * 2 / 2 ** 30) < 0.01
    assert headed["ar"] == plain["ar"] and headed["longspec"] == plain["longspec"]
    assert "specextend" not in plain and "specextend" not in headed and drafted["specextend"] > drafted["ar"]


def test_plan_prints_every_mode_for_llama_8b_shapes(tmp_path, capsys):
    from specpv_jax.cli import main

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B))
    assert main(["plan", "--model", str(tmp_path), "--context", "65536"]) == 0
    out = capsys.readouterr().out
    assert "8.03 B params" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert list(rows) == ["ar", "eagle", "specpv", "exact", "longspec"]
    # bf16 weights 14.96 GiB + a 64K cache of 32 layers x 8 KV heads x 128 dims (8.0 GiB + the new tokens' slots)
    # + activations 0.77 GiB: one layer's weights sliced out by the layer loop (0.44 GiB), a 512-token prefill
    # chunk's attention score tiles (0.13 GiB: 8 KV heads x 2048 query rows x 1024 keys, float32, twice), 10% spare
    assert 23.7 < float(rows["ar"][1]) < 23.9
    assert {row[-1] for row in rows.values()} == {"unknown"}  # the CPU backend reports no memory limit


@pytest.mark.parametrize("name, model", [("llama-3.1-8b", 3), ("llama-3.1-8b", 8), ("qwen3-8b", 6),
                                         ("qwen2.5-7b", 7)])
def test_weights_per_device_follow_their_placement(name, model):
    """A model axis that does not divide a weight leaves it whole on every device: Llama-3.1-8B over 3 devices
    splits only its embedding and LM head (vocabulary 128256), 13.65 of 14.96 GiB stay on each; Qwen2.5-7B's 7
    devices split its 3584-wide projections but not its 512-wide K/V ones."""
    cfg = presets.model_config(name)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    est = memory.estimate(cfg, 1024, mode="ar", dtype="bfloat16", mesh_shape=(1, model))
    assert est.parts["weights"] == 2 * placed_elements(shapes, model, cfg)


def test_plan_per_device_of_a_mesh(capsys):
    from specpv_jax.cli import main

    def rows(*mesh):
        assert main(["plan", "--model", "llama-3.1-8b", "--context", "65536", *mesh]) == 0
        out = capsys.readouterr().out
        return out.splitlines()[0], {line.split()[0]: line.split() for line in out.splitlines()[2:]}

    (head_one, one), (head_tp, tp) = rows(), rows("--mesh", "1x8")
    assert "per device of a 1x8 mesh" in head_tp and "per device" not in head_one
    # weights (all but the norms) and the cache's 8 KV heads split 8 ways; activations counted whole along "model"
    assert float(one["ar"][1]) / 8 < float(tp["ar"][1]) < float(one["ar"][1]) / 7
    assert tp["specpv"][3:5] == ["-", "-"]  # offload runs on one device


def test_plan_with_offload_plans_one_device(capsys, monkeypatch):
    """--spec offload=true runs on one device, so plans it (before: the default mesh's per-device figures and
    no offload column, on a host with several devices)."""
    import jax

    from specpv_jax.cli import main

    monkeypatch.setattr(jax, "device_count", lambda *a: 8)
    assert main(["plan", "--model", "llama-3.1-8b", "--context", "65536", "--spec", "offload=true"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert "per device" not in out.splitlines()[0] and rows["specpv"][3] != "-"
    assert main(["plan", "--model", "llama-3.1-8b", "--context", "65536", "--spec", "offload=true",
                 "--mesh", "1x8"]) == 1
    assert "--spec offload=true runs on one device, not a 1x8 mesh" in capsys.readouterr().err


def test_plan_says_with_offload_only_where_the_host_holds_the_cache(capsys, monkeypatch):
    """At 64K, Llama-3.1-8B's ar needs 23.8 GiB, specpv offloaded 21.9 GiB on the device and 8.6 in host
    memory: on a 22.5 GiB device that fits with offload where the host can take 8.6 GiB, and nowhere else."""
    from specpv_jax.cli import main

    monkeypatch.setattr(memory, "device_bytes_limit", lambda device=None: 45 << 29)
    fits = {}
    for host_gib in (100, 4):
        monkeypatch.setattr(memory, "host_bytes_limit", lambda host_gib=host_gib: memory.HostLimit(
            host_gib << 30, "the host's available memory"))
        main(["plan", "--model", "llama-3.1-8b", "--context", "65536"])
        out = capsys.readouterr().out
        assert f"host limit for offload {host_gib}.00 GiB (the host's available memory)" in out.splitlines()[0]
        fits[host_gib] = {line.split()[0]: line.rsplit("  ", 1)[-1] for line in out.splitlines()[2:]}
    assert fits[100]["ar"] == fits[4]["ar"] == "no"
    assert fits[100]["specpv"] == "with offload" and fits[4]["specpv"] == "no"


def test_host_limit_is_the_available_memory_and_on_a_gpu_the_pinned_pool(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       263856128 kB\nMemAvailable:   16777216 kB\nBuffers: 1 kB\n")
    assert memory.host_bytes_limit("cpu", {}, meminfo) == memory.HostLimit(16 << 30, "the host's available memory")
    assert memory.host_bytes_limit("gpu", {}, meminfo).bytes == 16 << 30  # less than the pool's 64 GiB
    meminfo.write_text("MemAvailable:   209715200 kB\n")  # 200 GiB
    pool = memory.host_bytes_limit("gpu", {}, meminfo)
    assert pool == memory.HostLimit(64 << 30, "XLA's pinned host memory pool (XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=64)",
                                    "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB")
    assert memory.host_bytes_limit("gpu", {"XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB": "150"}, meminfo).bytes == 150 << 30
    assert memory.host_bytes_limit("gpu", {"XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB": "lots"}, meminfo).bytes == 64 << 30
    assert memory.host_bytes_limit("tpu", {}, meminfo).bytes == 200 << 30
    missing = tmp_path / "absent"
    assert memory.host_bytes_limit("cpu", {}, missing) is None
    assert memory.host_bytes_limit("gpu", {}, missing).bytes == 64 << 30
    assert memory.host_bytes_limit() is None or memory.host_bytes_limit().bytes > 0  # this machine's


def test_plan_takes_a_preset_name(capsys):
    from specpv_jax.cli import main

    assert main(["plan", "--model", "qwen3-8b", "--context", "32768"]) == 0
    assert "qwen3, 36 layers x 4096, 8.19 B params" in capsys.readouterr().out
    assert main(["plan", "--model", "llama-8b", "--context", "1024"]) != 0
    assert ("llama-8b is neither a model directory nor a preset (llama-3.1-8b, qwen3-8b, qwen2.5-7b)"
            in capsys.readouterr().err)


def test_plan_takes_spec_fields(capsys):
    from specpv_jax.cli import main

    def rows(*spec):
        assert main(["plan", "--model", "llama-3.1-8b", "--context", "65536", *spec]) == 0
        return {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}

    default, small = rows(), rows("--spec", "retrieval_tokens=1024")
    assert default["ar"] == small["ar"]  # no partial cache
    assert float(small["specpv"][1]) < float(default["specpv"][1])  # a smaller partial cache, on the device
    assert float(small["specpv"][3]) < float(default["specpv"][3])  # ... also with the full cache offloaded
    assert main(["plan", "--model", "llama-3.1-8b", "--context", "1024", "--spec", "offload=perhaps"]) == 1
    assert "offload takes true or false" in capsys.readouterr().err
    # what generate refuses, plan refuses (it printed rows for them, exit status 0)
    assert main(["plan", "--model", "llama-3.1-8b", "--context", "1024", "--spec", "window_tokens=0"]) == 1
    assert "window_tokens=0 must hold the tree_depth + 1 = 8 tokens" in capsys.readouterr().err
    head = str(ASSETS / "eagle3")
    assert main(["plan", "--model", str(ASSETS / "target"), "--draft", head, "--context", "1024", "--spec",
                 "tree_top_k=5000", "--spec", "tree_nodes=10"]) == 1
    assert "tree_top_k=5000 exceeds the draft's vocabulary of 2048 tokens" in capsys.readouterr().err


def test_plan_counts_the_padded_prompt_generate_allocates(capsys):
    """generate pads a prompt to its bucket (65537 tokens: 66048) and sizes its caches for that: plan too
    (it planned 66 MiB less for Llama-8B exact)."""
    from specpv_jax.cli import main

    def rows(context):
        assert main(["plan", "--model", "llama-3.1-8b", "--context", str(context)]) == 0
        return [line.split() for line in capsys.readouterr().out.splitlines()[2:]]

    assert rows(65537) == rows(66048)
