"""End-to-end tiny runs of the trainer on the CPU (seconds each)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from slmfast.distill import ConfigError, Trainer, train
from slmfast.distill.runlog import read_log
from tests.distill.conftest import tiny_config

QUIET = dict(log=lambda *a: None)


def test_pretrain_loss_decreases(tmp_path, data_root):
    c = tiny_config(tmp_path / "run", data_root)
    c.train.steps = 12
    result = train(c, "pretrain", **QUIET)
    assert result.status == "completed" and result.steps == 12 and len(result.losses) == 12
    assert all(math.isfinite(x) for x in result.losses)
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3 - 0.3
    assert result.evals[0]["step"] == 0 and result.evals[-1]["step"] == 12
    assert result.evals[-1]["val_loss"] < result.evals[0]["val_loss"] - 0.3
    # what a run leaves behind: config, log, checkpoint, final model directory with its tokenizer
    assert (tmp_path / "run" / "config.toml").is_file()
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 13))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens"} <= set(log[-2])
    from slmfast.models import CausalLM
    model = CausalLM.from_pretrained(result.final_dir)
    assert (result.final_dir / "tokenizer.json").is_file()
    assert torch.equal(model.lm_head.weight, result.model.lm_head.weight)


def test_kd_on_a_copy_of_the_teacher_gives_zero_soft_loss(tmp_path, data_root, tiny_teacher):
    c = tiny_config(tmp_path / "kd", data_root)
    c.teacher.path = str(tiny_teacher)
    c.student.init_from_teacher = [0, 1, 2]          # every layer: the student is the teacher
    c.loss.kind, c.loss.temperature, c.loss.alpha = "forward_kl", 1.0, 0.0
    c.train.steps, c.train.eval_every = 1, 1
    result = train(c, "distill", **QUIET)
    assert abs(result.losses[0]) < 1e-5, result.losses
    first = result.evals[0]
    assert abs(first["kl"]) < 1e-5 and first["top1_agreement"] == 1.0
    assert first["val_loss"] == pytest.approx(result.teacher_eval["val_loss"], rel=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_distillation_runs_and_moves_toward_the_teacher(tmp_path, data_root, tiny_teacher, kind):
    c = tiny_config(tmp_path / "kd", data_root)
    c.teacher.path = str(tiny_teacher)
    c.loss.kind, c.loss.temperature, c.loss.alpha = kind, 2.0, 0.5
    c.train.steps, c.train.eval_every = 8, 8
    result = train(c, "distill", **QUIET)
    assert result.status == "completed" and all(math.isfinite(x) for x in result.losses)
    assert result.evals[-1]["kl"] < result.evals[0]["kl"]


def test_grad_accumulation_normalizes_over_the_whole_batch(tmp_path, data_root):
    runs = []
    for batch, accum in ((8, 1), (4, 2), (2, 4)):
        c = tiny_config(tmp_path / f"b{batch}", data_root)
        c.train.batch_size, c.train.grad_accum, c.train.steps, c.train.eval_every = batch, accum, 4, 0
        runs.append(train(c, "pretrain", **QUIET))
    # Same global batches, same mean over all their tokens: equal up to summation order.
    for other in runs[1:]:
        torch.testing.assert_close(torch.tensor(other.losses), torch.tensor(runs[0].losses), rtol=1e-5,
                                   atol=0)


def test_resume_is_bitwise_exact(tmp_path, data_root):
    full = tiny_config(tmp_path / "full", data_root)
    full.train.steps, full.train.ckpt_every, full.train.eval_every = 8, 0, 4
    a = train(full, "pretrain", **QUIET)

    part = tiny_config(tmp_path / "part", data_root)
    part.train.steps, part.train.eval_every = 8, 4
    b1 = train(part, "pretrain", should_stop=lambda step: step == 3, **QUIET)   # as Ctrl-C after step 3
    assert b1.status == "interrupted" and b1.steps == 3 and b1.checkpoint.name == "step-00000003"
    part.train.resume = True
    b2 = train(part, "pretrain", **QUIET)
    assert b2.status == "completed" and b2.steps == 8
    assert b1.losses + b2.losses == a.losses                 # bitwise: Python float equality
    wa = load_file(str(a.final_dir / "model.safetensors"))
    wb = load_file(str(b2.final_dir / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the log reads as one run (rows past the checkpoint were dropped on resume)
    assert [r["loss"] for r in read_log(tmp_path / "part") if "loss" in r] == a.losses
    assert [e["val_loss"] for e in b2.evals] == [e["val_loss"] for e in a.evals]


def test_ctrl_c_checkpoints_and_stops(tmp_path, data_root):
    import os
    import signal

    c = tiny_config(tmp_path / "sigint", data_root)
    c.train.steps, c.train.eval_every = 20, 0

    def press_ctrl_c(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)     # arrives during step 2's bookkeeping
        return False

    result = train(c, "pretrain", should_stop=press_ctrl_c, **QUIET)
    assert result.status == "interrupted" and result.steps == 3      # the step in flight finished first
    assert result.checkpoint is not None and result.checkpoint.name == "step-00000003"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handler restored


def test_recompute_policies_train_identically(tmp_path, data_root):
    pytest.importorskip("slmfast.recompute", reason="slmfast.recompute is not in this build")
    runs = {}
    for policy in ("none", "selective", "full"):
        c = tiny_config(tmp_path / policy, data_root)
        c.train.steps, c.train.eval_every, c.train.recompute = 3, 0, policy
        runs[policy] = train(c, "pretrain", **QUIET).losses
    assert runs["selective"] == runs["none"] and runs["full"] == runs["none"]     # bitwise, CPU fp32


@pytest.mark.slow
def test_torch_compile(tmp_path, data_root):
    c = tiny_config(tmp_path / "compiled", data_root)
    c.train.steps, c.train.eval_every, c.train.compile, c.train.compile_backend = 2, 0, True, "eager"
    eager = tiny_config(tmp_path / "eager", data_root)
    eager.train.steps, eager.train.eval_every = 2, 0
    a, b = train(c, "pretrain", **QUIET), train(eager, "pretrain", **QUIET)
    torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-5, atol=0)


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, data_root, monkeypatch):
    from slmfast.distill import step as step_mod

    calls = {"n": 0}
    original = step_mod.StepModule.forward

    def flaky(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        if kwargs.get("mode", "loss") == "loss":
            calls["n"] += 1
            if calls["n"] == 2 or calls["n"] >= 4:       # step 2, then every step from 4 on
                return loss * float("nan")
        return loss

    monkeypatch.setattr(step_mod.StepModule, "forward", flaky)
    c = tiny_config(tmp_path / "nan", data_root)
    c.train.steps, c.train.max_nonfinite, c.train.eval_every = 20, 3, 0
    lines = []
    result = train(c, "pretrain", log=lines.append)
    assert result.status == "nonfinite" and result.steps == 6      # steps 4, 5, 6 in a row
    assert result.nonfinite == 4
    assert math.isfinite(result.losses[0]) and math.isnan(result.losses[1])
    assert math.isfinite(result.losses[2])
    assert any("non-finite" in line and "skipped" in line for line in lines)
    assert result.checkpoint is not None and result.checkpoint.name == "step-00000006"
    for p in result.model.parameters():
        assert torch.isfinite(p).all()


def test_init_from_teacher_copies_layers(tiny_teacher):
    from slmfast.distill.init import init_from_teacher, teacher_layer_indices
    from slmfast.models import CausalLM

    teacher = CausalLM.from_pretrained(tiny_teacher)
    assert teacher_layer_indices("every_other_layer", 3) == [0, 2]
    assert teacher_layer_indices("first_n", 3, 2) == [0, 1]
    for strategy, expected in (("every_other_layer", [0, 2]), ([2, 0], [2, 0])):
        student = init_from_teacher(teacher, strategy)
        assert student.config.num_layers == len(expected)
        t, s = teacher.state_dict(), student.state_dict()
        for i, j in enumerate(expected):
            for key in [k for k in s if k.startswith(f"model.layers.{i}.")]:
                assert torch.equal(s[key], t[key.replace(f"layers.{i}.", f"layers.{j}.", 1)])
        for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            assert torch.equal(s[key], t[key])
    from slmfast.distill.config import ConfigError
    with pytest.raises(ConfigError, match=r"layer indices \[5\] out of range"):
        teacher_layer_indices([0, 5], 3)
    with pytest.raises(ConfigError, match="first_n needs 1..3"):
        teacher_layer_indices("first_n", 3, 4)


def test_student_config_errors(tmp_path):
    from slmfast.distill.config import ConfigError, StudentConfig
    from slmfast.distill.init import student_config

    with pytest.raises(ConfigError, match="student.config: 'gigantic' is neither a named config"):
        student_config(StudentConfig(config="gigantic"), 384, 32)
    bad = tmp_path / "c.json"
    bad.write_text('{"num_layerz": 2}')
    with pytest.raises(ConfigError, match="not a valid model config"):
        student_config(StudentConfig(config=str(bad)), 384, 32)
    with pytest.raises(ConfigError, match="student: .*num_heads"):
        student_config(StudentConfig(config="nano", num_heads=3), 384, 32)
    cfg = student_config(StudentConfig(config="nano", hidden_size=64, num_heads=4), 384, 2048)
    assert cfg.vocab_size == 384 and cfg.head_dim == 16 and cfg.max_position == 2048


def test_trainer_fit_runs_train_with_its_validation(tmp_path):
    """Trainer(config).fit() is train(config): the config is validated once, by train, before any
    work (a bad value is a ConfigError naming its key, and nothing is written)."""
    config = tiny_config(tmp_path / "run", tmp_path / "data")
    config.train.steps = 0
    with pytest.raises(ConfigError, match="^train.steps: "):
        Trainer(config, "pretrain").fit()
    assert not any(tmp_path.iterdir())


def test_activation_bytes_see_the_recompute_policy(tmp_path):
    """The reported activation bytes of a micro-batch come from slmfast.recompute.measure, which
    sees what checkpointing keeps: "full" recomputation holds less than "none", and both are
    positive."""
    counted = {}
    for policy in ("none", "full"):
        config = tiny_config(tmp_path / policy, tmp_path / "data")
        config.train.steps, config.train.eval_every, config.train.recompute = 1, 0, policy
        result = train(config, "pretrain", log=lambda _: None, measure_activations=True)
        counted[policy] = result.activation_bytes
    assert 0 < counted["full"] < counted["none"]
