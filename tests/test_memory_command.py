"""`slmfast memory` (slmfast/recompute/command.py): the report from the shell.

The default device is meta (shapes only); the meta figures must equal what the same model saves
on the CPU with real kernels, byte for byte, or the command would print estimates it cannot back.
"""

import json

import pytest
import torch

import slmfast.recompute as rc
from slmfast.cli import main
from slmfast.models import CausalLM, LlamaConfig


def _json_report(capsys, *args):
    assert main(["memory", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("policy", ["none", "selective", "full"])
def test_meta_bytes_equal_cpu_bytes(policy):
    config = LlamaConfig.named("nano")
    measured = {}
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        with torch.device(device):
            model = CausalLM(config)
        ids = torch.randint(0, config.vocab_size, (2, 48), device=device)   # (B, T)
        rc.apply(model, policy)
        measured[device] = rc.report(model, dict(input_ids=ids, labels=ids)).to_dict()
    assert measured["meta"] == measured["cpu"]


def test_all_policies_as_json(capsys):
    out = _json_report(capsys, "--model", "nano", "--batch", "2", "--seq", "32", "--policy", "all")
    reports = out["reports"]
    assert set(reports) == {"none", "selective", "full"}
    assert reports["full"]["activation_bytes"] < reports["none"]["activation_bytes"]
    assert reports["full"]["policies"] == ["full"] * LlamaConfig.named("nano").num_layers
    assert reports["none"]["num_parameters"] == LlamaConfig.named("nano").num_parameters()


def test_activations_scale_with_tokens(capsys):
    small = _json_report(capsys, "--model", "nano", "--batch", "1", "--seq", "64")["reports"]["none"]
    large = _json_report(capsys, "--model", "nano", "--batch", "2", "--seq", "64")["reports"]["none"]
    assert sum(large["activation_bytes_per_block"]) == 2 * sum(small["activation_bytes_per_block"])


def test_local_transformers_directory_and_patch(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    config.save_pretrained(tmp_path)          # config.json only: weights are not needed to count bytes
    args = ["--model", str(tmp_path), "--batch", "1", "--seq", "64", "--dtype", "fp32", "--policy", "all"]
    plain = _json_report(capsys, *args)
    patched = _json_report(capsys, *args, "--patch")
    assert plain["model"].startswith("transformers llama") and plain["device"] == "cpu"
    assert len(plain["reports"]["none"]["activation_bytes_per_block"]) == 2
    for policy in ("none", "selective"):
        assert patched["reports"][policy]["activation_bytes"] < plain["reports"][policy]["activation_bytes"]
    assert plain["reports"]["full"]["activation_bytes"] < plain["reports"]["selective"]["activation_bytes"]


def test_budget_on_a_real_device(capsys):
    args = ["--model", "nano", "--batch", "2", "--seq", "128", "--device", "cpu", "--dtype", "fp32"]
    none = _json_report(capsys, *args, "--policy", "none")["reports"]["none"]
    report = _json_report(capsys, *args, "--policy", "budget:0.8")["reports"]["budget"]
    assert set(report["policies"]) <= {"none", "selective", "full"} and "full" in report["policies"]
    assert report["step_peak_bytes"] <= 0.8 * none["step_peak_bytes"]
    # below what full recomputation peaks at (the embeddings' gradient and the head stay): one line
    assert main(["memory", *args, "--policy", "budget:0.3"]) == 2
    assert "the smallest feasible budget is" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--model", "nano", "--policy", "budget:0.5"], "needs a real device"),
    (["--model", "nano", "--policy", "offload"], "add --device cuda"),
    (["--model", "nano", "--policy", "half"], "--policy must be one of"),
    (["--model", "no-such-model"], "--model must be a named config"),
    (["--model", "nano", "--batch", "0"], "--batch and --seq must be positive"),
])
def test_bad_arguments_name_the_argument(args, message, capsys):
    assert main(["memory", *args]) == 2
    assert message in capsys.readouterr().err
