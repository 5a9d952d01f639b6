"""Memory-lean losses: peak memory and fwd+bwd time against the unfused PyTorch computation.

Variants, on the same inputs (hidden states and LM-head weights in --dtype, bf16 by default):
  lce             slmfast.functional.linear_cross_entropy (chunked; bf16/fp16 on the CPU in two passes)
  lce_unfused     logits = hidden @ W.T, then F.cross_entropy(logits.float(), target)
  lce_torch       torch's own chunked F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())
  lce_cce         Apple's cut-cross-entropy, impl="torch_compile" (its CPU path; `pip install --no-deps
                  cut-cross-entropy`), skipped when it is not installed
  distill         slmfast.functional.distill_loss (forward KL, T = 2, teacher of the same size)
  distill_unfused student and teacher logits in full, log_softmax(.float() / T), F.kl_div, * T^2
Each is a full training step's loss part: forward, backward into hidden and W (the teacher has
no gradient).

The floor: no step can hold less than its inputs and the gradients it returns, in their own
dtypes (hidden N x H and W V x H, twice; the teacher's hidden and W once; plus O(N) for targets and
per-token statistics). Every row prints its memory above import as a multiple of that floor.

Peak memory:
  cpu   one fresh child process per variant (python bench_losses.py --child ...); the figure is
        its peak resident set size, VmHWM from /proc/self/status, reset once the inputs exist
        (so the temporaries of making them do not count), and the part above the RSS measured
        after `import torch, slmfast` and before the inputs exist ("above import": inputs +
        everything the step allocates; the analogue of a GPU's max_memory_allocated).
  cuda  torch.cuda.max_memory_allocated over the step, inputs included, in this process.
Time: median wall time of fwd+bwd after a warm-up step (benchmarks.common.time_fn).

    python benchmarks/bench_losses.py --table [--device cuda] [--vocab 32768 151936] [--dtype bf16]
    pytest benchmarks/bench_losses.py --benchmark-only        (small shapes, pytest-benchmark)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, print_table, reset_peak_rss, status_kib, sync  # noqa: E402
from slmfast.functional import distill_loss, linear_cross_entropy  # noqa: E402

VARIANTS = ("lce", "lce_unfused", "lce_torch", "lce_cce", "distill", "distill_unfused")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
TEMPERATURE = 2.0


def make_inputs(n, h, v, dtype, device, teacher=True, seed=0):
    """Student hidden/weight (requiring grad), teacher hidden/weight (None unless teacher), target."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(device=device, dtype=dtype).requires_grad_()
    teacher_hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype) if teacher else None
    teacher_weight = ((torch.randn(v, h, generator=g) / h ** 0.5).to(device=device, dtype=dtype)
                      if teacher else None)
    target = torch.randint(0, v, (n,), generator=g).to(device)
    target[::17] = -100
    return hidden, weight, teacher_hidden, teacher_weight, target


def step_fn(variant, hidden, weight, teacher_hidden, teacher_weight, target, keep_grads=False):
    """One forward + backward of the variant; returns the loss (the gradients stay in .grad with
    keep_grads, else they are dropped)."""
    if variant == "lce":
        loss = linear_cross_entropy(hidden, weight, target)
    elif variant == "lce_unfused":
        loss = F.cross_entropy((hidden @ weight.t()).float(), target)
    elif variant == "lce_torch":
        loss = F.linear_cross_entropy(hidden, weight, target, ignore_index=-100,
                                      options=torch.nn.LinearCrossEntropyOptions())
    elif variant == "lce_cce":
        from cut_cross_entropy import linear_cross_entropy as cce
        loss = cce(hidden, weight, target, ignore_index=-100, impl="torch_compile")
    elif variant == "distill":
        loss = distill_loss(hidden, weight, teacher_hidden, teacher_weight, target, kind="forward_kl",
                            temperature=TEMPERATURE)
    elif variant == "distill_unfused":
        student = (hidden @ weight.t()).float()
        with torch.no_grad():
            teacher = F.log_softmax((teacher_hidden @ teacher_weight.t()).float() / TEMPERATURE, -1)
        rows = F.kl_div(F.log_softmax(student / TEMPERATURE, -1), teacher, log_target=True,
                        reduction="none").sum(-1)
        valid = target != -100
        loss = (rows * valid).sum() / valid.sum() * TEMPERATURE ** 2
    else:
        raise ValueError(variant)
    loss.backward()
    if not keep_grads:
        hidden.grad = weight.grad = None
    return loss.detach()


def lce_reference_fp64(hidden, weight, target, chunk=256):
    """The mean cross-entropy and its gradients in float64, chunk by chunk over the tokens (the
    (N, V) float64 logits would not fit at the large shapes): (loss, d hidden, d weight)."""
    h, w = hidden.detach().double(), weight.detach().double()  # (N, H), (V, H)
    valid = target != -100
    count = int(valid.sum())
    loss, gh, gw = 0.0, torch.empty_like(h), torch.zeros_like(w)
    for c0 in range(0, h.shape[0], chunk):
        rows, y, keep = h[c0:c0 + chunk], target[c0:c0 + chunk].clamp(min=0), valid[c0:c0 + chunk]
        logits = rows @ w.t()                                                           # (C, V)
        lse = logits.logsumexp(-1)                                                      # (C,)
        loss += float(((lse - logits.gather(1, y[:, None])[:, 0]) * keep).sum())
        grad = (logits - lse[:, None]).exp_()                                           # softmax (C, V)
        grad[torch.arange(len(y)), y] -= 1.0
        grad *= keep[:, None] / count
        gh[c0:c0 + chunk] = grad @ w
        gw += grad.t() @ rows
    return loss / count, gh, gw


def gradient_errors(variant, inputs) -> dict:
    """Relative errors (Frobenius) of the variant's loss and gradients against lce_reference_fp64."""
    hidden, weight, *_, target = inputs
    loss = step_fn(variant, *inputs, keep_grads=True)
    ref_loss, ref_gh, ref_gw = lce_reference_fp64(hidden, weight, target)

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm())

    errors = {"loss_err": abs(float(loss) - ref_loss) / abs(ref_loss),
              "dhidden_err": rel(hidden.grad, ref_gh), "dweight_err": rel(weight.grad, ref_gw)}
    hidden.grad = weight.grad = None
    return errors


def child(args) -> None:
    """Runs one variant in this fresh process and prints one JSON line."""
    base_kib = status_kib("VmRSS")
    inputs = make_inputs(args.n, args.hidden, args.vocab_one, DTYPES[args.dtype], "cpu",
                         teacher=args.variant.startswith("distill"))
    reset_peak_rss()  # making the inputs had its own temporaries (randn, then the scaled copy)
    inputs_kib = status_kib("VmRSS")
    t0 = time.perf_counter()
    step_fn(args.variant, *inputs)  # warm-up
    warm = time.perf_counter() - t0
    warm_kib = status_kib("VmHWM")
    settled_kib = status_kib("VmRSS")  # the inputs plus what the first step left resident (library code)
    reset_peak_rss()  # the steady figure: steps after the first, above what the first one left
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        step_fn(args.variant, *inputs)
        times.append(time.perf_counter() - t0)
    steady_kib = status_kib("VmHWM")
    peak_kib = max(warm_kib, steady_kib)
    times.sort()
    result = {"variant": args.variant, "time_s": times[len(times) // 2], "warmup_s": warm,
              "peak_mib": peak_kib / 1024, "above_import_mib": (peak_kib - base_kib) / 1024,
              "step_mib": (peak_kib - inputs_kib) / 1024, "steady_mib": (steady_kib - settled_kib) / 1024}
    if args.error and args.variant.startswith("lce"):
        result.update(gradient_errors(args.variant, inputs))
    print(json.dumps(result))


def input_mib(variant: str, n: int, h: int, v: int, dtype: str) -> float:
    """The bytes of the step's inputs: hidden, W (and the teacher's), the int64 targets."""
    elem = torch.finfo(DTYPES[dtype]).bits // 8
    student = (n * h + v * h) * elem
    return (student * (2 if variant.startswith("distill") else 1) + 8 * n) / 2 ** 20


def floor_mib(variant: str, n: int, h: int, v: int, dtype: str) -> float:
    """Inputs plus the gradients the step returns, in their dtype, plus the int64 targets and
    two float32 statistics per token (the O(N) part)."""
    elem = torch.finfo(DTYPES[dtype]).bits // 8
    student = (n * h + v * h) * elem
    teacher = student if variant.startswith("distill") else 0
    return (2 * student + teacher + n * (8 + 2 * 4)) / 2 ** 20


def unfused_estimate_gib(n, v, dtype) -> float:
    """Rough peak of the unfused variants: logits in dtype, their fp32 copy, log-softmax, grads."""
    elem = torch.finfo(DTYPES[dtype]).bits // 8
    return n * v * (elem + 4 * 4) / 2 ** 30


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2 ** 20
    return float("inf")


def run_cpu(args, vocab) -> dict:
    results = {}
    for variant in args.variants:
        need = unfused_estimate_gib(args.n, vocab, args.dtype)
        if variant == "lce_cce" and not _has_cce():
            results[variant] = {"skipped": "cut-cross-entropy is not installed"}
            continue
        if variant.endswith("unfused") and need > 0.6 * available_gib():
            results[variant] = {"skipped": f"needs ~{need:.0f} GiB, {available_gib():.0f} GiB available"}
            continue
        cmd = [sys.executable, __file__, "--child", "--variant", variant, "--n", str(args.n), "--hidden",
               str(args.hidden), "--vocab-one", str(vocab), "--dtype", args.dtype, "--reps", str(args.reps),
               *(["--error"] if args.error else [])]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"})
        if out.returncode != 0:
            results[variant] = {"skipped": f"child failed: {out.stderr.strip().splitlines()[-1:]}"}
            continue
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def _has_cce() -> bool:
    try:
        import cut_cross_entropy  # noqa: F401
    except ImportError:
        return False
    return True


def run_cuda(args, vocab) -> dict:
    results = {}
    for variant in args.variants:
        torch.cuda.empty_cache()
        inputs = make_inputs(args.n, args.hidden, vocab, DTYPES[args.dtype], "cuda",
                             teacher=variant.startswith("distill"))
        step_fn(variant, *inputs)  # warm-up (and Triton compilation)
        sync("cuda")
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            step_fn(variant, *inputs)
            sync("cuda")
            times.append(time.perf_counter() - t0)
        times.sort()
        results[variant] = {"variant": variant, "time_s": times[len(times) // 2],
                            "peak_mib": torch.cuda.max_memory_allocated() / 2 ** 20}
        results[variant]["above_import_mib"] = results[variant]["peak_mib"]
        results[variant]["step_mib"] = results[variant]["peak_mib"] - input_mib(variant, args.n, args.hidden,
                                                                                 vocab, args.dtype)
        del inputs
    return results


def run_table(args) -> None:
    print(environment(args.device))
    method = ("peak RSS (VmHWM) of a fresh child process per variant; 'above import' subtracts the RSS "
              "after importing torch+slmfast" if args.device == "cpu" else "torch.cuda.max_memory_allocated")
    print(f"memory: {method}; time: median of {args.reps} fwd+bwd steps after one warm-up")
    rows = []
    for vocab in args.vocab:
        res = run_cpu(args, vocab) if args.device == "cpu" else run_cuda(args, vocab)
        for family, base in (("lce", "lce_unfused"), ("distill", "distill_unfused")):
            for name in [v for v in args.variants if v.split("_")[0] == family]:
                r = res.get(name)
                if r is None:
                    continue
                row = {"variant": name, "pass": "fwd+bwd", "N x H x V": f"{args.n}x{args.hidden}x{vocab}",
                       "dtype": args.dtype}
                if "skipped" in r:
                    row["time s"] = "skipped: " + r["skipped"]
                    rows.append(row)
                    continue
                floor = floor_mib(name, args.n, args.hidden, vocab, args.dtype)
                inputs = input_mib(name, args.n, args.hidden, vocab, args.dtype)
                row.update({"time s": f"{r['time_s']:.3f}", "peak MiB": f"{r['peak_mib']:.0f}",
                            "above import MiB": f"{r['above_import_mib']:.0f}",
                            "step MiB": f"{r['step_mib']:.0f}", "floor MiB": f"{floor:.0f}",
                            "x floor": f"{(inputs + r['step_mib']) / floor:.2f}"})
                if "steady_mib" in r:
                    row["x floor steady"] = f"{(inputs + r['steady_mib']) / floor:.2f}"
                for key in ("loss_err", "dhidden_err", "dweight_err"):
                    if key in r:
                        row[key.replace("_err", " err")] = f"{r[key]:.2e}"
                b = res.get(base)
                if name != base and b is not None and "skipped" not in b:
                    row["time ratio"] = f"{r['time_s'] / b['time_s']:.2f}"
                    row["peak ratio"] = f"{r['peak_mib'] / b['peak_mib']:.3f}"
                    row["above-import ratio"] = f"{r['above_import_mib'] / b['above_import_mib']:.3f}"
                rows.append(row)
    columns = ["variant", "pass", "N x H x V", "dtype", "time s", "peak MiB", "above import MiB", "step MiB",
               "floor MiB", "x floor", "x floor steady", "time ratio", "peak ratio", "above-import ratio",
               "loss err", "dhidden err", "dweight err"]
    if args.device == "cuda":
        columns.remove("above import MiB")
        columns.remove("above-import ratio")
    print_table(rows, columns)
    print("(ratios: variant / unfused; < 1 is better. 'step MiB': peak RSS above the RSS once the inputs "
          "exist, the warm-up step included; 'x floor': (inputs + step) / (inputs + their gradients); "
          "'x floor steady': the same for the steps after the warm-up, above the RSS the warm-up left "
          "(first-use library pages excluded); "
          "errors: relative to a float64 computation on the same inputs; targets for slmfast: "
          "<= 1.1x floor and time <= 1.0x unfused)")


# ---- pytest-benchmark entry points (small shapes) -----------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_losses_fwd_bwd(benchmark, variant):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = make_inputs(1024, 256, 32768, torch.bfloat16, device, teacher=variant.startswith("distill"))

    def step():
        step_fn(variant, *inputs)
        sync(device)

    benchmark(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the comparison table")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 151936])
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--error", action="store_true",
                        help="also the loss and gradient errors against float64 (lce variants; slow at "
                             "large V)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--vocab-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    else:
        run_table(args)


if __name__ == "__main__":
    main()
