"""Tokenizers for training: a byte-level BPE trained here, or a tokenizer.json from elsewhere.

The BPE is GPT-2's byte-level scheme (Radford et al. 2019; Sennrich et al. 2016 for BPE): text is
mapped to bytes, bytes to 256 printable symbols, and merges are learned on top, so every input
is encodable and nothing is ever <unk>. It is trained with the `tokenizers` library from a Python
iterator over the documents (not from files: its file reader stops at the first non-UTF-8 file).
One special token, <|endoftext|>, ends every document.

A tokenizer's identity is the sha256 of its canonical JSON (`Tokenizer.to_str()`), recorded in
every data manifest, checkpoint and teacher cache, so mismatches are caught, not trained through.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


def train_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    return Tokenizer.from_file(str(path))


def find_tokenizer_file(directory: str | Path) -> Path | None:
    path = Path(directory) / TOKENIZER_FILE
    return path if path.is_file() else None


def tokenizer_hash(tok) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def eos_id(tok) -> int:
    token_id = tok.token_to_id(EOS_TOKEN)
    if token_id is None:
        # A tokenizer from elsewhere: use its own end-of-text token if it has a usual one.
        for name in ("</s>", "<|end_of_text|>", "<eos>", "<|im_end|>"):
            token_id = tok.token_to_id(name)
            if token_id is not None:
                return token_id
        raise ValueError(f"the tokenizer has no end-of-document token ({EOS_TOKEN} or a usual one)")
    return token_id


def same_vocabulary(a, b) -> bool:
    """Two tokenizers map every string to the same ids (their vocabularies are identical)."""
    return tokenizer_hash(a) == tokenizer_hash(b) or a.get_vocab(with_added_tokens=True) == \
        b.get_vocab(with_added_tokens=True)
