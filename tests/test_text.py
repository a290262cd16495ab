"""Tokenizer support: text prompts, chat templates, the CLI, tokenizers travelling with orbax exports."""

from __future__ import annotations

import shutil

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import specpv_jax as sj
from specpv_jax import cli, text

CHAT = "{% for m in messages %}<u> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<a>{% endif %}"


@pytest.fixture
def model_dir(hf_model, tmp_path):
    """A tiny HF model directory with a word-level tokenizer over its 160 ids and a chat template."""
    src, _ = hf_model("llama-mha")
    d = tmp_path / "model"
    shutil.copytree(src, d)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<u>": 3, "<a>": 4, **{f"w{i}": i for i in range(5, 160)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT
    fast.save_pretrained(d)
    return d


def test_encode_with_and_without_chat_template(model_dir):
    model = sj.load_target(model_dir, progress=False)
    assert text.encode_prompt(model.tokenizer, "w7 w8", chat=False)[-2:] == [7, 8]
    assert text.encode_prompt(model.tokenizer, "w7 w8") == [3, 7, 8, 4]
    assert text.decode(model.tokenizer, [7, 8, 2]) == "w7 w8"


def test_no_tokenizer_is_a_clear_error(hf_model):
    model = sj.load_target(hf_model("llama-mha")[0], progress=False)
    with pytest.raises(ValueError, match="no tokenizer files"):
        text.encode_prompt(model.tokenizer, "hello")


def test_cli_generate_from_text(model_dir, capsys):
    assert cli.main(["generate", str(model_dir), "--prompt", "w7 w8 w9", "--max-new-tokens", "6", "--stats"]) == 0
    out = capsys.readouterr()
    words = out.out.split()
    assert 1 <= len(words) <= 6 and all(w.startswith("w") for w in words)
    assert "tokens_per_s" in out.err
    assert cli.main(["generate", str(model_dir), "--prompt", "w7 w8 w9", "--max-new-tokens", "6", "--no-stream"]) == 0
    assert capsys.readouterr().out.split() == words  # streamed text == text printed at the end


def test_text_stream_holds_back_incomplete_characters(capsys):
    class Bytes:  # a byte-level tokenizer: id = byte
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = text.TextStream(Bytes())
    for chunk in ([104, 105, 32], [0xC3], [0xA9, 33]):  # "hi " then "é" split over two steps, then "!"
        stream([chunk])
        if chunk == [0xC3]:
            assert capsys.readouterr().out == "hi "
    assert capsys.readouterr().out == "é!"
    stream([[33, 0xC3]])  # text, then a character cut off by the end of generation: the text is not held back
    assert capsys.readouterr().out == "!"
    stream.flush()
    assert capsys.readouterr().out == "\ufffd"


def test_tokenizer_travels_with_orbax_export(model_dir, tmp_path):
    sj.save_target(sj.load_target(model_dir, progress=False), tmp_path / "ck")
    restored = sj.load_target(tmp_path / "ck")
    assert restored.tokenizer is not None
    assert text.encode_prompt(restored.tokenizer, "w7 w8") == [3, 7, 8, 4]


def test_a_moved_sources_tokenizer_is_saved_from_memory(model_dir, tmp_path):
    """The export copies the source's tokenizer files; when they are gone (the directory moved after loading),
    it writes the loaded tokenizer instead of silently exporting none."""
    model = sj.load_target(model_dir, progress=False)
    model_dir.rename(tmp_path / "moved")
    sj.save_target(model, tmp_path / "ck")
    restored = sj.load_target(tmp_path / "ck")
    assert text.encode_prompt(restored.tokenizer, "w7 w8") == [3, 7, 8, 4]
