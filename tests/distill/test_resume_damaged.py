"""A resume over damaged checkpoints, end to end: the trainer falls back to the newest intact one
(one warning line) and continues exactly; with none intact, the command line stops with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from slmfast.distill import train
from tests.distill.conftest import tiny_config
from tests.distill.test_checkpoint import _plant_pickled_object, _truncate

QUIET = dict(log=lambda *a: None)
REPO = Path(__file__).parents[2]


def _run_with_checkpoints(out: Path, data_root, steps: int, every: int):
    c = tiny_config(out, data_root)
    c.train.steps, c.train.ckpt_every, c.train.eval_every = steps, every, 0
    return c, train(c, "pretrain", **QUIET)


def test_resume_falls_back_past_a_truncated_checkpoint_and_continues_exactly(tmp_path, data_root, capsys):
    """Checkpoints at steps 2, 4 and 6; step 6's weights are truncated. The resume warns once, starts
    from step 4, and steps 5-6 give the losses and final weights of the uninterrupted run (which a
    resume from step 4 reproduces bitwise, see test_trainer.py)."""
    config, full = _run_with_checkpoints(tmp_path / "run", data_root, steps=6, every=2)
    final_weights = load_file(str(full.final_dir / "model.safetensors"))
    newest = tmp_path / "run" / "checkpoints" / "step-00000006"
    _truncate(newest / "model.safetensors")
    capsys.readouterr()

    config.train.resume = True
    said = []
    resumed = train(config, "pretrain", log=said.append)
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"warning: checkpoint {newest} is damaged (model.safetensors: ")
    assert any("continuing from" in line and "step-00000004" in line for line in said)
    assert resumed.status == "completed" and resumed.losses == full.losses[4:]
    weights = load_file(str(resumed.final_dir / "model.safetensors"))
    assert weights.keys() == final_weights.keys()
    assert all(torch.equal(weights[k], final_weights[k]) for k in weights)


def test_resume_skips_an_optimizer_state_holding_a_pickled_object(tmp_path, data_root, capsys):
    config, full = _run_with_checkpoints(tmp_path / "run", data_root, steps=4, every=2)
    marker = tmp_path / "the-pickle-ran"
    _plant_pickled_object(tmp_path / "run" / "checkpoints" / "step-00000004", marker, as_torch_archive=True)
    capsys.readouterr()

    config.train.resume = True
    resumed = train(config, "pretrain", **QUIET)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step-00000004 is damaged (optimizer.pt: " in err
    assert "Traceback" not in err and "weights_only" not in err.replace("weights_only=True", "")
    assert not marker.exists()
    assert resumed.losses == full.losses[2:]


def test_resume_with_no_intact_checkpoint_is_a_one_line_error(tmp_path, data_root):
    config, _ = _run_with_checkpoints(tmp_path / "run", data_root, steps=2, every=1)
    checkpoints = tmp_path / "run" / "checkpoints"
    _truncate(checkpoints / "step-00000002" / "model.safetensors")
    (checkpoints / "step-00000001" / "rng.pt").unlink()
    (tmp_path / "run.toml").write_text(config.to_toml())

    env = {k: v for k, v in os.environ.items() if k != "SLMFAST_DEBUG"}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "slmfast", "pretrain", "--config", str(tmp_path / "run.toml"),
               "--train.resume", "true"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [done.stderr.splitlines()[-1]]
    assert errors[0].startswith(f"error: no intact checkpoint in {checkpoints}: all 2 are damaged")
    assert "step-00000002/model.safetensors" in errors[0]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "rng.pt: missing" in warnings[1]
