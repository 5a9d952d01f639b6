"""Writes the GPU dispatch table (slmfast/gpu_dispatch.json) from one gpu_check.sh run.

Inputs: the figures of benchmarks/gpu_bench.py (results.json: records with "op", the kind keys,
"impl", "pass" and "ms") and the JUnit XML of that run's `pytest -m gpu` (one or more files).
For each kind of call (op, dtype, and for attention head-dim bucket, layout and causal; grad
True from the fwd+bwd figures, False from the fwd ones) the row ranks the implementations the
table chooses between, fastest first:
  cuda, triton  slmfast's kernels, counted only when their tests on this run passed (at least one
                passed test for that op and backend and none failed: the per-op test files, the
                GPU-size tests, and for cuda the test that C++ errors reach Python) and their
                figure exists; the others are listed under "excluded" with the reason
  native        torch's own path (SDPA / varlen_attn, F.rms_norm / F.layer_norm, the plain-PyTorch
                backend); excluded only when its own tests failed
So a slmfast kernel comes first only where it was correct and at least as fast as torch's own.
A kind measured at several shapes adds up the times of the shapes every contender ran. The
losses are measured with gradients only; their grad=False rows repeat that ranking.

    python benchmarks/gpu_dispatch.py --results results.json --junit junit.xml --out slmfast/gpu_dispatch.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

CONTENDERS = ("cuda", "triton", "native")
KIND_KEYS = ("dtype", "head_dim", "layout", "causal")
LOSS_OPS = ("cross_entropy", "linear_cross_entropy", "distill_loss")
ALL_OPS = ("attention", "rms_norm", "layer_norm", "swiglu", "geglu", "rotary") + LOSS_OPS

# test module (or module::function for the GPU-size file) -> the ops whose kernels it proves
TEST_OPS = {
    "test_attention": ("attention",), "test_attention_cuda": ("attention",),
    "test_attention_triton": ("attention",), "test_attention_module": ("attention",),
    "test_rms_norm": ("rms_norm",), "test_norm_linear": ("rms_norm",), "test_rms_norm_module": ("rms_norm",),
    "test_norm_linear_module": ("rms_norm",),
    "test_layer_norm": ("layer_norm",), "test_layer_norm_module": ("layer_norm",),
    "test_glu": ("swiglu", "geglu"), "test_glu_linear": ("swiglu", "geglu"),
    "test_swiglu": ("swiglu", "geglu"),  # test_glu.py's name in the runs recorded before the rename
    "test_mlp_module": ("swiglu", "geglu"),
    "test_rotary": ("rotary",), "test_rotary_module": ("rotary",),
    "test_cross_entropy": ("cross_entropy", "linear_cross_entropy"),
    "test_linear_cross_entropy": ("linear_cross_entropy",),
    "test_distill_loss": ("distill_loss",),
    "test_errors_reach_python": ALL_OPS,
}
GPU_SIZES = "test_gpu_realistic"  # tests/ops/test_gpu_realistic.py: the op is in the test's name
GPU_SIZE_TESTS = {
    "test_rms_norm": ("rms_norm",), "test_rms_norm_linear": ("rms_norm",), "test_layer_norm": ("layer_norm",),
    "test_swiglu_geglu": ("swiglu", "geglu"), "test_glu_linear": ("swiglu", "geglu"),
    "test_rotary": ("rotary",),
    "test_cross_entropy": ("cross_entropy",), "test_linear_cross_entropy": ("linear_cross_entropy",),
    "test_distill_loss": ("distill_loss",), "test_attention": ("attention",),
    "test_attention_packed": ("attention",),
}
# tests/ops/test_nonfinite.py names the op first in its parameter id ("rms_norm-cuda-float32-x")
PARAM_OPS = {"distill_from_logits": ("distill_loss",), "glu_linear": ("swiglu", "geglu"),
             "rms_norm_linear": ("rms_norm",), "sdpa": ("attention",),
             **{op: (op,) for op in ALL_OPS}}
MODULE_BACKEND = {"test_attention_cuda": "cuda", "test_attention_triton": "triton",
                  "test_errors_reach_python": "cuda"}


def test_backend(module: str, params: str) -> str | None:
    """The backend a test exercises: from its parameter id tokens, or from its module."""
    tokens = set(re.split(r"[-\[\]]", params))
    for name in CONTENDERS:
        if name in tokens:
            return name
    return MODULE_BACKEND.get(module)


def read_junit(paths: list[Path]) -> dict:
    """{(op, backend): {"passed": n, "failed": [test names]}} over the JUnit files; a test that
    appears in several files counts with its outcome in the last of them (a rerun's verdict)."""
    outcomes: dict = {}
    for path in paths:
        if not path.exists():
            continue
        for case in ET.parse(path).getroot().iter("testcase"):
            key = (case.get("classname", ""), case.get("name", ""))
            if any(child.tag == "skipped" for child in case):
                continue  # a skip says nothing (and leaves an earlier file's outcome standing)
            outcomes[key] = any(child.tag in ("failure", "error") for child in case)
    verdicts: dict = defaultdict(lambda: {"passed": 0, "failed": []})
    for (classname, name), failed in outcomes.items():
        parts = classname.split(".")
        module = next((p for p in reversed(parts) if p.startswith("test_")), "")
        function, _, params = name.partition("[")
        backend = test_backend(module, params)
        if module == GPU_SIZES:
            ops = GPU_SIZE_TESTS.get(function)
        else:
            ops = TEST_OPS.get(module) or PARAM_OPS.get(params.split("-", 1)[0])
        if backend is None or ops is None:
            continue
        for op in ops:
            if failed:
                verdicts[(op, backend)]["failed"].append(f"{module}::{name}")
            else:
                verdicts[(op, backend)]["passed"] += 1
    return verdicts


def exclusion(op: str, impl: str, verdicts: dict) -> str | None:
    """Why an implementation may not be chosen for `op` on this run's evidence, or None."""
    verdict = verdicts.get((op, impl), {"passed": 0, "failed": []})
    if verdict["failed"]:
        shown = ", ".join(verdict["failed"][:2])
        return f"{len(verdict['failed'])} failed test(s): {shown}"
    if impl != "native" and verdict["passed"] == 0:
        return "no passing test on this run"
    return None


def build_rows(results: dict, verdicts: dict) -> list[dict]:
    groups: dict = defaultdict(lambda: defaultdict(dict))  # key -> impl -> shape -> ms
    errors: dict = defaultdict(dict)
    for section in ("attention", "layers", "losses"):
        for rec in results.get(section, []):
            if rec.get("impl") not in CONTENDERS or rec.get("pass") not in ("fwd", "fwd+bwd"):
                continue
            key = (rec["op"], tuple((k, rec[k]) for k in KIND_KEYS if k in rec), rec["pass"] == "fwd+bwd")
            if "ms" in rec:
                groups[key][rec["impl"]][rec.get("shape", "")] = rec["ms"]
            else:
                errors[key][rec["impl"]] = rec.get("error", "no figure")
    rows = []
    for (op, kind, grad), by_impl in sorted(groups.items(), key=lambda item: repr(item[0])):
        shapes = set.intersection(*(set(s) for s in by_impl.values()))
        ms, excluded = {}, {}
        for impl in CONTENDERS:
            why = exclusion(op, impl, verdicts)
            if impl in by_impl and shapes:
                ms[impl] = round(sum(by_impl[impl][s] for s in shapes), 4)
            elif why is None:
                why = errors[(op, kind, grad)].get(impl, "not measured on this run")
                if impl == "native":
                    why = None  # torch's own stays the fallback even unmeasured
            if why is not None:
                excluded[impl] = why
        ranking = sorted((i for i in ms if i not in excluded), key=lambda i: (ms[i], i == "native"))
        if "native" not in ranking and "native" not in excluded:
            ranking.append("native")
        row = {"op": op, **dict(kind), "grad": grad, "ranking": ranking, "ms": ms}
        if excluded:
            row["excluded"] = excluded
        rows.append(row)
        if op in LOSS_OPS and grad:
            rows.append(dict(row, grad=False, note="ranked by the fwd+bwd figures"))
    return rows


def build_table(results: dict, verdicts: dict) -> dict:
    env = results.get("env", {})
    keys = ("date", "card", "capability", "torch", "triton", "cuda", "commit")
    measured = {key: env.get(key) for key in keys}
    tests = {f"{op}/{backend}": {"passed": v["passed"], "failed": len(v["failed"])}
             for (op, backend), v in sorted(verdicts.items())}
    return {"about": "slmfast's GPU dispatch table (read by slmfast/gpu_table.py, written by "
                     "benchmarks/gpu_dispatch.py from a benchmarks/gpu_check.sh run): per kind of call, "
                     "the implementations whose tests passed on that run, fastest first (ms: medians, "
                     "summed over the kind's shapes).",
            "measured": measured, "tests": tests, "rows": build_rows(results, verdicts)}


def summary(table: dict) -> list[str]:
    lines = [f"dispatch table: {len(table['rows'])} rows, measured on {table['measured'].get('card')} "
             f"{table['measured'].get('date')}"]
    for row in table["rows"]:
        if row.get("note"):
            continue
        kind = " ".join(str(row[k]) for k in KIND_KEYS if k in row)
        times = " ".join(f"{i}={row['ms'][i]:.3f}" for i in CONTENDERS if i in row["ms"])
        out = " ".join(f"[{i}: {why[:40]}]" for i, why in row.get("excluded", {}).items())
        lines.append(f"  {row['op']:<20} {kind:<28} {'bwd' if row['grad'] else 'fwd'} -> "
                     f"{row['ranking'][0]:<7} {times} {out}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--junit", type=Path, nargs="+", default=[])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    if not results.get("env"):
        print(f"gpu_dispatch: no figures in {args.results}; table not written")
        return 1
    table = build_table(results, read_junit(args.junit))
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    print("\n".join(summary(table)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
