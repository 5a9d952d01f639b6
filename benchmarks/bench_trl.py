"""TRL's distillation loss against the same loss on slmfast's kernels: step time and peak memory.

Variants, on the same inputs (fp32 student hidden states (B, T, Hs) and LM head (V, Hs), teacher
(B, T, Ht) and (V, Ht), a completion mask with the first quarter of each row masked out as a
prompt; TRL's default beta 0.5 = JSD, and beta 0 = forward KL):
  trl       trl.trainer.distillation_trainer._chunked_divergence_loss, TRL's own function (its
            torch tiles on the CPU: no Triton)
  slmfast   slmfast.integrations.trl.chunked_divergence_loss, what slmfast.integrations.trl.patch()
            puts in its place
Each step is the loss's forward and backward into the student's hidden states and LM head.

Peak memory: one fresh child process per variant (python bench_trl.py --child ...); the figure
is the child's peak resident set size (VmHWM, /proc/self/status) minus its RSS after the imports
and the inputs exist ("above inputs": what the loss step itself allocates, gradients included).
Time: median wall time of --reps steps after one warm-up step.

    python benchmarks/bench_trl.py [--batch 4 --seq 512 --student-hidden 512 --teacher-hidden 768
                                    --vocab 32768 --betas 0.5 0.0 --reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, status_kib  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = ("trl", "slmfast")


def make_inputs(a, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, t, hs, ht, v = a.batch, a.seq, a.student_hidden, a.teacher_hidden, a.vocab
    sh = torch.randn(b, t, hs, generator=g)                                    # (B, T, Hs)
    th = torch.randn(b, t, ht, generator=g)                                    # (B, T, Ht)
    sw = (torch.randn(v, hs, generator=g) / hs ** 0.5).requires_grad_(True)     # (V, Hs)
    tw = torch.randn(v, ht, generator=g) / ht ** 0.5 * 2                        # (V, Ht)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[:, : t // 4] = 0                                                       # the prompts
    return sh.requires_grad_(True), th, sw, tw, mask


def loss_fn(variant):
    """The variant's function; both variants import both libraries and load slmfast's kernels, so
    that the baseline RSS holds the same code."""
    from trl.trainer import distillation_trainer

    from slmfast import backends
    from slmfast.integrations import trl as slm_trl

    backends.extension()
    if variant == "trl":
        slm_trl.unpatch()
        return distillation_trainer._chunked_divergence_loss
    return slm_trl.chunked_divergence_loss


def child(a) -> None:
    fn = loss_fn(a.variant)
    sh, th, sw, tw, mask = make_inputs(a)
    base_kib = status_kib("VmRSS")

    def step():
        sh.grad = sw.grad = None
        loss, _entropy, _n = fn(sh, th, sw, tw, mask, a.beta)
        loss.backward()
        return loss.item()

    t0 = time.perf_counter()
    loss = step()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    peak_kib = status_kib("VmHWM")
    print(json.dumps({"variant": a.variant, "beta": a.beta, "loss": loss, "time_s": times[len(times) // 2],
                      "warmup_s": warm, "peak_mib": peak_kib / 1024,
                      "above_inputs_mib": (peak_kib - base_kib) / 1024, "grad_norm": float(sw.grad.norm())}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--student-hidden", type=int, default=512)
    p.add_argument("--teacher-hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--betas", type=float, nargs="+", default=[0.5, 0.0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--beta", type=float, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a)
        return
    print(environment("cpu"))
    print(f"B={a.batch} T={a.seq} Hs={a.student_hidden} Ht={a.teacher_hidden} V={a.vocab} fp32, "
          f"completion mask 3/4 of each row, {a.reps} reps after a warm-up")
    shape = ["--batch", str(a.batch), "--seq", str(a.seq), "--student-hidden", str(a.student_hidden),
             "--teacher-hidden", str(a.teacher_hidden), "--vocab", str(a.vocab), "--reps", str(a.reps)]
    print("| beta | variant | step time | peak RSS above inputs | loss | time ratio | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for beta in a.betas:
        rows = {}
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--child", "--variant", variant, "--beta", str(beta), *shape]
            env = {**os.environ, "TRITON_INTERPRET": "0"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"| {beta} | {variant} | failed: {out.stderr.strip().splitlines()[-1:]} |")
                continue
            rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        for variant, r in rows.items():
            base = rows.get("trl")
            ratio = ("-", "-")
            if base:
                ratio = (f"{r['time_s'] / base['time_s']:.2f}",
                         f"{r['above_inputs_mib'] / base['above_inputs_mib']:.2f}")
            print(f"| {beta} | {variant} | {r['time_s'] * 1e3:,.0f} ms | {r['above_inputs_mib']:,.0f} MiB | "
                  f"{r['loss']:.6f} | {ratio[0]} | {ratio[1]} |")


if __name__ == "__main__":
    main()
