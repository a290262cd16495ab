"""A byte-level BPE tokenizer trained with `tokenizers`, saved so `AutoTokenizer` loads it."""

from __future__ import annotations

import os
from typing import Iterable

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike | None = None):
    """Trains a byte-level BPE over `texts` with BOS/EOS/PAD specials (ids 0, 1, 2); encoding adds BOS.

    Returns a `transformers.PreTrainedTokenizerFast`; with `out_dir`, also saves it there.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + 3:
        raise ValueError(f"vocab_size {vocab_size} is too small for byte-level BPE (at least 259)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=1 << 20)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
