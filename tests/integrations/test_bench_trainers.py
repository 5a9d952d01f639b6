"""benchmarks/bench_trainers.py --quick runs one pair end to end and prints its table.

The benchmark is started as a user would start it (a subprocess, which starts one child process
per variant); the test reads its markdown table and checks that the rows of the pair are there,
that every figure in them is a finite number and that the first-step losses of both sides agree
(the benchmark's own FIRST_LOSS_RTOL). Timings are not compared: the machine may be busy.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

ROOT = Path(__file__).parents[2]
COLUMNS = ["pair", "dtype", "variant", "tokens/s", "tokens/s w/o generation", "peak above models MiB",
           "first-step loss", "final loss", "speed x", "memory x", "first losses agree", "target"]


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_quick_run_prints_both_rows_of_the_pair_with_finite_figures(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_trainers.py"), "--quick", "--pairs", "hf-distill",
           "--dtypes", "fp32"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == COLUMNS
    rows = [dict(zip(COLUMNS, (c.strip() for c in line.strip("|").split("|")), strict=True))
            for line in lines[1:] if not line.startswith("|---")]
    assert [(row["pair"], row["dtype"], row["variant"]) for row in rows] == [
        ("hf-distill", "fp32", "own"), ("hf-distill", "fp32", "slmfast")]
    for row in rows:
        for column in ("tokens/s", "peak above models MiB", "first-step loss", "final loss"):
            assert math.isfinite(_number(row[column])), (column, row)
        assert _number(row["tokens/s"]) > 0
    own, ours = rows
    assert own["speed x"] == own["memory x"] == "-"
    assert math.isfinite(_number(ours["speed x"])) and math.isfinite(_number(ours["memory x"]))
    assert ours["first losses agree"].startswith("yes"), ours
    assert "speed >= 1.5" in ours["target"] and "memory <= 0.5" in ours["target"]
