"""DistillConfig: TOML + command-line overrides, and every error path naming its key."""

from __future__ import annotations

import pytest

from slmfast.distill.config import ConfigError, DistillConfig, apply_overrides, valid_keys


@pytest.mark.parametrize("mode, teacher", [("pretrain", ""), ("distill", "some/teacher"),
                                           ("cache", "some/teacher")])
def test_defaults_validate_for_every_mode(mode, teacher):
    """The defaults (plus the teacher a mode needs) pass, and the same validation is not a no-op:
    one bad value on top of them is refused in that mode."""
    c = DistillConfig()
    c.teacher.path = teacher
    assert c.validate(mode) is c
    c.train.steps = 0
    with pytest.raises(ConfigError, match="^train.steps: "):
        c.validate(mode)


def test_toml_then_overrides_precedence(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('out_dir = "x"\n[train]\nsteps = 7\nbatch_size = 3\n[optim]\nbetas = [0.8, 0.9]\n'
                    '[student]\ninit_from_teacher = [0, 2]\n')
    c = DistillConfig.from_args(str(path), ["--train.steps", "9", "--loss.kind=jsd", "--train.compile",
                                            "--student.config", "micro", "--optim.lr", "1e-3"])
    assert c.out_dir == "x" and c.train.batch_size == 3 and c.train.steps == 9
    assert c.loss.kind == "jsd" and c.train.compile is True and c.student.config == "micro"
    assert c.optim.lr == 1e-3 and c.optim.betas == [0.8, 0.9] and c.student.init_from_teacher == [0, 2]


def test_toml_round_trip(tmp_path):
    c = DistillConfig()
    apply_overrides(c, ["--student.init_from_teacher", "[1, 3]", "--data.source", "corpus dir/x.jsonl",
                        "--train.precision", "bf16", "--optim.betas", "[0.9, 0.99]"])
    path = tmp_path / "c.toml"
    path.write_text(c.to_toml())
    assert DistillConfig.from_toml(path).to_dict() == c.to_dict()


@pytest.mark.parametrize("key, suggestion", [
    ("train.stpes", "train.steps"), ("trian.steps", "train.steps"), ("optim.learning_rate", None),
    ("stpes", "train.steps"), ("loss.temprature", "loss.temperature"), ("data.seqlen", "data.seq_len"),
    ("teacher", None), ("a.b.c", None),
])
def test_unknown_key_names_nearest(key, suggestion):
    with pytest.raises(ConfigError) as e:
        DistillConfig().set(key, 1)
    assert repr(key) in str(e.value)
    if suggestion:
        assert f"did you mean {suggestion!r}" in str(e.value)


def test_unknown_key_in_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nbatchsize = 4\n")
    with pytest.raises(ConfigError, match="'train.batchsize'.*did you mean 'train.batch_size'"):
        DistillConfig.from_toml(path)
    path.write_text("[trainer]\nsteps = 4\n")
    with pytest.raises(ConfigError, match="'trainer.steps'.*'train.steps'"):
        DistillConfig.from_toml(path)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        DistillConfig.from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        DistillConfig.from_toml(bad)


@pytest.mark.parametrize("key, value, expected", [
    ("train.steps", "ten", "expected an integer"), ("train.steps", 2.5, "expected an integer"),
    ("train.steps", True, "expected an integer"), ("optim.lr", "fast", "expected a number"),
    ("train.compile", "maybe", "expected true or false"), ("train.compile", 2, "expected true or false"),
    ("optim.betas", 0.9, "expected a list"), ("optim.betas", ["a", "b"], "expected a number"),
    ("student.config", True, "expected a string"),
    ("student.init_from_teacher", ["x"], "expected an integer"),
])
def test_type_errors_name_the_key(key, value, expected):
    with pytest.raises(ConfigError, match=f"{key}: {expected}"):
        DistillConfig().set(key, value)


INVALID = [
    ("out_dir", ""), ("seed", -1), ("device", "tpu"), ("threads", -2), ("data.source", ""),
    ("data.vocab_size", 100), ("data.seq_len", 1), ("data.val_fraction", 0.0), ("data.val_fraction", 1.0),
    ("data.max_documents", -1), ("student.config", ""), ("student.num_layers", -1),
    ("student.hidden_size", -1),
    ("student.intermediate_size", -1), ("student.num_heads", -1), ("student.num_kv_heads", -1),
    ("student.init_from_teacher", "every_third_layer"), ("student.init_from_teacher", []),
    ("student.init_from_teacher", [0, 0]), ("student.init_from_teacher", [-1]),
    ("teacher.dtype", "int8"), ("teacher.device", "gpu"), ("loss.kind", "kl"), ("loss.beta", 1.5),
    ("loss.temperature", 0.0), ("loss.alpha", -0.1), ("loss.topk", 0), ("loss.tail", "rest"),
    ("loss.cache_kind", "dense"), ("loss.samples", 0), ("loss.sample_seed", -1),
    ("loss.chunk_size", -1), ("optim.lr", 0.0), ("optim.min_lr_ratio", 2.0), ("optim.warmup_steps", -1),
    ("optim.weight_decay", -0.1), ("optim.betas", [0.9]), ("optim.betas", [0.9, 1.0]), ("optim.eps", 0.0),
    ("optim.grad_clip", -1.0), ("optim.fused", "yes"), ("train.steps", 0), ("train.batch_size", 0),
    ("train.grad_accum", 0), ("train.precision", "fp16"), ("train.recompute", "some"),
    ("train.parallel", "tp"), ("train.eval_every", -1), ("train.ckpt_every", -1), ("train.max_tokens", -1),
    ("train.eval_batches", 0), ("train.log_every", 0), ("train.keep_last", 0), ("train.max_nonfinite", 0),
]


@pytest.mark.parametrize("key, value", INVALID)
def test_invalid_values_name_the_key(key, value):
    c = DistillConfig()
    c.teacher.path = "t"
    c.set(key, value)
    with pytest.raises(ConfigError, match=f"^{key.replace('.', '[.]')}: "):
        c.validate("distill")


def test_every_key_has_a_validation_or_is_free():
    # keys that accept any string/bool by design; every other key appears in INVALID above
    free = {"data.text_field", "data.hf_split", "data.glob", "data.tokenizer", "data.pack", "data.cache_dir",
            "teacher.path", "teacher.cache", "teacher.shard", "teacher.allow_unverified_tokenizer",
            "train.compile", "train.compile_backend", "train.progress", "train.resume", "train.save_final"}
    checked = {k for k, _ in INVALID}
    assert set(valid_keys()) - free - checked == set()


def test_mode_errors():
    c = DistillConfig()
    with pytest.raises(ConfigError, match="^teacher.path: distillation needs a teacher"):
        c.validate("distill")
    with pytest.raises(ConfigError, match="^teacher.path: distillation needs a teacher"):
        c.validate("cache")
    c.teacher.cache = "cache-dir"
    c.validate("distill")                          # a cache alone is enough to distill
    c.student.init_from_teacher = "every_other_layer"
    with pytest.raises(ConfigError, match="^teacher.path: student.init_from_teacher needs"):
        c.validate("distill")
    c = DistillConfig()
    c.teacher.path = "t"
    with pytest.raises(ConfigError, match="^teacher.path: pretrain trains without a teacher"):
        c.validate("pretrain")
    c = DistillConfig()
    c.student.init_from_teacher = "every_other_layer"
    with pytest.raises(ConfigError, match="^student.init_from_teacher: pretrain"):
        c.validate("pretrain")
    c.student.init_from_teacher = "first_n"
    c.teacher.path = "t"
    with pytest.raises(ConfigError, match="^student.num_layers: first_n needs"):
        c.validate("distill")
    with pytest.raises(ConfigError, match="unknown mode"):
        DistillConfig().validate("finetune")


def test_override_syntax_errors():
    c = DistillConfig()
    with pytest.raises(ConfigError, match="unexpected argument 'steps'"):
        apply_overrides(c, ["steps", "3"])
    with pytest.raises(ConfigError, match="--train.steps needs a value"):
        apply_overrides(c, ["--train.steps"])
    with pytest.raises(ConfigError, match="--optim.lr needs a value"):
        apply_overrides(c, ["--optim.lr", "--train.steps", "3"])
    apply_overrides(c, ["--train.progress", "--train.steps", "3"])   # a bare boolean flag is true
    assert c.train.progress is True and c.train.steps == 3
    apply_overrides(c, ["--train.max-tokens", "100"])                  # dashes work as underscores
    assert c.train.max_tokens == 100


def test_cli_config_errors_exit_2_with_the_key(capsys):
    from slmfast.cli import main

    def run(*args):
        try:
            code = main(list(args))
        except SystemExit as e:     # argparse errors
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    code, _, err = run("distill", "--trian.steps", "5")
    assert code == 2 and "did you mean 'train.steps'" in err, err
    code, _, err = run("pretrain", "--train.steps", "0")
    assert code == 2 and "train.steps: must be >= 1" in err, err
    code, _, err = run("distill")
    assert code == 2 and "teacher.path" in err
    code, _, err = run("demo", "--train.steps", "3")
    assert code == 2 and "unrecognized arguments" in err
    code, _, err = run("info", "--train.steps", "3")
    assert code == 2 and "unrecognized arguments" in err
    code, out, _ = run("pretrain", "--train.steps", "4", "--print-config")
    assert code == 0 and "steps = 4" in out
