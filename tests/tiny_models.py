"""Tiny offline models for tests and benchmarks: a random BERT classifier and a random Llama causal LM, saved with
their tokenizers, built from a config in seconds (no downloads)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertTokenizer,
)

from stages.models import ModelError

__all__ = ["make_tiny_classifier", "make_tiny_causal_lm"]


def make_tiny_classifier(
    out_dir: str | os.PathLike,
    *,
    num_labels: int = 2,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    intermediate: int = 64,
    vocab_texts: Sequence[str] = (),
    seed: int = 0,
    auto_model: type = AutoModelForSequenceClassification,
) -> Path:
    """Save a tiny random BERT with an `auto_model` head and its fast tokenizer to `out_dir` (no downloads).

    The WordPiece vocabulary is the special tokens, every lowercase word of `vocab_texts`, and single
    letters/digits/punctuation (plus their `##` continuations), so any text tokenises without [UNK] floods.
    """
    out_dir = Path(out_dir)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    words = sorted({w for text in vocab_texts for w in re.findall(r"[a-z0-9]+", text.lower())} - set(chars))
    tokens = specials + chars + [f"##{c}" for c in chars] + list(".,!?'\"-:;()") + words
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True, model_max_length=512)
    if hidden % heads:
        raise ModelError(f"hidden={hidden} is not divisible by heads={heads}; pick a multiple of heads")
    config = BertConfig(
        vocab_size=len(tokens), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=512, num_labels=num_labels,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = auto_model.from_config(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_tiny_causal_lm(
    out_dir: str | os.PathLike,
    *,
    texts: Sequence[str],
    vocab_size: int = 300,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    intermediate: int = 64,
    seed: int = 0,
) -> Path:
    """Save a tiny random Llama causal LM and a byte-level BPE tokenizer trained on `texts` (no downloads).

    Two calls with other `vocab_size`s give two tokenizers that cut the same text differently (cross-tokenizer
    tests). The tokenizer's EOS (`</s>`) is also its pad token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    if hidden % heads:
        raise ModelError(f"hidden={hidden} is not divisible by heads={heads}; pick a multiple of heads")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="</s>",
                                        model_max_length=4096)
    config = LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate,
                         max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
