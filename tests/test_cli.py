"""`python -m slmfast info` in a fresh process, as a user would run it."""

import json
import os
import subprocess
import sys

import torch

from slmfast._version import __version__


def _run(*args, env_update=None):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update(env_update or {})
    return subprocess.run([sys.executable, "-m", "slmfast", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_info_json_reports_backends_with_reasons():
    result = _run("info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert {"version", "torch", "triton", "backends", "build"} <= set(info)
    assert info["version"] == __version__
    assert info["torch"] == torch.__version__
    assert set(info["backends"]) == {"cuda", "triton", "cpu", "torch"}
    for state in info["backends"].values():
        assert set(state) == {"available", "reason"} and state["reason"]
    assert info["backends"]["cpu"]["available"], info["backends"]["cpu"]["reason"]
    assert info["build"]["openmp"] is True
    if not torch.cuda.is_available():
        assert info["backends"]["cuda"]["available"] is False
        assert info["backends"]["triton"]["available"] is False
        assert "TRITON_INTERPRET" in info["backends"]["triton"]["reason"] or \
            "not installed" in info["backends"]["triton"]["reason"]


def test_info_table():
    result = _run("info")
    assert result.returncode == 0, result.stderr
    assert f"slmfast {__version__}" in result.stdout
    assert "backend" in result.stdout and "cpu" in result.stdout


def test_unknown_command_fails():
    result = _run("frobnicate")
    assert result.returncode != 0
    assert "invalid choice" in result.stderr
