"""`python -m slmfast demo --quick` runs to the end, as CI runs it, and writes its outputs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1")        # tiny models: one thread is fastest (conftest.py)
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "slmfast", "demo", "--quick", "--out", str(out), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    # the table on stdout and in table.md: one row per model
    table = (out / "table.md").read_text()
    for row in ("teacher", "student + KD", "student alone"):
        assert f"| {row} " in table and f"| {row} " in r.stdout
    for column in ("val loss", "perplexity", "tokens/s", "activation bytes"):
        assert column in table
    assert "token efficiency:" in r.stdout
    # the plot is a real PNG
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    summary = (out / "README.md").read_text()
    assert "token efficiency" in summary and "demo.png" in summary and table in summary
    assert "## Samples" in summary
    results = json.loads((out / "results.json").read_text())
    vocab = results["settings"]["vocab_size"]
    assert results["teacher"]["final"]["val_loss"] < math.log(vocab) - 1     # the teacher learned
    for run in ("student_kd", "student_ce"):                                 # and so did both students
        assert results[run]["final"]["val_loss"] < results[run]["evals"][0]["val_loss"] - 1
    assert results["student_kd"]["tokens"] == results["student_ce"]["tokens"]
    # the corpus report names what was skipped (third-party packages, the docs beyond --quick's slice)
    assert "site-packages" in summary
