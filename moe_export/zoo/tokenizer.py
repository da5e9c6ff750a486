"""Byte-level BPE trained here with ``tokenizers`` and saved in the Hugging Face format, so that
``AutoTokenizer.from_pretrained(dir)`` loads it like any hub tokenizer."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import torch

from moe_export.io import atomic_dir, atomic_write_json
from moe_export.paths import moe_export_home

EOS, PAD = "<|endoftext|>", "<|pad|>"
# Cap on the characters of each corpus the BPE merges are learned from: keeps training to seconds.
TRAIN_CHARS = 2_000_000


@functools.lru_cache(maxsize=None)
def _byte_decoder() -> dict[str, int]:
    # GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to code points 256+.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = [], 0
    for b in range(256):
        if b in keep:
            chars.append(b)
        else:
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(range(256), chars)}


def token_bytes(tokenizer) -> torch.Tensor:
    """Number of UTF-8 bytes each token id stands for (0 for special tokens): LongTensor[V]."""
    dec = _byte_decoder()
    special = set(tokenizer.all_special_ids)
    out = torch.zeros(len(tokenizer), dtype=torch.long)
    for tok, i in tokenizer.get_vocab().items():
        if i not in special:
            out[i] = sum(1 for ch in tok if ch in dec)
    return out


def train_bpe(texts: list[str], vocab_size: int):
    """Byte-level BPE over ``texts`` -> ``PreTrainedTokenizerFast`` (ids 0, 1 are EOS, PAD)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=EOS,
                                   model_max_length=1 << 20)


def tokenizer_key(vocab_size: int, corpora: list) -> str:
    h = hashlib.sha256(json.dumps([vocab_size, TRAIN_CHARS, [c.sha256 for c in corpora]]).encode())
    return f"bpe{vocab_size}-{h.hexdigest()[:12]}"


def get_tokenizer(vocab_size: int, corpus_names: list[str]):
    """Train (or load from the cache) the BPE for these corpora; returns (tokenizer, cache_dir)."""
    from transformers import AutoTokenizer

    from moe_export.zoo.data import load_corpus

    corpora = [load_corpus(n) for n in corpus_names]
    cache = moe_export_home() / "tokenizers" / tokenizer_key(vocab_size, corpora)
    if not (cache / "tokenizer_meta.json").exists():
        # Whole lines from the head of each train split: deterministic and bounded.
        texts = []
        for c in corpora:
            t = c.splits["train"][:TRAIN_CHARS]
            texts.extend(t.splitlines(keepends=True))
        tok = train_bpe(texts, vocab_size)
        with atomic_dir(cache, replace=False) as tmp:  # another process may win the race: its tokenizer is identical
            tok.save_pretrained(tmp)
            atomic_write_json(tmp / "tokenizer_meta.json", {
                "vocab_size": vocab_size, "corpora": corpus_names,
                "corpus_sha256": {c.name: c.sha256 for c in corpora}, "train_chars_per_corpus": TRAIN_CHARS,
            })
    return AutoTokenizer.from_pretrained(cache), cache
