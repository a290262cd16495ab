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


def test_chat_template_options_reach_the_template(model_dir):
    """Qwen3's templates read enable_thinking; generate's --chat-option sets such variables."""
    from specpv_jax.cli import parse_chat_options

    model = sj.load_target(model_dir, progress=False)
    model.tokenizer.chat_template = CHAT.replace("<a>", "<a>{% if enable_thinking is false %} w9{% endif %}")
    assert text.encode_prompt(model.tokenizer, "w7 w8") == [3, 7, 8, 4]
    options = parse_chat_options(["enable_thinking=false"])
    assert options == {"enable_thinking": False}
    assert text.encode_prompt(model.tokenizer, "w7 w8", template_options=options) == [3, 7, 8, 4, 9]
    assert parse_chat_options(["style=plain", "n=3"]) == {"style": "plain", "n": 3}
    with pytest.raises(ValueError, match="expected NAME=VALUE"):
        parse_chat_options(["enable_thinking"])
    model.tokenizer.chat_template = None  # options for a template that is not there: said, not dropped silently
    with pytest.warns(sj.SpecPVWarning, match="template options enable_thinking have no effect: the tokenizer "
                                              "in .* has no chat template"):
        assert text.encode_prompt(model.tokenizer, "w7 w8", template_options=options)[-2:] == [7, 8]


def test_a_typed_bos_is_not_doubled_without_the_chat_template():
    """Llama-style tokenizers add BOS themselves; a prompt that starts with one (rendered elsewhere, --no-chat)
    keeps just that one. BOS anywhere else is the user's text."""
    from tokenizers import processors

    vocab = {"<pad>": 0, "<s>": 1, **{f"w{i}": i for i in range(2, 10)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>")
    assert text.encode_prompt(fast, "w7 w8", chat=False) == [1, 7, 8]
    assert text.encode_prompt(fast, "<s> w7 w8", chat=False) == [1, 7, 8]
    assert text.encode_prompt(fast, "w7 <s> w8", chat=False) == [1, 7, 1, 8]


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
    assert cli.main(["generate", str(model_dir), "--prompt", "w7 w8 w9", "--max-new-tokens", "6", "--no-stream",
                     "--top-p", "0.5", "--seed", "3"]) == 0
    out = capsys.readouterr()
    assert out.out.split() == words  # streamed text == text printed at the end
    # The library's warnings read as the command's (their file and line would be the CLI's own).
    assert "specpv-jax generate: warning: top_p=0.5 has no effect with temperature=0" in out.err
    assert "specpv-jax generate: warning: --seed 3 has no effect with --temperature 0 (greedy decoding)" in out.err


def test_cli_generate_notes_a_model_loaded_at_twice_its_stored_size(model_dir, tmp_path, capsys):
    """--dtype defaults to float32: a bfloat16 checkpoint (an 8B model: 16 GB) took twice its size, unsaid."""
    from specpv_jax import loading

    sj.save_target(sj.load_target(model_dir, dtype="bfloat16", progress=False), tmp_path / "bf16")
    assert (loading.stored_dtype(tmp_path / "bf16"), loading.stored_dtype(model_dir)) == ("bfloat16", "float32")
    run = ["--prompt", "w7 w8 w9", "--max-new-tokens", "2", "--no-stream"]
    for model, dtype, noted in ((tmp_path / "bf16", [], True), (tmp_path / "bf16", ["--dtype", "float32"], False),
                                (model_dir, [], False)):
        assert cli.main(["generate", str(model), *run, *dtype]) == 0
        err = capsys.readouterr().err
        assert (f"note: {model} stores bfloat16, loaded as float32 (--dtype's default) at 2x its size: --dtype "
                f"bfloat16 keeps it" in err) == noted, err


def test_text_stream_holds_back_incomplete_characters(capsys):
    class Bytes:  # a byte-level tokenizer: id = byte
        def decode(self, ids, **_):
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


CORPUS = "déjà vu , naïve café — 東京 and  spaces\n\tcode(x) , y ."


def _trained_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer trained here: byte-level (GPT-2/Llama-3/Qwen style) or SentencePiece-like."""
    from tokenizers import decoders, trainers

    tok = Tokenizer(models.BPE())
    if kind == "byte-level":
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        alphabet = []
    tok.train_from_iterator([CORPUS * 3, "ok 🙂 fine"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>"], initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


def _streamed(tokenizer, ids: list[int], step: int) -> str:
    import io

    out = io.StringIO()
    stream = text.TextStream(tokenizer, file=out)
    for i in range(0, len(ids), step):
        stream([ids[i:i + step]])
    stream.flush()
    return out.getvalue()


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_text_stream_prints_what_decode_gives_from_a_bounded_window(kind):
    import numpy as np

    tokenizer = _trained_tokenizer(kind)
    random_ids = np.random.default_rng(0).integers(0, len(tokenizer), 600).tolist()  # incomplete characters too
    assert _streamed(tokenizer, random_ids, 3) == text.decode(tokenizer, random_ids)
    windows = []
    decode = tokenizer.decode
    tokenizer.decode = lambda ids, **kw: windows.append(len(ids)) or decode(ids, **kw)
    ids = tokenizer(CORPUS * 40, add_special_tokens=False)["input_ids"]
    for step in (1, 4):
        streamed = _streamed(tokenizer, ids, step)
        assert max(windows) <= 2 * text.TextStream.CONTEXT + step  # each call decodes a few tokens, not all so far
        assert streamed == text.decode(tokenizer, ids) == CORPUS * 40
        windows.clear()
    assert text.decode(tokenizer, tokenizer("a , x")["input_ids"]) == "a , x"  # no clean-up of spaces


def test_text_stream_slides_its_window_to_a_character_start_under_byte_fallback():
    """Llama-2 / Mistral style tokenizers spell characters outside their vocabulary as byte tokens <0xNN>, and
    their ByteFallback decoder turns a whole run of them into U+FFFD when one byte is invalid: the window slid
    to a token mid-character, and the rest of the run printed as U+FFFD ('ok สวัส������ done')."""
    from tokenizers import decoders, normalizers

    vocab = {"<unk>": 0, "<s>": 1, **{f"<0x{i:02X}>": 2 + i for i in range(256)}}
    vocab.update({c: len(vocab) + i for i, c in enumerate("▁abcdefghijklmnopqrstuvwxyz")})
    tok = Tokenizer(models.BPE(vocab, [], byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")
    sample = "ok สวัสดีครับ done नमस्ते दुनिया 東京 🙂 " * 3  # 3- and 4-byte characters
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    assert text.decode(tokenizer, ids) == sample
    for step in (1, 4):
        assert _streamed(tokenizer, ids, step) == sample


def test_a_failing_chat_template_is_named(model_dir):
    tokenizer = sj.load_target(model_dir, progress=False).tokenizer
    tokenizer.chat_template = "{{ raise_exception('System role not supported') }}"
    with pytest.raises(ValueError, match=r"chat template of the tokenizer in .*model failed: TemplateError: "
                                         r"System role not supported \(encode without it"):
        text.encode_prompt(tokenizer, "w7")
    tokenizer.chat_template = "{% for m in messages %}"
    with pytest.raises(ValueError, match="TemplateSyntaxError"):
        text.encode_prompt(tokenizer, "w7")
    assert text.encode_prompt(tokenizer, "w7", chat=False)[-1] == 7


def test_cli_generate_checks_the_prompt_and_settings_before_loading_weights(model_dir, tmp_path, monkeypatch,
                                                                            capsys):
    from specpv_jax import loading

    def load_target(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(loading, "load_target", load_target)
    (tmp_path / "long.txt").write_text("w7 " * 2000)
    (model_dir / "chat_template.jinja").write_text("{{ raise_exception('System role not supported') }}")
    generate = ["generate", str(model_dir), "--prompt", "w7"]
    for argv, message in [
        (generate + ["--temperature", "-1"], "temperature must be finite"),
        (generate + ["--temperature", "0.5", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (generate + ["--temperature", "0.5", "--top-k", "-2"], "top_k must be >= 0"),
        (generate + ["--seed", str(2 ** 70)], "seed must be a 64-bit signed integer"),
        (["generate", str(model_dir), "--prompt-file", str(tmp_path / "long.txt"), "--no-chat"],
         "over the model's max_position_embeddings=2048"),
        (generate, "chat template of the tokenizer in"),
        (generate + ["--no-chat", "--chat-option", "enable_thinking=false"], "does not combine with --no-chat"),
        (generate + ["--chat-option", "enable_thinking"], "expected NAME=VALUE"),
        # a name the template call sets: "got multiple values for keyword argument", with a traceback
        (generate + ["--chat-option", "add_generation_prompt=false"], "generate sets it when it applies the chat"),
        (generate + ["--prompt", "w7 \udcff"], "--prompt is not UTF-8 text (character 3)"),  # a console's surrogate
    ]:
        assert cli.main(argv) == 1, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(AssertionError, match="the weights were loaded"):  # the prompt passed every check
        cli.main(generate + ["--no-chat"])


def test_prompt_file_byte_order_mark_is_not_text(tmp_path, monkeypatch):
    import io

    (tmp_path / "p.txt").write_bytes("\ufeffw7 w8".encode("utf-8"))
    assert cli._read_prompt(str(tmp_path / "p.txt")) == "w7 w8"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("\ufeffw7\r\nw8".encode("utf-8"))))
    assert cli._read_prompt("-") == "w7\nw8"  # - reads standard input as a file is read
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"w7 \xff")))
    with pytest.raises(ValueError, match="--prompt-file - is not UTF-8 text"):
        cli._read_prompt("-")
    assert cli.parse_chat_options(["enable_thinking=False", "x=True", "y=false"]) == {
        "enable_thinking": False, "x": True, "y": False}  # Python's spelling too (the string "False" is true)


def test_convert_without_a_tokenizer_says_so(hf_model, tmp_path, capsys):
    assert cli.main(["convert", str(hf_model("llama-mha")[0]), str(tmp_path / "out")]) == 0
    assert "has no tokenizer files" in capsys.readouterr().err


def test_a_tokenizer_class_this_transformers_lacks_loads_as_a_fast_tokenizer(tmp_path, monkeypatch):
    """transformers 5 saves tokenizer_class "TokenizersBackend", which transformers 4 refuses (the demo models'
    tokenizers failed to load there): its tokenizer.json is read as a fast tokenizer."""
    import json

    import transformers

    from specpv_jax import loading
    from specpv_jax.demo import ASSETS

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS / "target" / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "NoSuchTokenizer"}))
    want = loading.load_tokenizer(ASSETS / "target")

    def refuse(*args, **kwargs):
        raise ValueError("Tokenizer class NoSuchTokenizer does not exist or is not currently imported.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    got = loading.load_tokenizer(tmp_path)
    assert got("def f(x):\n")["input_ids"] == want("def f(x):\n")["input_ids"]
    assert (got.eos_token, got.pad_token) == (want.eos_token, want.pad_token)
    with pytest.raises(ValueError, match="does not exist"):  # a class transformers has: AutoTokenizer decides
        loading.load_tokenizer(ASSETS / "target")


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
