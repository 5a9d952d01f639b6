"""benchmarks/kd_study.py --quick: every arm trains (finite, completed, evaluated) on the same
batches, the caches are written with their sizes, and the table and figure are written."""

from __future__ import annotations

import json
import math

from benchmarks import kd_study


def test_quick_study_trains_every_arm_and_writes_the_table(tmp_path):
    out = tmp_path / "study"
    results = kd_study.run_study(out, quick=True, threads=1, progress=False, log=lambda *a: None)
    assert set(results["arms"]) == set(kd_study.ARMS)
    for arm, a in results["arms"].items():
        assert a["curve"] and all(math.isfinite(e["val_loss"]) for e in a["curve"]), arm
        assert a["tokens"] == results["arms"]["plain CE"]["tokens"], arm               # the same budget
    for arm in ("top-8 cache", "top-64 cache", "sampled cache"):
        assert results["arms"][arm]["cache"]["bytes"] > 0
    table = (out / "table.md").read_text()
    assert all(arm in table for arm in kd_study.ARMS)
    assert (out / "kd_study.png").stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["samples"] == results["samples"] >= 1
