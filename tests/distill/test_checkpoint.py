"""Checkpoints: atomic under kill -9, keep-last-N, and never unpickling code on load."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from slmfast.distill.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from slmfast.models import CausalLM, LlamaConfig

TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)


def _save(out, step, keep_last=3):
    model = CausalLM(LlamaConfig(**TINY))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 64, (1, 8)), labels=torch.randint(0, 64, (1, 8))).loss.backward()
    opt.step()
    return save_checkpoint(out, step, model_state=model.state_dict(), model_config=model.config,
                           optimizer_state=opt.state_dict(), trainer_state={"step": step},
                           tokenizer_json="{}",
                           keep_last=keep_last), model, opt


def test_round_trip_and_keep_last(tmp_path):
    path, model, opt = _save(tmp_path, 1)
    ckpt = load_checkpoint(path)
    assert ckpt["state"] == {"step": 1}
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt["model"][k], v)
    restored = torch.optim.AdamW(CausalLM(LlamaConfig(**TINY)).parameters())
    restored.load_state_dict(ckpt["optimizer"])
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # a checkpoint is also a model directory
    assert torch.equal(CausalLM.from_pretrained(path).lm_head.weight, model.lm_head.weight)
    for step in (2, 3, 4, 5):
        _save(tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]


def test_load_refuses_pickled_code(tmp_path):
    path, _, _ = _save(tmp_path, 1)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(path / "optimizer.pt", "wb") as f:
        pickle.dump({"state": Evil()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    """A child writes checkpoint 1, then starts checkpoint 2 and is killed (SIGKILL) halfway, after
    the weights and before the optimizer state are written. Checkpoint 1 must load, and no
    partial step-2 may be visible."""
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(Path(__file__).parents[2])!r})
        from tests.distill.test_checkpoint import _save
        _save({str(tmp_path)!r}, 1)
        real_save = torch.save
        def slow_save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            open({str(ready)!r}, "w").close()     # inside the write of checkpoint 2
            time.sleep(60)
        torch.save = slow_save
        _save({str(tmp_path)!r}, 2)
    """)
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert child.poll() is None, "the child exited before reaching the checkpoint write"
            assert time.time() < deadline, "the child never reached the checkpoint write"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert "step-00000002" not in leftovers and any(n.startswith(".step-00000002") for n in leftovers)
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step-00000001"
    assert load_checkpoint(latest)["state"] == {"step": 1}
    # the next write cleans the interrupted temporary directory
    _save(tmp_path, 3)
    assert not any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir())
