"""Checkpoints: atomic under kill -9, keep-last-N, never unpickling code on load, and checked
(sizes, sha256, headers) before use: damage is found, named in one line, and skipped."""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from slmfast.cli import main as cli_main
from slmfast.distill.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
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


class _OpensAFile:
    """Unpickling this calls open(marker, "w"): if the marker file exists, the pickle was run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_pickled_object(path: Path, marker: Path, as_torch_archive: bool) -> None:
    """Replace path/optimizer.pt with a pickle that would create `marker` when loaded."""
    payload = {"state": _OpensAFile(marker), "param_groups": []}
    if as_torch_archive:            # inside torch.save's zip, where torch.load's unpickler meets it
        torch.save(payload, path / "optimizer.pt")
    else:                           # a bare pickle file
        with open(path / "optimizer.pt", "wb") as f:
            pickle.dump(payload, f, protocol=2)


@pytest.mark.parametrize("as_torch_archive", [True, False], ids=["torch-archive", "bare-pickle"])
def test_load_refuses_pickled_code_in_one_line_without_running_it(tmp_path, as_torch_archive):
    path, _, _ = _save(tmp_path, 1)
    marker = tmp_path / "the-pickle-ran"
    _plant_pickled_object(path, marker, as_torch_archive)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{path / 'optimizer.pt'}: ") and "\n" not in message
    assert ("pickled io.open; nothing was run" if as_torch_archive else "not a torch archive") in message
    verdict = verify_checkpoint(path)
    assert not verdict.ok and verdict.problem.startswith("optimizer.pt: ")
    assert not marker.exists()


def test_manifest_records_size_and_sha256_of_every_file(tmp_path):
    import hashlib

    path, _, _ = _save(tmp_path, 1)
    records = json.loads((path / "trainer_state.json").read_text())["files"]
    on_disk = sorted(p.name for p in path.iterdir() if p.name != "trainer_state.json")
    assert sorted(records) == on_disk == ["config.json", "model.safetensors", "optimizer.pt", "rng.pt",
                                          "tokenizer.json"]
    for name, record in records.items():
        data = (path / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    verdict = verify_checkpoint(path)
    assert verdict.ok and verdict.checksummed and verdict.describe() == "ok"


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _flip_last_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF                    # inside the last tensor's data: every header still parses
    file.write_bytes(bytes(data))


def _same_size_garbage(file: Path) -> None:
    file.write_bytes(b"\xff" * file.stat().st_size)


DAMAGES = {
    "truncated weights": ("model.safetensors", _truncate, "file not fully covered"),
    "flipped weight byte": ("model.safetensors", _flip_last_byte, "sha256 differs"),
    "garbage header": ("model.safetensors", _same_size_garbage, "header"),
    "truncated optimizer": ("optimizer.pt", _truncate, "damaged zip archive"),
    "missing rng": ("rng.pt", Path.unlink, "missing"),
    "garbage config": ("config.json", _same_size_garbage, "config.json: "),
    "missing tokenizer": ("tokenizer.json", Path.unlink, "missing"),
    "unreadable manifest": ("trainer_state.json", _truncate, "trainer_state.json: "),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_verify_names_the_damaged_file_and_the_reason(tmp_path, damage):
    name, spoil, reason = DAMAGES[damage]
    path, _, _ = _save(tmp_path, 1)
    spoil(path / name)
    verdict = verify_checkpoint(path)
    assert not verdict.ok
    assert verdict.problem.startswith(f"{name}: ") and reason in verdict.problem, verdict.problem
    assert "\n" not in verdict.problem
    assert verdict.describe() == f"bad: {verdict.problem}"


def test_resume_choice_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    _truncate(tmp_path / "checkpoints" / "step-00000003" / "model.safetensors")
    warnings = []
    assert latest_checkpoint(tmp_path, warn=warnings.append).name == "step-00000002"
    assert len(warnings) == 1 and "step-00000003" in warnings[0] and "model.safetensors" in warnings[0]
    assert "falling back" in warnings[0]

    _truncate(tmp_path / "checkpoints" / "step-00000002" / "rng.pt")
    (tmp_path / "checkpoints" / "step-00000001" / "optimizer.pt").unlink()
    warnings.clear()
    with pytest.raises(CheckpointError, match=r"^no intact checkpoint in .*all 3 are damaged") as caught:
        latest_checkpoint(tmp_path, warn=warnings.append)
    assert "step-00000003/model.safetensors" in str(caught.value) and "\n" not in str(caught.value)
    assert len(warnings) == 3
    assert latest_checkpoint(tmp_path / "elsewhere", warn=warnings.append) is None     # no checkpoints


def _strip_checksums(path: Path) -> None:
    """Rewrite the manifest as slmfast wrote it before it recorded sizes and checksums."""
    manifest = json.loads((path / "trainer_state.json").read_text())
    del manifest["files"]
    (path / "trainer_state.json").write_text(json.dumps(manifest, indent=2) + "\n")


def test_checkpoint_without_recorded_checksums_still_loads_and_says_so(tmp_path):
    path, model, _ = _save(tmp_path, 1)
    _strip_checksums(path)
    verdict = verify_checkpoint(path)
    assert verdict.ok and not verdict.checksummed and "no recorded checksums" in verdict.describe()
    warnings = []
    assert latest_checkpoint(tmp_path, warn=warnings.append) == path
    assert len(warnings) == 1 and "no recorded checksums" in warnings[0]
    ckpt = load_checkpoint(path)
    assert ckpt["state"] == {"step": 1}
    assert all(torch.equal(ckpt["model"][k], v) for k, v in model.state_dict().items())
    # what can be checked without checksums still is: the torch archives under a weights-only
    # load, and the safetensors header
    marker = tmp_path / "the-pickle-ran"
    _plant_pickled_object(path, marker, as_torch_archive=True)
    assert verify_checkpoint(path).problem == ("optimizer.pt: torch.load(weights_only=True) refuses it "
                                               "(holds a pickled io.open; nothing was run)")
    assert not marker.exists()
    _truncate(path / "model.safetensors")
    assert verify_checkpoint(path).problem.startswith("model.safetensors: its safetensors header")


def test_checkpoint_verify_command(tmp_path, capsys):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    steps = list_checkpoints(tmp_path)
    assert cli_main(["checkpoint", "verify", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{p}: ok" for p in steps]

    _truncate(steps[1] / "model.safetensors")
    _strip_checksums(steps[0])
    assert cli_main(["checkpoint", "verify", str(tmp_path / "checkpoints")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{steps[0]}: ok (no recorded checksums")
    assert lines[1].startswith(f"{steps[1]}: bad: model.safetensors: ")
    assert lines[2] == f"{steps[2]}: ok"

    assert cli_main(["checkpoint", "verify", str(steps[2])]) == 0          # one checkpoint
    assert capsys.readouterr().out.splitlines() == [f"{steps[2]}: ok"]
    assert cli_main(["checkpoint", "verify", str(steps[1])]) == 1
    assert capsys.readouterr().out.count("\n") == 1
    assert cli_main(["checkpoint", "verify", str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint in") and err.count("\n") == 1


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
