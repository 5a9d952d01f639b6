"""Offline teacher: the teacher's top-k next-token log-probabilities, computed once, on disk.

Running a large teacher at every step costs a forward pass per batch; caching its sparse output
once lets every later run (other students, other hyperparameters) train against it at the cost of
reading k numbers per token. Keeping the top k of 8k-150k probabilities loses little: the mass
outside the top 64 is typically a few percent, and the loss can carry it as one extra bucket
(topk_distill_loss(tail="bucket")). Offline top-k teacher caches are how sparse knowledge
distillation is done at scale (see Anshumann et al. 2025, "Sparse Logit Sampling", on the bias of
plain top-k and its fixes).

Layout of a cache directory (written atomically):
  manifest.json                  k, seq_len, pack, data id, tokenizer sha256, teacher id and path,
                                 vocab, shard list with rows and sha256 of each file
  windows.npy                    (R,) int64: the train windows cached, sorted; row r <-> windows[r]
  ids-00000.npy ...              (rows, T, k) token ids: uint16 when the vocabulary fits in 16 bits
                                 (half the bytes of uint32, exact), else uint32
  logprobs-00000.npy ...         (rows, T, k) float16 log-probabilities (at temperature 1), sorted
                                 descending; fp16 keeps ~3 significant digits, far below the noise
                                 of a minibatch gradient, at half the bytes of fp32
Shards are numpy .npy files opened as memmaps, so a cache larger than memory reads only what a
batch needs. A cache is refused (ValueError naming what differs) when its data, tokenizer,
sequence length, packing, k or teacher do not match the run's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from slmfast.distill.data import TokenData, Windows, file_sha256
from slmfast.io import atomic_directory, atomic_write_text

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@torch.no_grad()
def topk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vocab: int, k: int,
                  chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-softmax over the first `vocab` columns, in token chunks: (N, k) ids, (N, k) logprobs."""
    weight = weight[:vocab]                                                   # (V, H)
    bias = bias[:vocab] if bias is not None else None
    ids, lps = [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = hidden[start:start + chunk].float() @ weight.float().T      # (C, V)
        if bias is not None:
            logits += bias.float()
        logp = torch.log_softmax(logits, dim=-1)                              # (C, V)
        values, index = torch.topk(logp, k, dim=-1)                           # (C, k) each, descending
        ids.append(index)
        lps.append(values)
    return torch.cat(ids), torch.cat(lps)


def build_cache(out: str | Path, *, teacher, data: TokenData, seq_len: int, pack: bool,
                window_ids: np.ndarray, k: int, batch_windows: int = 16, shard_rows: int = 4096,
                progress: bool = True, tokenizer_json: str | None = None, log=print) -> Path:
    """Run the teacher over the given train windows and write the cache directory."""
    from tqdm import tqdm

    vocab = data.vocab_size
    if k > vocab:
        raise ValueError(f"loss.topk ({k}) is larger than the vocabulary ({vocab})")
    windows = Windows(data.splits["train"], seq_len, pack)
    window_ids = np.unique(np.asarray(window_ids, dtype=np.int64))                # sorted
    id_dtype = np.uint16 if vocab <= 65536 else np.uint32
    rows = len(window_ids)
    shards = []
    out = Path(out)
    bar = tqdm(total=rows, desc="cache-teacher", unit="seq", disable=not progress, dynamic_ncols=True)
    with atomic_directory(out) as tmp:
        np.save(tmp / "windows.npy", window_ids)
        if tokenizer_json is not None:
            (tmp / "tokenizer.json").write_text(tokenizer_json)
        for shard, first in enumerate(range(0, rows, shard_rows)):
            count = min(shard_rows, rows - first)
            ids_name, lp_name = f"ids-{shard:05d}.npy", f"logprobs-{shard:05d}.npy"
            shape = (count, seq_len, k)
            ids_mm = np.lib.format.open_memmap(tmp / ids_name, mode="w+", dtype=id_dtype, shape=shape)
            lp_mm = np.lib.format.open_memmap(tmp / lp_name, mode="w+", dtype=np.float16, shape=shape)
            for start in range(0, count, batch_windows):
                chunk = window_ids[first + start:first + min(start + batch_windows, count)]
                batch = windows.batch(chunk)
                hidden = teacher.hidden(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)   # (N, H)
                ids, lps = topk_logprobs(hidden, teacher.output_weight, teacher.output_bias, vocab, k)
                n = len(chunk)
                ids_mm[start:start + n] = ids.view(n, seq_len, k).cpu().numpy().astype(id_dtype)
                lp_mm[start:start + n] = lps.view(n, seq_len, k).cpu().numpy().astype(np.float16)
                bar.update(n)
            ids_mm.flush()
            lp_mm.flush()
            del ids_mm, lp_mm
            shards.append({"rows": count, "ids": ids_name, "logprobs": lp_name,
                           "ids_sha256": file_sha256(tmp / ids_name),
                           "logprobs_sha256": file_sha256(tmp / lp_name)})
        manifest = {
            "format_version": FORMAT_VERSION, "k": k, "seq_len": seq_len, "pack": pack,
            "data_id": data.data_id, "tokenizer_sha256": data.tokenizer_sha256, "vocab_size": vocab,
            "teacher_id": teacher.id, "teacher_path": teacher.path, "teacher_vocab_size": teacher.vocab_size,
            "ids_dtype": np.dtype(id_dtype).name, "logprobs_dtype": "float16", "temperature": 1.0,
            "windows": rows, "shard_rows": shard_rows, "shards": shards,
            "windows_sha256": file_sha256(tmp / "windows.npy"),
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    bar.close()
    size = sum((out / s[f]).stat().st_size for s in shards for f in ("ids", "logprobs"))
    log(f"cache-teacher: {rows} sequences x {seq_len} tokens x top-{k} -> {out} ({size / 2**20:.1f} MiB)")
    return out


class TeacherCache:
    """A verified cache; `lookup(window_ids)` -> (N, k) int64 ids and (N, k) float32 log-probs."""

    def __init__(self, path: str | Path, *, data: TokenData, seq_len: int, pack: bool, k: int,
                 teacher_id: str | None = None, verify: bool = True):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise FileNotFoundError(f"teacher.cache {self.path} is not a teacher cache ({MANIFEST} missing); "
                                    "make one with `slmfast distill cache-teacher`")
        m = json.loads(mpath.read_text())
        self.manifest = m

        def refuse(what: str, cached, wanted):
            raise ValueError(f"teacher cache {self.path} does not match this run: {what} differs "
                             f"(cache: {cached!r}, run: {wanted!r}); rebuild it with "
                             "`slmfast distill cache-teacher`")

        if m.get("format_version") != FORMAT_VERSION:
            refuse("format version", m.get("format_version"), FORMAT_VERSION)
        if m["tokenizer_sha256"] != data.tokenizer_sha256:
            refuse("tokenizer", m["tokenizer_sha256"][:16], data.tokenizer_sha256[:16])
        if m["data_id"] != data.data_id:
            refuse("data (token files)", m["data_id"][:16], data.data_id[:16])
        if m["seq_len"] != seq_len:
            refuse("data.seq_len", m["seq_len"], seq_len)
        if m["pack"] != pack:
            refuse("data.pack", m["pack"], pack)
        if m["k"] != k:
            refuse("loss.topk", m["k"], k)
        if teacher_id is not None and m["teacher_id"] != teacher_id:
            refuse("teacher weights", f"{m['teacher_path']} ({m['teacher_id'][:16]})", teacher_id[:16])
        files = [("windows.npy", m["windows_sha256"])]
        files += [(s[f], s[f"{f}_sha256"]) for s in m["shards"] for f in ("ids", "logprobs")]
        for name, digest in files:
            if not (self.path / name).is_file():
                raise ValueError(f"teacher cache {self.path} is incomplete: {name} is missing")
            if verify and file_sha256(self.path / name) != digest:
                raise ValueError(f"teacher cache {self.path}: {name} does not match its manifest checksum")
        self.windows = np.load(self.path / "windows.npy")
        self.shard_rows = m["shard_rows"]
        self.ids = [np.load(self.path / s["ids"], mmap_mode="r") for s in m["shards"]]
        self.logprobs = [np.load(self.path / s["logprobs"], mmap_mode="r") for s in m["shards"]]
        self.k, self.seq_len = k, seq_len

    @property
    def teacher_id(self) -> str:
        return self.manifest["teacher_id"]

    def check_covers(self, window_ids: np.ndarray) -> None:
        missing = np.setdiff1d(np.unique(window_ids), self.windows)
        if missing.size:
            raise ValueError(f"teacher cache {self.path} covers {len(self.windows)} train sequences but "
                             f"this run needs {missing.size} more (more steps or a different seed than when "
                             "it was cached); rebuild it with the run's config")

    def lookup(self, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.searchsorted(self.windows, window_ids)
        if np.any(rows >= len(self.windows)) or np.any(self.windows[np.minimum(rows, len(self.windows) - 1)]
                                                        != window_ids):
            self.check_covers(np.asarray(window_ids))
        ids = np.stack([self.ids[r // self.shard_rows][r % self.shard_rows] for r in rows])       # (B, T, k)
        lps = np.stack([self.logprobs[r // self.shard_rows][r % self.shard_rows] for r in rows])  # (B, T, k)
        return (torch.from_numpy(ids.astype(np.int64)).view(-1, self.k),
                torch.from_numpy(lps.astype(np.float32)).view(-1, self.k))
