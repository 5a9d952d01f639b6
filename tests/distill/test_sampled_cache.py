"""Sampled teacher caches (`cache-teacher --loss.cache_kind sampled`): what they store, that the
draws are the seeded teacher's, their size next to top-k's, training from them, and refusal on
a mismatch."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from slmfast.distill import train
from slmfast.distill.cache import TeacherCache, draw_samples, window_generator
from slmfast.distill.commands import cache_teacher
from slmfast.distill.config import ConfigError
from slmfast.distill.data import TokenData, Windows
from slmfast.distill.teacher import load_teacher
from tests.distill.conftest import tiny_config
from tests.distill.test_cache import _data_dir

QUIET = dict(log=lambda *a: None)
N = 6
T = 1.5


def _sampled_config(out, data_root, teacher, seed=0):
    c = tiny_config(out, data_root)
    c.teacher.path, c.train.progress = str(teacher), False
    c.loss.cache_kind, c.loss.samples, c.loss.temperature, c.loss.sample_seed = "sampled", N, T, seed
    return c


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, data_root, tiny_teacher):
    out = tmp_path_factory.mktemp("sampled-cache")
    c = _sampled_config(out / "run", data_root, tiny_teacher)
    return c, cache_teacher(c, str(out / "cache"))


def test_sampled_cache_holds_seeded_draws_of_the_teacher(sampled, tiny_teacher, tmp_path):
    c, path = sampled
    data = TokenData(_data_dir(c))
    cache = TeacherCache(path, data=data, seq_len=c.data.seq_len, pack=True, k=0, kind="sampled", samples=N,
                         temperature=T)
    m = cache.manifest
    assert m["kind"] == "sampled" and m["samples"] == N and m["sample_seed"] == 0 and "generator" in m
    windows = cache.windows[[0, 2, 5]]
    ids, counts, entropy = cache.lookup_sampled(windows)                     # (3 T, m), (3 T, m), (3 T,)
    assert torch.all(counts.sum(-1) == N)
    # the same draws as draw_samples with the window's generator, on the teacher's logits
    teacher = load_teacher(str(tiny_teacher), device=torch.device("cpu"))
    batch = Windows(data.splits["train"], c.data.seq_len, True).batch(windows)
    hidden = teacher.hidden(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
    logits = hidden.float() @ teacher.output_weight[:data.vocab_size].float().T          # (3 T, V)
    seq = c.data.seq_len
    for j, w in enumerate(windows):
        rows = slice(j * seq, (j + 1) * seq)
        gen = window_generator(0, int(w), "cpu")
        ref_ids, ref_counts, ref_entropy = draw_samples(logits[rows], N, T, gen)
        width = ref_ids.shape[1]
        assert torch.equal(ids[rows, :width], ref_ids) and torch.equal(counts[rows, :width], ref_counts)
        assert torch.all(counts[rows, width:] == 0)
        torch.testing.assert_close(entropy[rows], ref_entropy.half().float(), rtol=0, atol=0)
    # size: what the manifest says is the files' size, and the bytes per token follow the layout
    lengths = sum(np.load(path / s["lengths"]).astype(np.int64).sum() for s in m["shards"])
    tokens = m["windows"] * seq
    assert m["bytes"] == sum((path / s[f]).stat().st_size for s in m["shards"]
                             for f in ("lengths", "ids", "counts", "entropy"))
    header = 4 * 128                                                          # .npy headers, per file
    assert abs(m["bytes"] - (3 * tokens + 3 * lengths)) <= header * len(m["shards"])  # 1+2 B/token, 2+1 B/id
    assert math.isclose(m["mean_distinct_ids"], lengths / tokens)


def test_another_seed_draws_differently_and_the_same_seed_is_reproduced(sampled, data_root, tiny_teacher,
                                                                        tmp_path):
    c, path = sampled
    again = cache_teacher(_sampled_config(tmp_path / "a", data_root, tiny_teacher), str(tmp_path / "again"))
    other = cache_teacher(_sampled_config(tmp_path / "b", data_root, tiny_teacher, seed=1),
                          str(tmp_path / "other"))
    digests = [[s["ids_sha256"] for s in json.loads((p / "manifest.json").read_text())["shards"]]
               for p in (path, again, other)]
    assert digests[0] == digests[1] and digests[0] != digests[2]


def test_training_from_the_sampled_cache(sampled, tmp_path):
    c, path = sampled
    run = tiny_config(tmp_path / "from-sampled", c.data.cache_dir)
    run.teacher.cache, run.loss.cache_kind = str(path), "sampled"
    run.loss.samples, run.loss.temperature = N, T
    run.loss.alpha = 0.5
    result = train(run, "distill", **QUIET)
    assert result.status == "completed" and all(math.isfinite(x) for x in result.losses)
    assert result.losses[-1] < result.losses[0]


def test_sampled_cache_refuses_mismatches(sampled):
    c, path = sampled
    data = TokenData(_data_dir(c))
    base = dict(data=data, seq_len=c.data.seq_len, pack=True, k=0, kind="sampled", samples=N, temperature=T)
    TeacherCache(path, **base)
    with pytest.raises(ValueError, match="loss.samples differs"):
        TeacherCache(path, **{**base, "samples": N + 1})
    with pytest.raises(ValueError, match="loss.temperature .* differs"):
        TeacherCache(path, **{**base, "temperature": 1.0})
    with pytest.raises(ValueError, match="loss.cache_kind differs"):
        TeacherCache(path, **{**base, "kind": "topk"})


def test_config_checks_the_sampled_keys(tmp_path):
    c = tiny_config(tmp_path, tmp_path)
    c.teacher.path = "x"
    for key, value, match in (("loss.cache_kind", "dense", "loss.cache_kind"),
                              ("loss.samples", 256, "loss.samples"), ("loss.samples", 0, "loss.samples")):
        bad = tiny_config(tmp_path, tmp_path)
        bad.teacher.path = "x"
        bad.set(key, value)
        with pytest.raises(ConfigError, match=match):
            bad.validate("cache")
    c.loss.cache_kind, c.loss.kind = "sampled", "reverse_kl"
    with pytest.raises(ConfigError, match="forward KL only"):
        c.validate("cache")
