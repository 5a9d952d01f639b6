"""DDP and FSDP2 under torchrun with 2 gloo processes on the CPU give the loss of one process on the
same global batch (distillation with a live teacher, gradient accumulation 2; under FSDP the
teacher is sharded as well; and an FSDP run interrupted and resumed from its gathered checkpoint).

Tolerance: the processes see the same global batches and the loss is normalized by the global token
count, so the only differences are float summation order (each rank sums half the tokens, gradients
are all-reduced). rtol 1e-5 on 4 steps is far above that noise and far below what a wrong
normalization (a factor of 2), a wrong shard (another batch: ~1e-2) or unsynced gradients give.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slmfast.distill import train
from tests.distill.conftest import tiny_config

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_ddp_and_fsdp_match_one_process(tmp_path, data_root, tiny_teacher):
    c = tiny_config(tmp_path / "single", data_root)
    c.train.steps, c.train.batch_size, c.train.grad_accum, c.train.eval_every = 4, 4, 2, 2
    c.teacher.path, c.loss.alpha = str(tiny_teacher), 0.5
    single = train(c, "distill", log=lambda *a: None)
    runs = {"ddp": "", "fsdp": "", "fsdp-resumed": "@2"}    # the last one is interrupted after step 2
    paths = []
    for name, stop in runs.items():
        parallel = name.split("-")[0]
        c.out_dir, c.train.parallel = str(tmp_path / name), parallel
        c.teacher.shard = parallel == "fsdp"             # FSDP: the teacher sharded too
        (tmp_path / f"{name}.toml").write_text(c.to_toml())
        paths.append(f"{tmp_path / name}.toml{stop}")
    out = tmp_path / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).parent / "_dist_worker.py"), str(out), *paths]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    for parallel, got in zip(runs, json.loads(out.read_text())):
        assert got["status"] == "completed", parallel
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(single.losses), rtol=1e-5,
                                   atol=0,
                                   msg=lambda m, p=parallel: f"{p}: {m}")
        torch.testing.assert_close(torch.tensor([e["val_loss"] for e in got["evals"]]),
                                   torch.tensor([e["val_loss"] for e in single.evals]), rtol=1e-5, atol=0,
                                   msg=lambda m, p=parallel: f"{p}: {m}")
        assert Path(got["checkpoint"]).is_dir()          # rank 0 wrote the (gathered) checkpoint
