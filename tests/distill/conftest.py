"""Shared fixtures for the trainer tests: a tiny prepared corpus and tiny model configs.

Everything is small enough that a training run takes seconds on 2 CPU cores: a slice of the
standard-library corpus, a BPE of 384 tokens, sequences of 32 tokens, models of 2 layers x 32.
"""

from __future__ import annotations

import pytest
import torch

from slmfast.distill import DistillConfig

TINY_ARCH = dict(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)


def tiny_config(out_dir, data_root, **arch) -> DistillConfig:
    c = DistillConfig(out_dir=str(out_dir), device="cpu", seed=3)
    c.data.source, c.data.cache_dir = "stdlib", str(data_root)
    c.data.max_documents, c.data.vocab_size, c.data.seq_len, c.data.val_fraction = 40, 384, 32, 0.1
    c.student.config = "nano"
    for key, value in {**TINY_ARCH, **arch}.items():
        setattr(c.student, key, value)
    c.optim.lr, c.optim.warmup_steps = 1e-2, 2
    c.train.steps, c.train.batch_size, c.train.eval_every, c.train.eval_batches = 6, 4, 3, 2
    c.train.log_every, c.train.progress = 1, False
    return c


@pytest.fixture(autouse=True)
def _one_thread():
    """Models this small gain nothing from a second thread, and on a shared 2-core machine OpenMP's
    barriers make two threads much slower than one: run each test single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A data cache directory shared by every test (the corpus is tokenized once)."""
    return tmp_path_factory.mktemp("distill-data")


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, data_root):
    """A tiny pretrained teacher (slmfast model directory with tokenizer.json)."""
    from slmfast.distill import train

    out = tmp_path_factory.mktemp("teacher")
    c = tiny_config(out, data_root, num_layers=3, hidden_size=48, intermediate_size=96)
    c.train.steps, c.train.eval_every = 12, 0
    result = train(c, "pretrain", log=lambda *a: None)
    return result.final_dir
