"""HF conversion: sharded checkpoints, orbax round trip, the CLI, and every kind of bad input."""

from __future__ import annotations

import gc
import json
import pathlib
import shutil
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import specpv_jax as sj
from convert.hf import ConversionError, export_hf
from specpv_jax import checkpoint, cli
from specpv_jax.checkpoint import CheckpointError
from specpv_jax.config import ModelConfig

IDS = np.random.default_rng(0).integers(3, 160, (2, 40))


@pytest.fixture
def hf_copy(hf_model, tmp_path):
    """A writable copy of a tiny HF Qwen2 model directory plus helpers to edit its weights."""
    src, _ = hf_model("qwen2-gqa2-tied")
    d = tmp_path / "hf"
    shutil.copytree(src, d)
    return d


def edit_weights(d: pathlib.Path, fn):
    path = d / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def edit_config(d: pathlib.Path, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def convert_error(d) -> str:
    with pytest.raises(ConversionError) as e:
        sj.load_target(d, progress=False)
    return str(e.value)


def test_sharded_checkpoint_loads(hf_model, tmp_path):
    _, hf = hf_model("llama-mha")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    whole = sj.forward_logits(sj.load_target(hf_model("llama-mha")[0], progress=False), IDS)
    np.testing.assert_array_equal(sj.forward_logits(sj.load_target(tmp_path / "sharded", progress=False), IDS), whole)


def test_orbax_round_trip_is_bit_identical(hf_model, tmp_path):
    target = sj.load_target(hf_model("qwen3-gqa2-tied-yarn")[0], progress=False)
    sj.save_target(target, tmp_path / "ckpt")
    restored = sj.load_target(tmp_path / "ckpt", dtype=None)
    assert restored.cfg == target.cfg
    np.testing.assert_array_equal(sj.forward_logits(restored, IDS), sj.forward_logits(target, IDS))


def test_cli_convert_then_generate_without_hf_files(hf_model, tmp_path, capsys):
    src, _ = hf_model("llama-gqa2-tied-llama3")
    out = tmp_path / "converted"
    assert cli.main(["convert", str(src), str(out)]) == 0
    assert f"wrote {out} (llama, 2 layers, float32 as stored)" in capsys.readouterr().out  # save_pretrained's
    assert checkpoint.is_checkpoint(out) and not (out / "config.json").exists()
    restored = sj.load_target(out)
    np.testing.assert_array_equal(sj.forward_logits(restored, IDS),
                                  sj.forward_logits(sj.load_target(src, progress=False), IDS))
    # A second convert into the same directory is refused unless forced.
    assert cli.main(["convert", str(src), str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["convert", str(src), str(out), "--force", "--dtype", "bfloat16"]) == 0
    assert sj.load_target(out, dtype=None).dtype == np.dtype("bfloat16")
    assert "(llama, 2 layers, bfloat16)" in capsys.readouterr().out


def test_convert_keeps_mixed_stored_dtypes_in_float32(hf_copy, tmp_path, capsys):
    """A float16 embedding beside float32 weights: the export holds every stored value (float32), not the
    embedding's dtype for all."""
    reference = sj.forward_logits(sj.load_target(hf_copy, progress=False), IDS)
    edit_weights(hf_copy, lambda t: t.update(
        {k: v.astype(np.float16) for k, v in t.items() if k == "model.embed_tokens.weight"}))
    assert cli.main(["convert", str(hf_copy), str(tmp_path / "out")]) == 0
    assert "float32 as stored" in capsys.readouterr().out
    restored = sj.load_target(tmp_path / "out", dtype=None)
    assert restored.dtype == np.dtype("float32")
    embedding = np.asarray(restored.params["embed_tokens"]["embedding"])
    assert np.array_equal(embedding, embedding.astype(np.float16).astype(np.float32))  # the stored values
    assert not np.array_equal(sj.forward_logits(restored, IDS), reference)  # the embedding was rounded at save


def test_failed_convert_leaves_nothing(hf_copy, tmp_path, capsys):
    edit_weights(hf_copy, lambda t: t.pop("model.norm.weight"))
    out = tmp_path / "out"
    assert cli.main(["convert", str(hf_copy), str(out)]) == 1
    assert "model.norm.weight" in capsys.readouterr().err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_interrupted_save_leaves_nothing(hf_model, tmp_path, monkeypatch):
    target = sj.load_target(hf_model("llama-mha")[0], progress=False)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_replace_dir", boom)  # everything written, the final rename fails
    with pytest.raises(OSError, match="disk full"):
        sj.save_target(target, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError, match="disk full"):  # nor the directories made to hold it
        sj.save_target(target, tmp_path / "runs" / "today" / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_saves_leftovers_are_pointed_out(hf_model, tmp_path):
    target = sj.load_target(hf_model("llama-mha")[0], progress=False)
    (tmp_path / ".ckpt.partial-0123abcd" / "params").mkdir(parents=True)  # what a kill leaves
    with pytest.warns(UserWarning, match=r"\.ckpt\.partial-0123abcd, left by an interrupted save to ckpt") as seen:
        sj.save_target(target, tmp_path / "ckpt")
    assert seen[0].filename == __file__  # the user's line, not the library's
    assert sj.load_target(tmp_path / "ckpt").cfg == target.cfg
    assert (tmp_path / ".ckpt.partial-0123abcd").is_dir()  # not ours to delete


def test_an_interrupted_overwrite_is_pointed_out(hf_model, tmp_path, monkeypatch):
    target = sj.load_target(hf_model("llama-mha")[0], progress=False)
    sj.save_target(target, tmp_path / "ckpt")
    real_replace = checkpoint.os.replace

    def killed_after_moving_the_old_one_aside(src, dst):
        real_replace(src, dst)
        if ".old-" in str(dst):
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.os, "replace", killed_after_moving_the_old_one_aside)
    with pytest.raises(KeyboardInterrupt):
        sj.save_target(target, tmp_path / "ckpt", overwrite=True)
    with pytest.raises(FileNotFoundError, match=r"\.ckpt\.old-\w+ holds the checkpoint an interrupted overwrite"):
        sj.load_target(tmp_path / "ckpt")


def test_an_overwrite_whose_last_rename_fails_puts_the_old_checkpoint_back(hf_model, tmp_path, monkeypatch):
    target = sj.load_target(hf_model("llama-mha")[0], progress=False)
    sj.save_target(target, tmp_path / "ckpt")
    real_replace = checkpoint.os.replace

    def fails_to_move_the_new_one_in(src, dst):
        if ".partial-" in str(src):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", fails_to_move_the_new_one_in)
    with pytest.raises(OSError, match="disk full"):
        sj.save_target(target, tmp_path / "ckpt", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sj.load_target(tmp_path / "ckpt", progress=False).cfg == target.cfg


def test_a_relative_source_is_still_protected_after_a_chdir(hf_copy, tmp_path, monkeypatch):
    """`source` was stored as given: after the working directory changed, the guard against replacing the
    exported model's own directory resolved it elsewhere and let the HF checkpoint be deleted."""
    monkeypatch.chdir(hf_copy.parent)
    target = sj.load_target(hf_copy.name, progress=False)
    monkeypatch.chdir(tmp_path.parent)
    before = sorted(p.name for p in hf_copy.iterdir())
    with pytest.raises(CheckpointError, match="replacing it would delete it"):
        sj.save_target(target, hf_copy, overwrite=True)
    assert sorted(p.name for p in hf_copy.iterdir()) == before and target.source == str(hf_copy)


def test_force_replaces_only_a_model_directory(hf_copy, tmp_path, capsys):
    """--force / overwrite=True replace a checkpoint or model directory, never a directory of other things
    (`convert SRC ~/models --force` meant "put it in there")."""
    models = tmp_path / "models"
    (models / "other_model").mkdir(parents=True)
    (models / "other_model" / "model.safetensors").write_bytes(b"weights")
    (models / "notes.txt").write_text("notes")
    assert cli.main(["convert", str(hf_copy), str(models), "--force"]) == 1
    assert "is not a model directory" in capsys.readouterr().err
    target = sj.load_target(hf_copy, progress=False)
    with pytest.raises(CheckpointError, match=r"it holds notes.txt, other_model/\)"):
        export_hf(models, target.cfg, target.params, overwrite=True)
    assert (models / "notes.txt").read_text() == "notes" and (models / "other_model" / "model.safetensors").exists()
    export_hf(tmp_path / "exported", target.cfg, target.params)
    export_hf(tmp_path / "exported", target.cfg, target.params, overwrite=True)
    sj.save_target(target, tmp_path / "ckpt")
    sj.save_target(target, tmp_path / "ckpt", overwrite=True)
    assert checkpoint.is_checkpoint(tmp_path / "ckpt") and (tmp_path / "exported" / "config.json").is_file()


def test_missing_tensor_is_named(hf_copy):
    edit_weights(hf_copy, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    assert "missing tensors: model.layers.1.self_attn.k_proj.bias" in convert_error(hf_copy)


def test_unexpected_tensor_is_named(hf_copy):
    edit_weights(hf_copy, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
    assert "unexpected tensors" in (msg := convert_error(hf_copy)) and "model.layers.0.mlp.extra.weight" in msg


def test_misshaped_tensor_names_key_and_both_shapes(hf_copy):
    edit_weights(hf_copy,
                 lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": np.zeros((32, 64), np.float32)}))
    msg = convert_error(hf_copy)
    assert "model.layers.0.self_attn.q_proj.weight: shape (32, 64) in model.safetensors" in msg
    assert "config.json implies (64, 64)" in msg


def test_truncated_file_is_reported(hf_copy):
    path = hf_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    msg = convert_error(hf_copy)
    assert "model.safetensors" in msg and "truncated or corrupt" in msg


def test_unsupported_dtype_is_reported(hf_copy):
    edit_weights(hf_copy, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(np.int8)}))
    assert "model.norm.weight: unsupported dtype I8" in convert_error(hf_copy)


def test_nan_weights_are_reported(hf_copy):
    def poison(t):
        t["model.layers.1.mlp.up_proj.weight"][3, 4] = np.nan
    edit_weights(hf_copy, poison)
    assert "model.layers.1.mlp.up_proj.weight' contains NaN" in convert_error(hf_copy)


def test_weights_that_overflow_the_requested_dtype_are_reported(hf_copy):
    def enlarge(t):
        t["model.layers.0.self_attn.k_proj.weight"][0, 1] = 1e6  # finite in float32, inf in float16
    edit_weights(hf_copy, enlarge)
    with pytest.raises(ConversionError, match=r"k_proj.weight' has values beyond the range of float16"):
        sj.load_target(hf_copy, dtype="float16", progress=False)
    assert sj.load_target(hf_copy, dtype="bfloat16", progress=False).dtype == jnp.bfloat16


def test_accelerator_and_cpu_conversions_agree():
    """The jitted conversion (GPU/TPU) and the numpy one (CPU backend) give the same params and flags."""
    from convert.hf import _to_param, _to_param_on_device

    rng = np.random.default_rng(0)
    layers = [rng.standard_normal((6, 4)).astype(np.float32) for _ in range(3)]
    layers[1][2, 3], layers[2][0, 0] = np.nan, 1e6  # not finite as stored; beyond float16
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        for transpose in (False, True):
            for stacked in (False, True):
                on_device = _to_param_on_device(None)(layers, dtype=jnp.dtype(dtype), transpose=transpose,
                                                      stacked=stacked)
                with np.errstate(over="ignore", invalid="ignore"):
                    on_host = _to_param(np, layers, jnp.dtype(dtype), transpose, stacked)
                for a, b in zip(on_device, on_host):
                    # (as float32: numpy < 2.4 does not take NaN == NaN in ml_dtypes' bfloat16)
                    np.testing.assert_array_equal(np.asarray(a).astype(np.float32), np.asarray(b).astype(np.float32))
                assert on_host[0].shape == ((3,) if stacked else ()) + ((4, 6) if transpose else (6, 4))
                assert on_host[1].tolist() == [True, False, True]
                assert on_host[2].tolist() == [True, False, dtype != jnp.float16]


def test_config_weights_mismatch(hf_copy):
    edit_config(hf_copy, num_hidden_layers=3)
    assert "config.json says num_hidden_layers=3, but the weights hold model.layers.0 to 1" in convert_error(hf_copy)
    edit_config(hf_copy, num_hidden_layers=30_000_000)  # named at once (listing the missing keys took hours)
    assert "num_hidden_layers=30000000, but the weights hold model.layers.0 to 1" in convert_error(hf_copy)
    edit_config(hf_copy, num_hidden_layers=2, intermediate_size=100)
    assert "model.layers.0.mlp.gate_proj.weight: shape (96, 64)" in convert_error(hf_copy)


def test_a_single_weights_file_wins_over_an_index_as_in_transformers(hf_model, tmp_path):
    """A model saved whole over a sharded one (a merged fine-tune saved in place) leaves the old index: the
    weights are the single file's, as transformers loads them, not the shards the index names."""
    import torch  # (in the test: `make test-next` runs this module where there is no torch)

    _, hf = hf_model("llama-mha")
    d = tmp_path / "model"
    hf.save_pretrained(d, max_shard_size="50KB")
    with torch.no_grad():
        hf.model.norm.weight.mul_(3.0)
        try:
            save_file({k: v.contiguous().numpy() for k, v in hf.state_dict().items()}, d / "model.safetensors")
            expected = hf(torch.as_tensor(IDS)).logits.numpy()
        finally:
            hf.model.norm.weight.div_(3.0)
    np.testing.assert_allclose(sj.forward_logits(sj.load_target(d, progress=False), IDS), expected, atol=1e-4)


def test_index_naming_a_missing_shard(hf_copy):
    (hf_copy / "model.safetensors").rename(hf_copy / "model-00001-of-00002.safetensors")
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    assert "shard files that do not exist: ['model-00002-of-00002.safetensors']" in convert_error(hf_copy)


def test_no_weights_and_bad_json(hf_copy):
    (hf_copy / "model.safetensors").rename(hf_copy / "pytorch_model.bin")
    assert "no *.safetensors files" in (msg := convert_error(hf_copy)) and "pytorch_model.bin" in msg
    (hf_copy / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in convert_error(hf_copy)
    (hf_copy / "config.json").write_bytes(b'{"model_type": "caf\xe9"}')  # Latin-1, not UTF-8
    assert f"{hf_copy / 'config.json'} is not valid JSON: 'utf-8' codec can't decode" in convert_error(hf_copy)


def test_a_generation_config_that_is_a_directory_is_named(hf_copy):
    (hf_copy / "generation_config.json").unlink(missing_ok=True)
    (hf_copy / "generation_config.json").mkdir()
    assert f"cannot read {hf_copy / 'generation_config.json'}: Is a directory" in convert_error(hf_copy)


def test_an_eagle_1_or_2_head_is_named(hf_copy, tmp_path):
    def as_eagle_1(tensors):  # EAGLE-1/2 heads: an fc layer, no embedding of their own
        tensors["fc.weight"] = np.zeros((64, 128), np.float32)
        del tensors["model.embed_tokens.weight"]

    edit_weights(hf_copy, as_eagle_1)
    assert "holds an EAGLE-1/2 draft head (fc.weight, layers.0.*), not a LLaMA/Qwen model" in convert_error(hf_copy)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        sj.load_target(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sj.load_target(tmp_path / "nope")


def test_dtype_names(hf_copy, tmp_path):
    assert sj.load_target(hf_copy, dtype="bf16", progress=False).dtype == jnp.bfloat16
    sj.save_target(sj.load_target(hf_copy, progress=False), tmp_path / "ckpt")
    for path in (hf_copy, tmp_path / "ckpt"):
        for bad in ("int32", "garbage", "float64"):
            with pytest.raises(ConversionError, match=f"unsupported parameter dtype '{bad}'"):
                sj.load_target(path, dtype=bad, progress=False)


def test_dtype_none_keeps_the_stored_dtype(hf_model, tmp_path):
    target = sj.load_target(hf_model("llama-mha")[0], dtype="bfloat16", progress=False)
    export_hf(tmp_path / "bf16", target.cfg, target.params)
    assert sj.load_target(tmp_path / "bf16", dtype=None, progress=False).dtype == jnp.bfloat16
    assert sj.load_target(tmp_path / "bf16", progress=False).dtype == jnp.float32  # the default: float32


def test_orbax_cast_beyond_the_dtype_range_is_refused(hf_copy, tmp_path):
    edit_weights(hf_copy, lambda t: t["model.layers.0.mlp.down_proj.weight"].__setitem__((0, 0), 1e5))
    with pytest.raises(ConversionError, match="down_proj.weight' has values beyond the range of float16"):
        sj.load_target(hf_copy, dtype="float16", progress=False)
    sj.save_target(sj.load_target(hf_copy, progress=False), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="layers/mlp/down_proj/kernel hold values beyond the range of float16"):
        sj.load_target(tmp_path / "ckpt", dtype="float16")


@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16"])
def test_orbax_nan_is_refused_in_any_dtype(hf_model, tmp_path, dtype):
    """A damaged checkpoint holding NaN loads as nothing, whichever dtype is asked for (None included)."""
    target = sj.load_target(hf_model("llama-mha")[0], progress=False)
    params = jax.tree.map(lambda x: x, target.params)  # a copy of the dicts
    params["norm"]["scale"] = params["norm"]["scale"].at[3].set(jnp.nan)
    sj.save_target(sj.Model(target.cfg, params), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"ckpt: norm/scale hold NaN or Inf as stored \(the checkpoint is "
                                              r"damaged\)"):
        sj.load_target(tmp_path / "ckpt", dtype=dtype)


def edit_meta(ckpt: pathlib.Path, **changes):
    meta = json.loads((ckpt / checkpoint.META_FILE).read_text())
    meta["model_config"].update(changes)
    (ckpt / checkpoint.META_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize("changes, message", [
    ({"vocab_size": 320}, r"embed_tokens/embedding has shape \(160, 64\), the configuration implies \(320, 64\)"),
    ({"qk_norm": True}, r"missing layers/self_attn/k_norm/scale \(2, 16\)"),
    ({"tie_word_embeddings": False}, r"missing lm_head/kernel \(64, 160\)"),
    ({"num_layers": 1}, r"layers/mlp/up_proj/kernel has shape \(2, 64, 96\), the configuration implies \(1, 64, 96\)"),
    ({"hidden_size": None}, "missing or malformed 'model_config'"),
])
def test_orbax_params_must_match_their_config(hf_copy, tmp_path, changes, message):
    sj.save_target(sj.load_target(hf_copy, progress=False), tmp_path / "ckpt")
    edit_meta(tmp_path / "ckpt", **changes)
    with pytest.raises(CheckpointError, match=message):
        sj.load_target(tmp_path / "ckpt")


def test_damaged_orbax_checkpoint_is_named(hf_copy, tmp_path):
    sj.save_target(sj.load_target(hf_copy, progress=False), tmp_path / "ckpt")
    shutil.copytree(tmp_path / "ckpt", tmp_path / "truncated")
    data = max((p for p in (tmp_path / "truncated" / "params").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:10])
    reported, hook = [], sys.unraisablehook
    sys.unraisablehook = reported.append
    try:
        with pytest.raises(CheckpointError, match="cannot read the parameters in .*truncated/params .*damaged"):
            sj.load_target(tmp_path / "truncated")
        gc.collect()
    finally:
        sys.unraisablehook = hook
    # (Only reports of this read count: another test's garbage may be collected in the window.)
    code = [getattr(getattr(r.object, "cr_code", None), "co_filename", "") for r in reported]
    ours = [f"{r.object!r}: {r.exc_value!r}" for r, c in zip(reported, code)
            if any(w in f"{c}{r.object!r}{r.exc_value!r}".lower()
                   for w in ("orbax", "tensorstore", "truncated", "event loop is closed"))]
    assert not ours, f"orbax's failed reads would each print a page of TensorStore errors after ours: {ours}"
    shutil.rmtree(tmp_path / "ckpt" / "params")
    with pytest.raises(CheckpointError, match="ckpt/params is missing or incomplete"):
        sj.load_target(tmp_path / "ckpt")


def test_flipped_bytes_in_an_orbax_checkpoint_are_caught(hf_model, tmp_path):
    """Bytes flipped inside orbax's data files can still decode (weights near 1e38, logits exact zeros: a
    silent wrong answer); each leaf's checksum, recorded at save, catches it before anything else reads them."""
    target = sj.load_target(hf_model("llama-mha")[0], progress=False)
    sj.save_target(target, tmp_path / "ckpt")
    meta = checkpoint.read_meta(tmp_path / "ckpt")
    assert meta.pop("checksums") == checkpoint.checksums(target.params)
    shutil.copytree(tmp_path / "ckpt", tmp_path / "older")
    (tmp_path / "older" / checkpoint.META_FILE).write_text(json.dumps(meta))
    assert sj.load_target(tmp_path / "older").cfg == target.cfg  # saved before checksums: read unchecked
    data = max((p for p in (tmp_path / "ckpt" / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    flipped = bytearray(data.read_bytes())
    at = len(flipped) // 3
    flipped[at: at + 64] = bytes(b ^ 0xFF for b in flipped[at: at + 64])
    data.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"ckpt/params is damaged: the data of .* differ from what "
                                              r"was saved \(their checksums in specpv_config.json\)"):
        sj.load_target(tmp_path / "ckpt")


def test_checksums_see_every_word_and_its_place():
    x = jnp.arange(24, dtype=jnp.float32).reshape(2, 3, 4)
    base = checkpoint.checksums({"x": x})["x"]
    assert checkpoint.checksums({"x": x.at[1, 2, 3].add(1e-6)})["x"] != base  # the last bit of one word
    assert checkpoint.checksums({"x": x[::-1]})["x"] != base  # the same words elsewhere
    halves = jnp.array([1.0, 2.0], jnp.bfloat16)
    assert checkpoint.checksums({"h": halves})["h"] != checkpoint.checksums({"h": halves[::-1]})["h"]


def test_tied_config_with_a_different_stored_head_is_refused(hf_copy):
    tied = sj.forward_logits(sj.load_target(hf_copy, progress=False), IDS)
    edit_weights(hf_copy, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    np.testing.assert_array_equal(sj.forward_logits(sj.load_target(hf_copy, progress=False), IDS), tied)
    edit_weights(hf_copy, lambda t: t.update({"lm_head.weight": 2 * t["model.embed_tokens.weight"]}))
    message = convert_error(hf_copy)
    assert "tie_word_embeddings=true, but model.safetensors holds an lm_head.weight that differs" in message


@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": 2.5}, "num_hidden_layers must be a positive integer, got 2.5"),
    ({"hidden_size": "abc"}, "hidden_size must be a positive integer, got 'abc'"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({"rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 64}, "rope_parameters": None},
     "the RoPE settings of type 'yarn' in config.json have no factor"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": "1"},
      "rope_parameters": None}, "RopeConfig.mscale must be a float, got '1'"),
    ({"rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 0}, "rope_parameters": None},
     "original_max_position_embeddings must be a positive integer, got 0"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64.5},
      "rope_parameters": None}, "original_max_position_embeddings must be a positive integer, got 64.5"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": float("inf"), "original_max_position_embeddings": 64},
      "rope_parameters": None}, "RopeConfig.factor must be positive, got inf"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}},
     "RopeConfig.theta must be positive, got nan"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64,
                       "low_freq_factor": 4.0, "high_freq_factor": 4.0}, "rope_parameters": None},
     "high_freq_factor (4.0) must exceed low_freq_factor (4.0)"),
])
def test_malformed_config_fields_are_named(hf_copy, changes, message):
    edit_config(hf_copy, **changes)
    assert message in convert_error(hf_copy)


def test_rms_norm_eps_defaults_as_in_transformers(hf_copy):
    import transformers

    cfg = json.loads((hf_copy / "config.json").read_text())
    del cfg["rms_norm_eps"]
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    assert sj.load_target(hf_copy, progress=False).cfg.rms_norm_eps == transformers.Qwen2Config().rms_norm_eps
    for arch in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
        cfg["architectures"] = [arch]
        default = getattr(transformers, arch.replace("ForCausalLM", "Config"))().rms_norm_eps
        assert ModelConfig.from_hf(cfg).rms_norm_eps == default


def test_index_must_name_shards_in_the_directory(hf_copy):
    (hf_copy / "model.safetensors").rename(hf_copy / "model-00001-of-00002.safetensors")
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "../elsewhere/model.safetensors"}}))
    assert "weight_map must name shard files in" in convert_error(hf_copy)


def test_convert_refuses_to_replace_its_source(hf_copy, tmp_path, capsys):
    before = sorted(p.name for p in hf_copy.iterdir())
    for out in (hf_copy, tmp_path):
        assert cli.main(["convert", str(hf_copy), str(out), "--force"]) == 1
        assert "replacing it would delete it" in capsys.readouterr().err
    assert sorted(p.name for p in hf_copy.iterdir()) == before
    (tmp_path / "afile").write_text("x")
    assert cli.main(["convert", str(hf_copy), str(tmp_path / "afile" / "sub")]) == 1
    assert "cannot create" in capsys.readouterr().err


def test_a_draft_directory_given_as_the_target_is_named(capsys):
    """It was 'unsupported architecture LlamaForCausalLMEagle3' (convert, load_target) or 'has no tokenizer
    files' (generate)."""
    from specpv_jax import cli
    from specpv_jax.demo import ASSETS

    for name, what in (("eagle3", "an EAGLE-3 head"), ("longspec", "a LongSpec draft")):
        with pytest.raises(ValueError, match=f"holds {what}, not a target model: it loads as a draft"):
            sj.load_target(ASSETS / name)
        assert cli.main(["generate", str(ASSETS / name), "--prompt", "hi"]) == 1
        assert f"holds {what}, not a target model" in capsys.readouterr().err


def test_checkpoint_of_wrong_kind(tmp_path):
    checkpoint.save(tmp_path / "ck", {"w": np.zeros(2, np.float32)}, {"kind": "eagle3"})
    with pytest.raises(CheckpointError, match="holds a 'eagle3' checkpoint"):
        sj.load_target(tmp_path / "ck")


def test_an_empty_directory_is_filled_in_place(hf_model, tmp_path, monkeypatch):
    """An empty OUT (the working directory, a mount point) is filled where it is, not replaced: replacing the
    working directory left the caller in a deleted one, and a mount point cannot be renamed."""
    target = sj.load_target(hf_model("llama-mha")[0], progress=False)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert sj.save_target(target, ".") == here
    assert sorted(p.name for p in here.iterdir()) == ["params", checkpoint.META_FILE]
    assert sj.load_target(here).cfg == target.cfg
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoint.os.path, "ismount", lambda p: pathlib.Path(p) == here)
    with pytest.raises(CheckpointError, match="is a mount point, which cannot be replaced"):
        sj.save_target(target, here, overwrite=True)


def test_a_failed_write_is_a_checkpoint_error_and_leaves_nothing(hf_model, tmp_path, monkeypatch):
    """On a full disk: one error; no tracebacks of the writes still in flight, whose callbacks found orbax's
    event loop closed (4 of 5 converts printed 1 to 11)."""
    import types

    target = sj.load_target(hf_model("llama-mha")[0], progress=False)
    (tmp_path / "empty").mkdir()

    def full_disk(self, *a, **k):
        raise ValueError("RESOURCE_EXHAUSTED: Failed writing: No space left on device\nand a page more")

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    monkeypatch.setattr(checkpoint.ocp.StandardCheckpointer, "save", full_disk)
    for out in (tmp_path / "new", tmp_path / "empty"):
        with pytest.raises(CheckpointError, match=f"cannot write the parameters of {out}: RESOURCE_EXHAUSTED: "
                                                  "Failed writing: No space left on device$"):
            sj.save_target(target, out)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["empty"]
    for error in (RuntimeError("Event loop is closed"), RuntimeError("another")):
        sys.unraisablehook(types.SimpleNamespace(exc_value=error, object=None))
    assert [str(r.exc_value) for r in reported] == ["another"]


def test_a_failed_saves_directory_made_again_by_late_writes_is_deleted(tmp_path):
    """On a full disk, orbax's writes still in flight made the deleted directory's subdirectories again: 2 of 3
    converts left an (empty) `.OUT.partial-*` behind."""
    import threading

    tree = tmp_path / ".ck.partial-0123abcd"
    (tree / "params").mkdir(parents=True)

    def late_write():
        while tree.exists():
            time.sleep(0.01)
        (tree / "params" / "d").mkdir(parents=True)  # right after the first deletion

    writer = threading.Thread(target=late_write)
    writer.start()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "could not delete" only when it could not
        checkpoint._remove(tree)
    writer.join()
    assert not tree.exists()


def test_a_second_interrupt_during_the_clean_up_still_removes_what_the_save_made(tmp_path, monkeypatch):
    """Ctrl-C twice: the second one, in the clean-up's wait for late writes, left the directories the save had
    made (OUT's missing parents)."""
    def interrupted_twice(*a, **k):
        def again(seconds):
            raise KeyboardInterrupt

        monkeypatch.setattr(checkpoint.time, "sleep", again)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_save_params", interrupted_twice)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "a" / "b" / "ck", {"w": np.zeros(2, np.float32)}, {"kind": "target"})
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_save_leaves_nothing_and_quiets_orbax_after(hf_model, tmp_path, monkeypatch):
    """Ctrl-C during the save: orbax's commit thread, still running after our clean-up, logged a page-long
    traceback ('cannot schedule new futures after shutdown', 1 of 10 interrupted converts)."""
    import logging

    target = sj.load_target(hf_model("llama-mha")[0], progress=False)

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.ocp.StandardCheckpointer, "save", interrupted)
    absl = logging.getLogger("absl")
    for logger in (absl, logging.getLogger("asyncio")):
        monkeypatch.setattr(logger, "filters", [])
    saved_to = []
    real_save = checkpoint._save_params
    monkeypatch.setattr(checkpoint, "_save_params", lambda path, *a: saved_to.append(path) or real_save(path, *a))
    with pytest.raises(KeyboardInterrupt):
        sj.save_target(target, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []

    def record(path, about):
        return logging.LogRecord("absl", logging.ERROR, path, 239, "Failed to run 2 Handler Commit operations or "
                                 "the Commit callback in background save thread, directory: %s", (about,), None)
    orbax = "/site-packages/orbax/checkpoint/_src/checkpointers/async_checkpointer.py"
    assert not absl.filter(record(orbax, saved_to[0]))
    # orbax's errors about other saves, and others' errors, are still logged
    assert absl.filter(record(orbax, tmp_path / ".other.partial-0123abcd" / "params"))
    assert absl.filter(record("/site-packages/other/module.py", saved_to[0]))


def test_an_interrupted_overwrites_old_copy_is_pointed_out(hf_model, tmp_path):
    target = sj.load_target(hf_model("llama-mha")[0], progress=False)
    (tmp_path / ".ckpt.old-0123abcd" / "params").mkdir(parents=True)  # a kill during the old copy's deletion
    with pytest.warns(UserWarning, match=r"\.ckpt\.old-0123abcd, left by an interrupted save to ckpt"):
        sj.save_target(target, tmp_path / "ckpt")


@pytest.mark.parametrize("version", ["1", None, True, 1.0])
def test_a_malformed_format_version_is_named(tmp_path, version):
    checkpoint.save(tmp_path / "ck", {"w": np.zeros(2, np.float32)}, {"kind": "target"})
    meta = json.loads((tmp_path / "ck" / checkpoint.META_FILE).read_text())
    (tmp_path / "ck" / checkpoint.META_FILE).write_text(json.dumps({**meta, "format_version": version}))
    with pytest.raises(CheckpointError, match=f"{checkpoint.META_FILE}: unsupported format 'specpv-jax' version"):
        sj.load_target(tmp_path / "ck")


def test_leftovers_of_a_killed_in_place_save_do_not_block_the_next(hf_model, tmp_path):
    target = sj.load_target(hf_model("llama-mha")[0], progress=False)
    (tmp_path / "ckpt" / ".partial-0123abcd" / "params").mkdir(parents=True)  # a kill while filling ckpt/
    with pytest.warns(UserWarning, match=r"ckpt holds \.partial-0123abcd, left by an interrupted save to ckpt"):
        sj.save_target(target, tmp_path / "ckpt")
    assert sj.load_target(tmp_path / "ckpt").cfg == target.cfg


def test_an_empty_directory_in_a_read_only_one_is_filled(hf_model, tmp_path, monkeypatch):
    """Filling an empty directory in place writes nothing beside it: a mount point the user owns under a
    root-owned /mnt takes a checkpoint (faked: tests run as root, for whom os.access allows all)."""
    target = sj.load_target(hf_model("llama-mha")[0], progress=False)
    out = tmp_path / "disk"
    out.mkdir()
    access = checkpoint.os.access
    monkeypatch.setattr(checkpoint.os, "access", lambda p, mode: pathlib.Path(p) != tmp_path and access(p, mode))
    assert sj.save_target(target, out) == out
    assert sj.load_target(out).cfg == target.cfg
    with pytest.raises(CheckpointError, match=f"cannot create {tmp_path / 'new'}: {tmp_path} is not a writable"):
        sj.save_target(target, tmp_path / "new")


def test_a_save_killed_while_moving_into_place_is_named(hf_model, tmp_path):
    """Killed between moving params/ up and its marker file: neither "pass --force" (refused as no model
    directory) nor a load names what is there; the save does."""
    target = sj.load_target(hf_model("llama-mha")[0], progress=False)
    (tmp_path / "out" / "params").mkdir(parents=True)
    (tmp_path / "out" / ".partial-0123abcd").mkdir()
    for overwrite in (False, True):
        with pytest.raises(CheckpointError, match=r"holds part of a checkpoint that a save killed while moving it "
                                                  r"into place left, beside \.partial-0123abcd"):
            sj.save_target(target, tmp_path / "out", overwrite=overwrite)


def test_the_working_directory_is_never_replaced(hf_model, tmp_path, monkeypatch):
    target = sj.load_target(hf_model("llama-mha")[0], progress=False)
    sj.save_target(target, tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="is or holds the working directory"):
        sj.save_target(target, ".", overwrite=True)
    assert sj.load_target(".").cfg == target.cfg


def test_a_failure_while_moving_into_an_empty_directory_leaves_it_empty(hf_model, tmp_path, monkeypatch):
    target = sj.load_target(hf_model("llama-mha")[0], progress=False)
    (tmp_path / "out").mkdir()
    replace = checkpoint.os.replace

    def fail_on_the_marker(src, dst):
        if pathlib.Path(dst).name == checkpoint.META_FILE:
            raise OSError("disk gone")
        replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", fail_on_the_marker)
    with pytest.raises(OSError, match="disk gone"):
        sj.save_target(target, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("arch, flags", [("qwen3", {}), ("llama", {"qk_norm": True}), ("qwen2", {}),
                                         ("llama", {"qkv_bias": True})])
def test_export_hf_refuses_flags_its_architecture_cannot_hold(tmp_path, arch, flags):
    cfg = ModelConfig(arch=arch, vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=4, max_position_embeddings=32, **flags)
    with pytest.raises(ConversionError, match=r"has no layout for .*needs \(qkv_bias, o_bias, qk_norm\) = "):
        export_hf(tmp_path / "out", cfg, {})
    assert not (tmp_path / "out").exists()


def test_numpy_eos_ids_become_python_ints():
    cfg = ModelConfig(arch="llama", vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=4, max_position_embeddings=32, eos_token_ids=(np.int64(2),))
    assert type(cfg.eos_token_ids[0]) is int and json.dumps(cfg.to_dict())
