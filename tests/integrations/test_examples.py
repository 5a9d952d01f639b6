"""Every script in examples/ runs offline for a few steps on a tiny model and its loss falls.

Each runs in a subprocess, as a user would start it, and prints its losses as the JSON line
{"losses": [...]} last; the Lightning and TRL examples are skipped when those optional extras are
not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _needs(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (an optional extra: "
                                                    "pip install 'slmfast[trl,lightning]')")


EXAMPLES = [
    pytest.param("hf_pretrain.py", 8, True, marks=_needs("transformers", "accelerate")),
    pytest.param("hf_distill.py", 6, True, marks=_needs("transformers", "accelerate")),
    pytest.param("trl_distill.py", 4, True, marks=_needs("trl", "datasets")),
    pytest.param("lightning_slmfast.py", 8, False, marks=_needs("pytorch_lightning")),
    pytest.param("accelerate_loop.py", 8, False, marks=_needs("transformers", "accelerate")),
]


@pytest.mark.parametrize("script, steps, has_out", EXAMPLES)
def test_example_runs_and_the_loss_falls(tmp_path, script, steps, has_out):
    cmd = [sys.executable, str(ROOT / "examples" / script), "--steps", str(steps)]
    if has_out:
        cmd += ["--out", str(tmp_path / "out")]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    losses = json.loads(r.stdout.strip().splitlines()[-1])["losses"]
    assert len(losses) == steps
    assert losses[-1] < losses[0], f"{script}: the loss did not fall: {losses}"
