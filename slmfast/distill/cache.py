"""Offline teacher: the teacher's top-k next-token log-probabilities, or tokens sampled from it,
computed once, on disk.

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

Sampled caches (kind "sampled"; Anshumann et al. 2025, "Sparse Logit Sampling: Accelerating
Knowledge Distillation in LLMs", random-sampling KD): top-k is biased (the student learns a
truncated teacher); instead, N tokens are drawn per position from the teacher at the distillation
temperature T, and the distinct ids are stored with their counts. count / N is an unbiased
estimate of the teacher's distribution, so sampled_distill_loss on it has the expected value and
gradient of full forward-KL distillation (slmfast/ops/_loss_math.py). The draws of window w come
from torch.multinomial with a generator seeded by (sample_seed, w) on the teacher's device, so a
window's draws do not depend on which other windows are cached or in which batches. Files:
  lengths-00000.npy ...          (rows, T) uint8: distinct ids per position (<= N <= 255)
  ids-00000.npy ...              (E,) distinct ids of every position, flat, ascending per position
                                 (uint16 or uint32 as above); E = the sum of lengths
  counts-00000.npy ...           (E,) uint8 draw counts (they sum to N per position)
  entropy-00000.npy ...          (rows, T) float16 teacher entropy at T (the KL's constant: with
                                 it the loss value estimates the KL itself, not only its gradient)
Bytes per token: 1 + 2 + E/(rows T) (2 + 1) against top-k's k (2 + 2) (16-bit ids); the manifest
records it. A sampled cache is refused when N, or T, differ from the run's.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from slmfast.distill.data import TokenData, Windows, file_sha256
from slmfast.io import atomic_directory, atomic_write_text

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CACHE_KINDS = ("topk", "sampled")


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


MAX_SAMPLES = 255  # counts are stored as uint8


def window_generator(seed: int, window: int, device) -> torch.Generator:
    """The generator of one window's draws: seeded by (seed, window) alone."""
    return torch.Generator(device=device).manual_seed((int(seed) * 1_000_003 + int(window)) % (2 ** 63))


@torch.no_grad()
def draw_samples(logits: torch.Tensor, samples: int, temperature: float,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`samples` draws per row from softmax(logits / temperature), merged: (C, m) distinct ids
    (ascending, padded with id 0), (C, m) counts (0 on padding), (C,) teacher entropy; m <= samples."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)                       # (C, V)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, 0).sum(-1)                                    # (C,)
    draws = torch.multinomial(p, samples, replacement=True, generator=generator)          # (C, N)
    srt = draws.sort(-1).values
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    run = new.cumsum(-1) - 1                                                              # (C, N) slot
    m = int(new.sum(-1).max()) if srt.numel() else 0
    counts = torch.zeros_like(srt).scatter_add_(-1, run, torch.ones_like(srt))[:, :m]   # (C, m)
    ids = torch.zeros_like(srt).scatter_(-1, run, srt)[:, :m]                            # (C, m)
    return ids, counts, entropy


@torch.no_grad()
def _teacher_logits(hidden, weight, bias, vocab, chunk: int = 1024):
    weight = weight[:vocab]                                                               # (V, H)
    for start in range(0, hidden.shape[0], chunk):
        logits = hidden[start:start + chunk].float() @ weight.float().T                  # (C, V)
        if bias is not None:
            logits += bias[:vocab].float()
        yield logits


class _SampledShard:
    """Collects one shard of a sampled cache in memory (it is small: ~3 bytes per draw kept)."""

    def __init__(self, count: int, seq_len: int, id_dtype):
        self.lengths = np.zeros((count, seq_len), dtype=np.uint8)
        self.entropy = np.zeros((count, seq_len), dtype=np.float16)
        self.ids, self.counts, self.id_dtype = [], [], id_dtype

    def put(self, row: int, ids: torch.Tensor, counts: torch.Tensor, entropy: torch.Tensor) -> None:
        keep = (counts > 0).cpu().numpy()                                                 # (T, m)
        self.lengths[row] = keep.sum(1)
        self.entropy[row] = entropy.cpu().numpy().astype(np.float16)
        self.ids.append(ids.cpu().numpy()[keep].astype(self.id_dtype))   # row-major: position by position
        self.counts.append(counts.cpu().numpy()[keep].astype(np.uint8))

    def save(self, tmp: Path, shard: int) -> dict:
        names = {f: f"{f}-{shard:05d}.npy" for f in ("lengths", "ids", "counts", "entropy")}
        arrays = {"lengths": self.lengths, "entropy": self.entropy,
                  "ids": np.concatenate(self.ids) if self.ids else np.zeros(0, self.id_dtype),
                  "counts": np.concatenate(self.counts) if self.counts else np.zeros(0, np.uint8)}
        entry = {"rows": len(self.lengths)}
        for f, name in names.items():
            np.save(tmp / name, arrays[f])
            entry[f] = name
            entry[f"{f}_sha256"] = file_sha256(tmp / name)
        return entry


def build_cache(out: str | Path, *, teacher, data: TokenData, seq_len: int, pack: bool,
                window_ids: np.ndarray, k: int, batch_windows: int = 16, shard_rows: int = 4096,
                progress: bool = True, tokenizer_json: str | None = None, log=print, kind: str = "topk",
                samples: int = 12, temperature: float = 1.0, sample_seed: int = 0) -> Path:
    """Run the teacher over the given train windows and write the cache directory: the top-k
    log-probabilities (kind "topk"), or `samples` draws per position at `temperature` (kind
    "sampled", seeded by sample_seed and the window)."""
    vocab = data.vocab_size
    if kind not in CACHE_KINDS:
        raise ValueError(f"loss.cache_kind must be one of {', '.join(CACHE_KINDS)}, got {kind!r}")
    if kind == "topk" and k > vocab:
        raise ValueError(f"loss.topk ({k}) is larger than the vocabulary ({vocab})")
    if kind == "sampled" and not 1 <= samples <= MAX_SAMPLES:
        raise ValueError(f"loss.samples must be in [1, {MAX_SAMPLES}] (counts are stored as uint8), "
                         f"got {samples}")
    if kind == "sampled" and not temperature > 0:
        raise ValueError(f"loss.temperature must be > 0, got {temperature}")
    if kind == "sampled":
        return _build_sampled(out, teacher=teacher, data=data, seq_len=seq_len, pack=pack,
                              window_ids=window_ids,
                              samples=samples, temperature=temperature, sample_seed=sample_seed,
                              batch_windows=batch_windows, shard_rows=shard_rows, progress=progress,
                              tokenizer_json=tokenizer_json, log=log)
    t_start = time.perf_counter()
    windows = Windows(data.splits["train"], seq_len, pack)
    window_ids = np.unique(np.asarray(window_ids, dtype=np.int64))                # sorted
    id_dtype = np.uint16 if vocab <= 65536 else np.uint32
    rows = len(window_ids)
    shards = []
    out = Path(out)
    with _cache_directory(out, window_ids, tokenizer_json, shard_rows, "cache-teacher",
                          progress) as (tmp, bar, parts):
        for shard, first, count in parts:
            ids_name, lp_name = f"ids-{shard:05d}.npy", f"logprobs-{shard:05d}.npy"
            shape = (count, seq_len, k)
            ids_mm = np.lib.format.open_memmap(tmp / ids_name, mode="w+", dtype=id_dtype, shape=shape)
            lp_mm = np.lib.format.open_memmap(tmp / lp_name, mode="w+", dtype=np.float16, shape=shape)
            batches = _teacher_hidden(teacher, windows, window_ids, first, count, batch_windows)
            for start, chunk, hidden in batches:
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
            "windows_sha256": file_sha256(tmp / "windows.npy"), "kind": "topk",
        }
        size = sum((tmp / s[f]).stat().st_size for s in shards for f in ("ids", "logprobs"))
        manifest.update(_size_fields(size, rows * seq_len, time.perf_counter() - t_start))
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    log(f"cache-teacher: {rows} sequences x {seq_len} tokens x top-{k} -> {out} ({size / 2**20:.1f} MiB, "
        f"{manifest['bytes_per_token']:.1f} bytes/token)")
    return out


@contextmanager
def _cache_directory(out: Path, window_ids: np.ndarray, tokenizer_json: str | None, shard_rows: int,
                     desc: str, progress: bool):
    """What both cache kinds write around their shards: a temporary directory renamed into place
    when the block succeeds (removed when it fails), with windows.npy and the tokenizer in it, a
    progress bar over the windows, and the shards as (index, first row, rows)."""
    from tqdm import tqdm

    rows = len(window_ids)
    bar = tqdm(total=rows, desc=desc, unit="seq", disable=not progress, dynamic_ncols=True)
    try:
        with atomic_directory(out) as tmp:
            np.save(tmp / "windows.npy", window_ids)
            if tokenizer_json is not None:
                (tmp / "tokenizer.json").write_text(tokenizer_json)
            parts = [(shard, first, min(shard_rows, rows - first))
                     for shard, first in enumerate(range(0, rows, shard_rows))]
            yield tmp, bar, parts
    finally:
        bar.close()


def _teacher_hidden(teacher, windows: Windows, window_ids: np.ndarray, first: int, count: int,
                    batch_windows: int):
    """(start within the shard, the windows, the teacher's last hidden states (n T, H)) for the
    `count` windows from row `first`, batch_windows at a time."""
    for start in range(0, count, batch_windows):
        chunk = window_ids[first + start:first + min(start + batch_windows, count)]
        batch = windows.batch(chunk)
        yield start, chunk, teacher.hidden(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)   # (n T, H)


def _size_fields(size: int, tokens: int, seconds: float) -> dict:
    return {"bytes": size, "bytes_per_token": size / max(tokens, 1), "build_seconds": seconds}


def _build_sampled(out, *, teacher, data, seq_len, pack, window_ids, samples, temperature, sample_seed,
                   batch_windows, shard_rows, progress, tokenizer_json, log) -> Path:
    t_start = time.perf_counter()
    vocab = data.vocab_size
    windows = Windows(data.splits["train"], seq_len, pack)
    window_ids = np.unique(np.asarray(window_ids, dtype=np.int64))                # sorted
    id_dtype = np.uint16 if vocab <= 65536 else np.uint32
    rows = len(window_ids)
    shards, size = [], 0
    out = Path(out)
    with _cache_directory(out, window_ids, tokenizer_json, shard_rows, "cache-teacher (sampled)",
                          progress) as (tmp, bar, parts):
        for shard, first, count in parts:
            collect = _SampledShard(count, seq_len, id_dtype)
            batches = _teacher_hidden(teacher, windows, window_ids, first, count, batch_windows)
            for start, chunk, hidden in batches:
                logits = torch.cat(list(_teacher_logits(hidden, teacher.output_weight, teacher.output_bias,
                                                        vocab)))                            # (n T, V)
                for j, window in enumerate(chunk):
                    gen = window_generator(sample_seed, int(window), logits.device)
                    ids, counts, entropy = draw_samples(logits[j * seq_len:(j + 1) * seq_len], samples,
                                                        temperature, gen)
                    collect.put(start + j, ids, counts, entropy)
                bar.update(len(chunk))
            entry = collect.save(tmp, shard)
            size += sum((tmp / entry[f]).stat().st_size for f in ("lengths", "ids", "counts", "entropy"))
            shards.append(entry)
        manifest = {
            "format_version": FORMAT_VERSION, "kind": "sampled", "samples": samples,
            "temperature": float(temperature), "sample_seed": int(sample_seed),
            "generator": "torch.multinomial(softmax(logits / temperature), samples, replacement=True) per "
                         "window, torch.Generator(teacher device).manual_seed((sample_seed * 1000003 + "
                         "window) % 2**63)",
            "generator_device": str(torch.device(teacher.output_weight.device).type),
            "torch": torch.__version__, "seq_len": seq_len, "pack": pack,
            "data_id": data.data_id, "tokenizer_sha256": data.tokenizer_sha256, "vocab_size": vocab,
            "teacher_id": teacher.id, "teacher_path": teacher.path, "teacher_vocab_size": teacher.vocab_size,
            "ids_dtype": np.dtype(id_dtype).name, "counts_dtype": "uint8", "entropy_dtype": "float16",
            "windows": rows, "shard_rows": shard_rows, "shards": shards,
            "windows_sha256": file_sha256(tmp / "windows.npy"),
        }
        manifest.update(_size_fields(size, rows * seq_len, time.perf_counter() - t_start))
        manifest["mean_distinct_ids"] = float(sum(
            np.load(tmp / e["lengths"]).astype(np.int64).sum() for e in shards) / max(rows * seq_len, 1))
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    log(f"cache-teacher: {rows} sequences x {seq_len} tokens x {samples} draws at T={temperature:g} -> {out} "
        f"({size / 2**20:.1f} MiB, {manifest['bytes_per_token']:.1f} bytes/token, "
        f"{manifest['mean_distinct_ids']:.1f} distinct ids/position)")
    return out


class TeacherCache:
    """A verified cache. Top-k: `lookup(window_ids)` -> (N, k) int64 ids and (N, k) float32
    log-probs. Sampled: `lookup_sampled(window_ids)` -> (N, m) int64 ids, (N, m) int64 counts (0 on
    padding), (N,) float32 entropy, m the most distinct ids of a position in the batch.
    `inputs(window_ids, device)`: the keyword arguments of the training step for either kind."""

    def __init__(self, path: str | Path, *, data: TokenData, seq_len: int, pack: bool, k: int,
                 teacher_id: str | None = None, verify: bool = True, kind: str = "topk", samples: int = 0,
                 temperature: float | None = None):
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
        self.kind = m.get("kind", "topk")
        if self.kind != kind:
            refuse("loss.cache_kind", self.kind, kind)
        if kind == "topk" and m["k"] != k:
            refuse("loss.topk", m["k"], k)
        if kind == "sampled":
            if m["samples"] != samples:
                refuse("loss.samples", m["samples"], samples)
            if temperature is not None and m["temperature"] != temperature:
                refuse("loss.temperature (a sampled cache holds draws at one temperature)", m["temperature"],
                       temperature)
        if teacher_id is not None and m["teacher_id"] != teacher_id:
            refuse("teacher weights", f"{m['teacher_path']} ({m['teacher_id'][:16]})", teacher_id[:16])
        fields = ("ids", "logprobs") if kind == "topk" else ("lengths", "ids", "counts", "entropy")
        files = [("windows.npy", m["windows_sha256"])]
        files += [(s[f], s[f"{f}_sha256"]) for s in m["shards"] for f in fields]
        for name, digest in files:
            if not (self.path / name).is_file():
                raise ValueError(f"teacher cache {self.path} is incomplete: {name} is missing")
            if verify and file_sha256(self.path / name) != digest:
                raise ValueError(f"teacher cache {self.path}: {name} does not match its manifest checksum")
        self.windows = np.load(self.path / "windows.npy")
        self.shard_rows = m["shard_rows"]
        self.ids = [np.load(self.path / s["ids"], mmap_mode="r") for s in m["shards"]]
        self.k, self.seq_len = k, seq_len
        if kind == "topk":
            self.logprobs = [np.load(self.path / s["logprobs"], mmap_mode="r") for s in m["shards"]]
        else:
            self.lengths = [np.load(self.path / s["lengths"], mmap_mode="r") for s in m["shards"]]
            self.counts = [np.load(self.path / s["counts"], mmap_mode="r") for s in m["shards"]]
            self.entropy = [np.load(self.path / s["entropy"], mmap_mode="r") for s in m["shards"]]
            # where each window row starts in the flat ids/counts of its shard: (rows + 1,) int64
            self.offsets = [np.concatenate([[0], np.cumsum(np.asarray(lens, dtype=np.int64).sum(1))])
                            for lens in self.lengths]

    @property
    def teacher_id(self) -> str:
        return self.manifest["teacher_id"]

    def check_covers(self, window_ids: np.ndarray) -> None:
        missing = np.setdiff1d(np.unique(window_ids), self.windows)
        if missing.size:
            raise ValueError(f"teacher cache {self.path} covers {len(self.windows)} train sequences but "
                             f"this run needs {missing.size} more (more steps or a different seed than when "
                             "it was cached); rebuild it with the run's config")

    def _rows(self, window_ids: np.ndarray) -> np.ndarray:
        rows = np.searchsorted(self.windows, window_ids)
        if np.any(rows >= len(self.windows)) or np.any(self.windows[np.minimum(rows, len(self.windows) - 1)]
                                                        != window_ids):
            self.check_covers(np.asarray(window_ids))
        return rows

    def inputs(self, window_ids: np.ndarray, device) -> dict:
        """The training step's keyword arguments for these windows (slmfast/distill/step.py)."""
        if self.kind == "sampled":
            ids, counts, entropy = self.lookup_sampled(window_ids)
            return {"sample_ids": ids.to(device), "sample_counts": counts.to(device),
                    "sample_entropy": entropy.to(device)}
        ids, lps = self.lookup(window_ids)
        return {"topk_ids": ids.to(device), "topk_logprobs": lps.to(device)}

    def lookup_sampled(self, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lens, ids, counts, ent = [], [], [], []
        for r in self._rows(window_ids):
            s, i = divmod(int(r), self.shard_rows)
            a, b = self.offsets[s][i], self.offsets[s][i + 1]
            lens.append(np.asarray(self.lengths[s][i], dtype=np.int64))                    # (T,)
            ids.append(np.asarray(self.ids[s][a:b], dtype=np.int64))
            counts.append(np.asarray(self.counts[s][a:b], dtype=np.int64))
            ent.append(np.asarray(self.entropy[s][i], dtype=np.float32))
        lengths = np.concatenate(lens)                                                      # (N,)
        flat_ids, flat_counts = np.concatenate(ids), np.concatenate(counts)                # (E,)
        m = max(int(lengths.max()) if lengths.size else 1, 1)
        row = np.repeat(np.arange(len(lengths)), lengths)                                   # (E,)
        col = np.arange(len(flat_ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # (E,)
        out_ids = np.zeros((len(lengths), m), dtype=np.int64)                              # (N, m)
        out_counts = np.zeros((len(lengths), m), dtype=np.int64)                           # (N, m)
        out_ids[row, col] = flat_ids
        out_counts[row, col] = flat_counts
        return torch.from_numpy(out_ids), torch.from_numpy(out_counts), torch.from_numpy(np.concatenate(ent))

    def lookup(self, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._rows(window_ids)
        ids = np.stack([self.ids[r // self.shard_rows][r % self.shard_rows] for r in rows])       # (B, T, k)
        lps = np.stack([self.logprobs[r // self.shard_rows][r % self.shard_rows] for r in rows])  # (B, T, k)
        return (torch.from_numpy(ids.astype(np.int64)).view(-1, self.k),
                torch.from_numpy(lps.astype(np.float32)).view(-1, self.k))
