"""DistillationTrainer under torchrun with 2 gloo processes on the CPU logs the losses of one
process on the same global batches: the student under DDP with a replicated teacher, and with the
teacher sharded by FSDP2's fully_shard (gathered for the loss). Three steps, gradient
accumulation 2, uneven padding per rank, so the global num_items_in_batch matters.

Tolerance: the only differences are float summation order (each rank sums part of the tokens,
gradients are all-reduced): rtol 1e-5 is far above that and far below a wrong normalization
(a factor of 2) or unsynchronized gradients.

Not covered: FSDP2 for the student through transformers.Trainer: on the CPU accelerate runs
FSDP settings as plain DDP (distributed type MULTI_CPU), so that path needs a GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

ROOT = Path(__file__).parents[2]
WORKER = Path(__file__).parent / "_hf_distill_worker.py"


def _run(mode: str, out: Path, nproc: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    r = subprocess.run([*launcher, str(WORKER), mode, str(out)], capture_output=True, text=True, env=env,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_ddp_and_sharded_teacher_match_one_process(tmp_path):
    single = _run("single", tmp_path / "single.json", 1)
    assert len(single["losses"]) == 3
    for mode in ("ddp", "ddp-sharded-teacher"):
        got = _run(mode, tmp_path / f"{mode}.json", 2)
        assert got["wrapped"] == "DistributedDataParallel"
        assert got["teacher_sharded"] == (mode == "ddp-sharded-teacher")
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(single["losses"]), rtol=1e-5,
                                   atol=0, msg=lambda m, p=mode: f"{p}: {m}")
