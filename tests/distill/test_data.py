"""Data: the stdlib corpus and its report, the tokenized memmaps and manifest, packed batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slmfast.distill.data import TokenData, Windows, WindowSampler, prepare_data, split_documents
from slmfast.distill.sources import load_corpus, stdlib_corpus

QUIET = dict(log=lambda *a: None)


def test_stdlib_corpus_is_deterministic_and_reports_what_it_skips():
    a, b = stdlib_corpus(), stdlib_corpus()
    assert a.names == b.names and a.fingerprint == b.fingerprint
    assert a.names == sorted(a.names)
    assert not any(n.startswith(("site-packages/", "dist-packages/")) for n in a.names)
    # Nothing vanishes silently: every non-UTF-8 file is named with how it was decoded.
    for entry in a.report["decoded_differently"]:
        assert entry["name"] in a.names and entry["decoded_as"] and entry["why"]
    raw_not_utf8 = []
    for name in a.names:
        try:
            (Path(a.report["root"]) / name).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raw_not_utf8.append(name)
    assert sorted(raw_not_utf8) == sorted(e["name"] for e in a.report["decoded_differently"])


def test_split_is_by_document_name_and_stable():
    corpus = stdlib_corpus()
    train, val = split_documents(corpus, 0.05)
    assert not set(train) & set(val) and len(train) + len(val) == len(corpus.names)
    assert 0.02 < len(val) / len(corpus.names) < 0.09
    # adding documents elsewhere does not move a document across the split
    corpus.names, corpus.texts = corpus.names[:500], corpus.texts[:500]
    train2, val2 = split_documents(corpus, 0.05)
    assert set(val2) == {i for i in val if i < 500}


def test_prepare_writes_manifest_memmaps_and_is_reused(tmp_path, data_root):
    kw = dict(vocab_size=384, val_fraction=0.1, max_documents=40, **QUIET)
    d1 = prepare_data("stdlib", data_root, **kw)
    d2 = prepare_data("stdlib", data_root, **kw)
    assert d1 == d2
    data = TokenData(d1, verify=True)
    m = data.manifest
    assert m["vocab_size"] == 384 and m["dtype"] == "uint16"
    for split in ("train", "val"):
        s = data.splits[split]
        assert s.tokens.dtype == np.uint16 and len(s.tokens) == m["splits"][split]["tokens"]
        assert s.offsets[0] == 0 and s.offsets[-1] == len(s.tokens)
        ends = s.offsets[1:] - 1
        assert np.all(s.tokens[ends] == m["eos_id"])                 # every document ends with EOS
    # the tokenizer round-trips the first train document
    tok = data.tokenizer()
    first = np.asarray(data.splits["train"].tokens[:data.splits["train"].offsets[1] - 1]).tolist()
    corpus = stdlib_corpus()
    corpus.names, corpus.texts = corpus.names[:40], corpus.texts[:40]
    train_docs, _ = split_documents(corpus, 0.1)
    assert tok.decode(first) == corpus.texts[train_docs[0]]
    # with the tokenizer given explicitly, the same directory is found (no re-tokenization)
    assert prepare_data("stdlib", data_root, tokenizer_path=str(d1 / "tokenizer.json"), **kw) == d1
    # a corrupted token file is caught by the checksum
    corrupt = tmp_path / "copy"
    import shutil
    shutil.copytree(d1, corrupt)
    raw = bytearray((corrupt / "val.bin").read_bytes())
    raw[0] ^= 1
    (corrupt / "val.bin").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        TokenData(corrupt, verify=True)


def test_batches_pack_documents_with_boundaries(data_root):
    d = prepare_data("stdlib", data_root, vocab_size=384, val_fraction=0.1, max_documents=40, **QUIET)
    split = TokenData(d).splits["train"]
    T = 32
    windows = Windows(split, T, pack=True)
    ids = np.arange(windows.count)[::7][:12]
    batch = windows.batch(ids)
    cu = batch.cu_seqlens.tolist()
    assert batch.input_ids.shape == (len(ids) * T,) and cu[0] == 0 and cu[-1] == len(ids) * T
    assert all(b > a for a, b in zip(cu, cu[1:]))
    expected = {0}
    for r, w in enumerate(ids):
        start = int(w) * T
        row = torch.from_numpy(split.tokens[start:start + T].astype(np.int64))              # (T,)
        assert torch.equal(batch.input_ids[r * T:(r + 1) * T], row)
        expected |= {r * T + int(o) - start for o in split.offsets if start < o < start + T}
        expected.add((r + 1) * T)
    assert set(cu) == expected
    assert batch.max_seqlen == max(b - a for a, b in zip(cu, cu[1:]))
    assert batch.num_targets == len(ids) * T - (len(cu) - 1)
    plain = Windows(split, T, pack=False).batch(ids)
    assert plain.cu_seqlens.tolist() == [r * T for r in range(len(ids) + 1)]


def test_sampler_is_seeded_and_covers_each_epoch():
    s = WindowSampler(50, seed=7)
    epoch = s.take(0, 50)
    assert sorted(epoch.tolist()) == list(range(50))
    again = WindowSampler(50, seed=7).take(30, 40)
    assert np.array_equal(again, np.concatenate([epoch[30:], s.take(50, 20)]))
    assert not np.array_equal(s.take(50, 50), epoch)          # reshuffled in the next epoch
    assert not np.array_equal(WindowSampler(50, seed=8).take(0, 50), epoch)


def test_jsonl_and_text_dir_sources(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = (json.dumps({"text": f"document {i} " * (i + 3), "id": i}) for i in range(30))
    path.write_text("\n".join(rows) + "\n")
    corpus = load_corpus(str(path), "text")
    assert len(corpus.texts) == 30 and corpus.texts[2] == "document 2 " * 5
    d = prepare_data(str(path), tmp_path / "data", vocab_size=300, val_fraction=0.2, **QUIET)
    assert TokenData(d).manifest["splits"]["val"]["documents"] > 0
    with pytest.raises(ValueError, match="no field 'body'"):
        load_corpus(str(path), "body")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 is not valid JSON"):
        load_corpus(str(bad), "text")
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("hello world")
    (docs / "sub" / "b.md").write_text("# title\n")
    (docs / "c.txt").write_bytes(b"caf\xe9")                    # Latin-1, reported
    (docs / "d.txt").write_bytes(b"\x00\x01binary")              # skipped, reported
    corpus = load_corpus(str(docs))
    assert corpus.names == ["a.txt", "c.txt", "sub/b.md"]
    assert corpus.texts[1] == "café"
    assert corpus.report["decoded_differently"][0]["name"] == "c.txt"
    assert corpus.report["skipped"][0]["name"] == "d.txt"
    with pytest.raises(ValueError, match="neither 'stdlib'"):
        load_corpus(str(tmp_path / "nope"))


def test_hf_source_needs_datasets():
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed; the error path cannot be shown")
    except ImportError:
        with pytest.raises(ValueError, match="needs the `datasets` package"):
            load_corpus("hf:some/dataset")
