"""The offline teacher cache: what it stores, training from it, and refusal on any mismatch."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from slmfast.distill import train
from slmfast.distill.cache import TeacherCache, topk_logprobs
from slmfast.distill.commands import cache_teacher
from slmfast.distill.data import TokenData, Windows, prepare_data
from slmfast.distill.teacher import load_teacher
from tests.distill.conftest import tiny_config

QUIET = dict(log=lambda *a: None)
K = 8


@pytest.fixture(scope="module")
def cached(tmp_path_factory, data_root, tiny_teacher):
    out = tmp_path_factory.mktemp("cache")
    c = tiny_config(out / "run", data_root)
    c.teacher.path, c.loss.topk, c.train.progress = str(tiny_teacher), K, False
    path = cache_teacher(c, str(out / "teacher-cache"))
    return c, path


def test_cache_holds_the_teachers_top_k(cached, tiny_teacher):
    c, path = cached
    data = TokenData(_data_dir(c))
    cache = TeacherCache(path, data=data, seq_len=c.data.seq_len, pack=True, k=K)
    assert cache.manifest["ids_dtype"] == "uint16" and cache.manifest["logprobs_dtype"] == "float16"
    windows = cache.windows[[0, 3, 5]]
    ids, lps = cache.lookup(windows)                                        # (3 * T, K) each
    teacher = load_teacher(str(tiny_teacher), device=torch.device("cpu"))
    batch = Windows(data.splits["train"], c.data.seq_len, True).batch(windows)
    hidden = teacher.hidden(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
    ref_ids, ref_lps = topk_logprobs(hidden, teacher.output_weight, None, data.vocab_size, K)
    torch.testing.assert_close(lps, ref_lps.half().float(), rtol=0, atol=0)   # exactly the fp16 rounding
    agree = (ids == ref_ids).float().mean()
    assert agree > 0.99                       # equal but where fp16 rounding ties two log-probs
    assert torch.all(lps[:, :-1] >= lps[:, 1:])                              # sorted, most likely first


def _data_dir(c):
    from slmfast.distill.setup import resolve_tokenizer
    return prepare_data(c.data.source, c.data.cache_dir, tokenizer_path=resolve_tokenizer(c),
                        vocab_size=c.data.vocab_size, val_fraction=c.data.val_fraction,
                        max_documents=c.data.max_documents, **QUIET)


def test_training_from_the_cache(cached, tmp_path):
    c, path = cached
    run = tiny_config(tmp_path / "from-cache", c.data.cache_dir)
    run.teacher.cache, run.loss.topk, run.loss.tail = str(path), K, "bucket"
    run.train.steps = c.train.steps
    result = train(run, "distill", **QUIET)
    assert result.status == "completed" and all(math.isfinite(x) for x in result.losses)
    assert result.losses[-1] < result.losses[0]


def test_cache_refuses_mismatches(cached, tmp_path, tiny_teacher):
    c, path = cached
    data = TokenData(_data_dir(c))
    base = dict(data=data, seq_len=c.data.seq_len, pack=True, k=K)
    TeacherCache(path, **base)
    with pytest.raises(ValueError, match="loss.topk differs"):
        TeacherCache(path, **{**base, "k": K + 1})
    with pytest.raises(ValueError, match="data.seq_len differs"):
        TeacherCache(path, **{**base, "seq_len": 16})
    with pytest.raises(ValueError, match="data.pack differs"):
        TeacherCache(path, **{**base, "pack": False})
    with pytest.raises(ValueError, match="teacher weights differ"):
        TeacherCache(path, **base, teacher_id="0" * 64)
    # other data, same tokenizer
    other = TokenData(prepare_data("stdlib", c.data.cache_dir,
                                   tokenizer_path=str(tiny_teacher / "tokenizer.json"),
                                   val_fraction=0.1, max_documents=30, **QUIET))
    with pytest.raises(ValueError, match=r"data \(token files\) differs"):
        TeacherCache(path, **{**base, "data": other})
    # another tokenizer
    retok = TokenData(prepare_data("stdlib", c.data.cache_dir, vocab_size=320, val_fraction=0.1,
                                   max_documents=40,
                                   **QUIET))
    with pytest.raises(ValueError, match="tokenizer differs"):
        TeacherCache(path, **{**base, "data": retok})
    # a run that needs sequences the cache does not hold
    cache = TeacherCache(path, **base)
    with pytest.raises(ValueError, match="needs .* more"):
        cache.check_covers(np.arange(Windows(data.splits["train"], c.data.seq_len).count))
    # a damaged shard
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    raw = bytearray((broken / "logprobs-00000.npy").read_bytes())
    raw[-1] ^= 0xFF
    (broken / "logprobs-00000.npy").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match its manifest checksum"):
        TeacherCache(broken, **base)
    with pytest.raises(FileNotFoundError, match="not a teacher cache"):
        TeacherCache(tmp_path, **base)


def test_training_refuses_a_mismatched_cache(cached, tmp_path):
    c, path = cached
    run = tiny_config(tmp_path / "bad", c.data.cache_dir)
    run.teacher.cache, run.loss.topk = str(path), K
    run.data.seq_len = 16
    with pytest.raises(ValueError, match="data.seq_len differs"):
        train(run, "distill", **QUIET)
    run.data.seq_len, run.train.steps = 32, 500
    with pytest.raises(ValueError, match="needs .* more"):
        train(run, "distill", **QUIET)
