"""A training step's peak memory with each loop of the LM head's loss (one pass against two passes).

bf16/fp16 linear cross-entropy on the CPU used to run one pass over the tokens that summed the
weight's gradient in a float32 V x H buffer (twice the gradient) during the forward and held the
gradient from the forward to the backward; it now runs two passes (slmfast/ops/_loss_chunks.py:
the forward keeps grad_hidden and 2 floats per token, the backward builds the weight's gradient
one vocabulary tile at a time). This benchmark shows what that does to a whole training step.

Model: slmfast's CausalLM with LlamaConfig.named("125M") (12 layers x 768, vocabulary 32,000),
bf16 weights, batch 8 x 1024 by default, recompute policies "none" and "full". For each (loop,
policy), in a fresh child process (measured as benchmarks/bench_recompute_peak.py does, whose
docstring explains why: MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB, malloc_trim and a VmHWM reset
before the step): one warm-up step makes the gradients, then the measured step's peak resident
set size above the parameters and their gradients, and its time. Beside it, on the meta device
(slmfast.recompute.report, the storage tracker): the bytes saved for backward and the predicted
step peak. The loops:
  one-pass  the chunked loop, chosen by turning _loss_chunks.uses_two_pass off (slmfast before
            the two-pass loop)
  two-pass  the default for bf16/fp16 on the CPU

    python benchmarks/bench_step_peak.py [--model 125M] [--batch 8] [--seq 1024] [--policies none full]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import slmfast.recompute as rc  # noqa: E402
from benchmarks.common import environment, print_table, step_peak_rss  # noqa: E402
from slmfast.models import CausalLM, LlamaConfig  # noqa: E402
from slmfast.ops import _loss_chunks  # noqa: E402

LOOPS = ("one-pass", "two-pass")
MIB = 2.0 ** 20


def build(args, device: str):
    """(model, batch) with fixed seeds, bf16 weights, the policy applied, the loop chosen."""
    if args.loop == "one-pass":
        _loss_chunks.uses_two_pass = lambda device, dtype: False
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalLM(LlamaConfig.named(args.model)).to(torch.bfloat16).train()
    rc.apply(model, args.policy)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)  # (B, T)
    return model, dict(input_ids=ids, labels=ids)


def predict_child(args) -> dict:
    """On the meta device: saved bytes and the predicted step peak (slmfast.recompute.report)."""
    model, batch = build(args, "meta")
    report = rc.report(model, batch)
    return dict(saved=report.activation_bytes, predicted=report.step_peak_bytes, phase=report.peak_phase)


def measure_child(args) -> dict:
    """On the CPU: the measured step's peak RSS above parameters and gradients, and its time."""
    model, batch = build(args, "cpu")

    def step():
        model(**batch).loss.backward()

    measured, seconds = step_peak_rss(step, model)
    return dict(measured=measured, seconds=seconds)


def run_child(args, mode: str, loop: str, policy: str) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--loop", loop, "--policy", policy, "--model",
               args.model, "--batch", str(args.batch), "--seq", str(args.seq)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {mode} {loop} {policy} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="125M")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--policies", nargs="+", default=["none", "full"])
    parser.add_argument("--predict-only", action="store_true", help="only the meta-device figures (fast)")
    parser.add_argument("--child", choices=("predict", "measure"), help=argparse.SUPPRESS)
    parser.add_argument("--loop", choices=LOOPS, help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps((predict_child if args.child == "predict" else measure_child)(args)))
        return
    print(environment("cpu"))
    print(f"model {args.model}, bf16 weights, batch {args.batch} x {args.seq}; MiB above parameters and "
          "gradients")
    rows = []
    for policy in args.policies:
        for loop in LOOPS:
            p = run_child(args, "predict", loop, policy)
            row = {"policy": policy, "loss loop": loop, "saved MiB": f"{p['saved'] / MIB:.1f}",
                   "predicted peak MiB": f"{p['predicted'] / MIB:.1f}", "peak phase": p["phase"]}
            if not args.predict_only:
                m = run_child(args, "measure", loop, policy)
                row.update({"measured peak MiB": f"{m['measured'] / MIB:.1f}",
                            "step s": f"{m['seconds']:.1f}"})
            rows.append(row)
    print_table(rows, ["policy", "loss loop", "saved MiB", "predicted peak MiB", "peak phase",
                       "measured peak MiB", "step s"])


if __name__ == "__main__":
    main()
