"""Tokenized data: built once into memmaps with a manifest, then served as packed batches.

Layout of a data directory (written atomically, keyed by source fingerprint + tokenizer hash):
  manifest.json          source, fingerprint, tokenizer sha256, vocab, eos id, dtype, split rule,
                         per split: token/document counts and the sha256 of each file
  tokenizer.json         the tokenizer the ids come from
  {train,val}.bin        token ids of all documents of the split, concatenated, each document
                         ended by <|endoftext|>; uint16 when the vocabulary fits, else uint32
  {train,val}.idx        int64 document start offsets (num_docs + 1)

Split: a document goes to validation when crc32(its name) mod 10^6 < val_fraction * 10^6: a
deterministic rule that does not move when documents are added elsewhere.

Batches (the nanoGPT "concatenate and chunk" scheme, plus document boundaries): the stream is
cut into fixed windows of seq_len tokens; window w is tokens[w*T:(w+1)*T]. A micro-batch is B
windows concatenated into one packed row of N = B*T tokens with cu_seqlens at every window start
and, with `pack`, at every document start inside a window, so attention never crosses a
document and RoPE positions restart per document (as in Krell et al. 2021, "Efficient sequence
packing without cross-contamination"). Without `pack`, only window starts are boundaries. The
window order is a seeded permutation per epoch; the position in the data is just the number of
windows consumed, which makes resuming exact.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slmfast.distill.sources import Corpus, describe_report, load_corpus
from slmfast.distill.tokenizer import TOKENIZER_FILE, eos_id, load_tokenizer, tokenizer_hash, train_bpe
from slmfast.io import atomic_directory, atomic_write_text

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_val(name: str, val_fraction: float) -> bool:
    return zlib.crc32(name.encode()) % 1_000_000 < int(round(val_fraction * 1_000_000))


def split_documents(corpus: Corpus, val_fraction: float) -> tuple[list[int], list[int]]:
    train, val = [], []
    for i, name in enumerate(corpus.names):
        (val if is_val(name, val_fraction) else train).append(i)
    if not val and len(train) > 1:      # tiny corpora: hold out the last document
        val.append(train.pop())
    if not train:
        raise ValueError("data: every document landed in the validation split; lower data.val_fraction")
    return train, val


def _encode_split(tok, texts: list[str], eos: int, dtype, path_bin: Path, path_idx: Path) -> dict:
    offsets = [0]
    with open(path_bin, "wb") as f:
        for start in range(0, len(texts), 64):
            for enc in tok.encode_batch(texts[start:start + 64]):
                ids = np.asarray(enc.ids + [eos], dtype=dtype)        # (len + 1,)
                ids.tofile(f)
                offsets.append(offsets[-1] + len(ids))
    np.asarray(offsets, dtype=np.int64).tofile(path_idx)
    return {"tokens": offsets[-1], "documents": len(offsets) - 1,
            "bin": path_bin.name, "bin_sha256": file_sha256(path_bin),
            "idx": path_idx.name, "idx_sha256": file_sha256(path_idx)}


def prepare_data(source: str, out_root: str | Path, *, tokenizer_path: str = "", vocab_size: int = 8192,
                 val_fraction: float = 0.02, max_documents: int = 0, text_field: str = "text",
                 hf_split: str = "train", pattern: str = "*", log=print) -> Path:
    """Read the source, train or load the tokenizer, tokenize once; return the data directory
    (reused when a directory for the same source, tokenizer and split already exists)."""
    t0 = time.perf_counter()
    corpus = load_corpus(source, text_field, hf_split, pattern, max_documents)
    log(f"data: {corpus.description}: {len(corpus.texts)} documents, {corpus.num_bytes / 2**20:.1f} MiB "
        f"({time.perf_counter() - t0:.1f} s)")
    for line in describe_report(corpus):
        log(f"data: {line}")
    train_docs, val_docs = split_documents(corpus, val_fraction)

    # The directory is named by (source, tokenizer, split); a tokenizer trained here is found again
    # through an alias keyed by its training settings, so the BPE is not retrained on every run.
    out_root = Path(out_root)

    def key(tok_id: str) -> str:
        text = json.dumps([FORMAT_VERSION, corpus.fingerprint, tok_id, val_fraction, max_documents])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    tok = load_tokenizer(tokenizer_path) if tokenizer_path else None
    alias = out_root / f"bpe-{key(f'bpe{vocab_size}')}.txt"
    if tok is None and alias.is_file() and (out_root / alias.read_text().strip() / MANIFEST).is_file():
        directory = out_root / alias.read_text().strip()
        log(f"data: reusing {directory}")
        return directory
    if tok is None:
        t1 = time.perf_counter()
        tok = train_bpe((corpus.texts[i] for i in train_docs), vocab_size, length=len(train_docs))
        log(f"data: trained a byte-level BPE of {tok.get_vocab_size()} tokens on the train split "
            f"({time.perf_counter() - t1:.1f} s)")
        atomic_write_text(alias, key(tokenizer_hash(tok)) + "\n")
    directory = out_root / key(tokenizer_hash(tok))
    if (directory / MANIFEST).is_file():
        log(f"data: reusing {directory}")
        return directory
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if vocab <= 65536 else np.uint32
    eos = eos_id(tok)
    t2 = time.perf_counter()
    with atomic_directory(directory) as tmp:
        (tmp / TOKENIZER_FILE).write_text(tok.to_str())
        splits = {}
        for split, docs in (("train", train_docs), ("val", val_docs)):
            splits[split] = _encode_split(tok, [corpus.texts[i] for i in docs], eos, dtype,
                                          tmp / f"{split}.bin", tmp / f"{split}.idx")
        manifest = {
            "format_version": FORMAT_VERSION, "source": source, "description": corpus.description,
            "source_fingerprint": corpus.fingerprint, "tokenizer_sha256": tokenizer_hash(tok),
            "vocab_size": vocab, "eos_id": eos, "dtype": np.dtype(dtype).name,
            "split": {"rule": "crc32(name) % 1e6 < val_fraction * 1e6", "val_fraction": val_fraction,
                      "max_documents": max_documents},
            "splits": splits, "report": corpus.report,
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    log(f"data: tokenized {splits['train']['tokens']:,} train and {splits['val']['tokens']:,} val tokens "
        f"into {directory} ({time.perf_counter() - t2:.1f} s)")
    return directory


@dataclass
class Split:
    tokens: np.ndarray          # (L,) uint16/uint32 memmap
    offsets: np.ndarray         # (docs + 1,) int64 document starts


class TokenData:
    """A prepared data directory: its manifest, tokenizer and both splits as memmaps."""

    def __init__(self, directory: str | Path, verify: bool = False):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.directory} is not a prepared data directory ({MANIFEST} missing)")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{self.directory}: data format {self.manifest.get('format_version')} "
                             f"!= {FORMAT_VERSION}; delete it to rebuild")
        dtype = np.dtype(self.manifest["dtype"])
        self.splits = {}
        for name, info in self.manifest["splits"].items():
            if verify:
                for kind in ("bin", "idx"):
                    if file_sha256(self.directory / info[kind]) != info[f"{kind}_sha256"]:
                        raise ValueError(f"{self.directory / info[kind]} does not match its manifest "
                                         "checksum")
            tokens = np.memmap(self.directory / info["bin"], dtype=dtype, mode="r") if info["tokens"] else \
                np.zeros(0, dtype=dtype)
            offsets = np.fromfile(self.directory / info["idx"], dtype=np.int64)
            self.splits[name] = Split(tokens, offsets)

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer_sha256"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def data_id(self) -> str:
        """What the tokens are: the checksum of the train and val token files."""
        s = self.manifest["splits"]
        return hashlib.sha256((s["train"]["bin_sha256"] + s["val"]["bin_sha256"]).encode()).hexdigest()

    def tokenizer(self):
        return load_tokenizer(self.directory / TOKENIZER_FILE)


@dataclass
class Batch:
    input_ids: torch.Tensor     # (N,) int64, B windows concatenated
    cu_seqlens: torch.Tensor    # (S + 1,) int32 segment starts (windows and, packed, documents)
    max_seqlen: int
    windows: np.ndarray         # (B,) window ids, for the teacher cache
    num_targets: int            # positions that predict a token: N - segments

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device, non_blocking=True),
                     self.cu_seqlens.to(device, non_blocking=True), self.max_seqlen, self.windows,
                     self.num_targets)


class Windows:
    """Fixed windows of seq_len tokens over one split, with document boundaries."""

    def __init__(self, split: Split, seq_len: int, pack: bool = True):
        self.split, self.seq_len, self.pack = split, seq_len, pack
        self.count = len(split.tokens) // seq_len

    def batch(self, window_ids) -> Batch:
        T = self.seq_len
        window_ids = np.asarray(window_ids, dtype=np.int64)
        rows, cu = [], [0]
        for w in window_ids:
            start, end = int(w) * T, int(w) * T + T
            rows.append(np.asarray(self.split.tokens[start:end], dtype=np.int64))      # (T,)
            base = cu[-1]
            if self.pack:
                # document starts strictly inside the window
                lo, hi = np.searchsorted(self.split.offsets, [start, end], side="right")
                cu.extend(int(o - start) + base for o in self.split.offsets[lo:hi] if start < o < end)
            cu.append(base + T)
        cu_seqlens = torch.tensor(cu, dtype=torch.int32)                                # (S + 1,)
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        n = len(rows) * T
        return Batch(torch.from_numpy(np.concatenate(rows)), cu_seqlens, int(lengths.max()), window_ids,
                     n - len(lengths))


class WindowSampler:
    """Window ids in a seeded order, reshuffled every epoch: sample s is window perm_e[s % W]
    with e = s // W. Stateless apart from a cache of the current permutation."""

    def __init__(self, num_windows: int, seed: int):
        if num_windows < 1:
            raise ValueError("data: the train split is shorter than one sequence (data.seq_len)")
        self.num_windows, self.seed = num_windows, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._epoch = epoch
        return self._perm

    def take(self, start: int, count: int) -> np.ndarray:
        samples = np.arange(start, start + count, dtype=np.int64)                     # (count,)
        epochs, offsets = np.divmod(samples, self.num_windows)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._permutation(int(epoch))[offsets[mask]]
        return out
