"""Recompute budgets against a step's real peak: is the planner's peak bound kept in practice?

For a model and a batch, the planner (slmfast.recompute, MemoryBudget measure="peak") is asked for
budgets of 0.3, 0.4, ..., 0.9 of the step's peak with no recomputation; each plan, and each
uniform policy (none, selective, full), then runs in a fresh child process that measures the
step's real peak: the resident set size a forward + backward adds above the parameters and their
gradients (both exist before the measured step: one warm-up step made the gradients, which are
zeroed in place). Before the step the freed heap is trimmed (malloc_trim) and the kernel's
high-water mark reset (/proc/self/clear_refs); the child runs with MALLOC_MMAP_THRESHOLD_ fixed
at 64 KiB so that every tensor is its own mapping and a freed tensor leaves the RSS at once
(glibc otherwise raises the threshold after the first large free and keeps freed tensors in its
heap, so the RSS would show the heap's high-water mark, not what the step holds).

Columns: the plan's policies, the budget, the planner's predicted peak (tracked op by op,
slmfast/recompute/tracker.py), the measured peak, measured / budget (target <= 1.05), the
prediction error (target <= 10%), and the step time against the cheapest uniform policy whose
measured peak also fits the budget (target <= 1.0). Models:
  hf-llama   transformers LlamaModel, the trunk only (inputs_embeds in, no embedding or LM head;
             loss = mean of the last hidden state squared), 6 layers x 512, fp32
  slmfast    slmfast's CausalLM with its fused loss, 6 layers x 512, vocabulary 8192, fp32

    python benchmarks/bench_recompute_peak.py [--models hf-llama slmfast] [--batch 4 --seq 1024]
                                              [--budgets 0.3 0.4 ...] [--quick]
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

import slmfast.recompute as rc  # noqa: E402
from benchmarks.common import environment, print_table, step_peak_rss  # noqa: E402

UNIFORM = ("none", "selective", "full")
MIB = 2.0 ** 20


def build(name: str, batch: int, seq: int, quick: bool):
    """(model, batch dict, loss_fn) with fixed seeds: every child builds the same thing."""
    torch.manual_seed(0)
    layers, hidden = (3, 128) if quick else (6, 512)
    if name == "hf-llama":
        import transformers

        config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                          num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                          num_key_value_heads=hidden // 64, vocab_size=64,
                                          max_position_embeddings=seq, use_cache=False)
        model = transformers.LlamaModel(config)
        model.config._attn_implementation = "sdpa"
        inputs = dict(inputs_embeds=torch.randn(batch, seq, hidden))   # (B, T, H), no grad: trunk only

        def loss_fn(output):
            return output.last_hidden_state.pow(2).mean()

        return model.train(), inputs, loss_fn
    if name == "slmfast":
        from slmfast.models import CausalLM, LlamaConfig

        config = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                             num_layers=layers, num_heads=hidden // 64, num_kv_heads=hidden // 128 or 1,
                             max_position=seq)
        model = CausalLM(config)
        ids = torch.randint(0, config.vocab_size, (batch, seq))   # (B, T)
        return model.train(), dict(input_ids=ids, labels=ids), None
    raise ValueError(f"--models: unknown model {name!r} (hf-llama, slmfast)")


def measure_child(args) -> dict:
    """In a fresh process: apply the policies, then the step's real peak and time."""
    model, inputs, loss_fn = build(args.model, args.batch, args.seq, args.quick)
    policies = json.loads(args.policies)
    rc.apply(model, policies if isinstance(policies, list) else str(policies))
    predicted = rc.report(model, inputs, loss_fn=loss_fn).step_peak_bytes
    loss_of = loss_fn or rc.measure.default_loss

    def step():
        loss_of(rc.measure.run_model(model, inputs)).backward()

    peak, first = step_peak_rss(step, model)
    times = [first]
    for _ in range(args.reps - 1):
        model.zero_grad(set_to_none=False)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return dict(predicted=predicted, measured=peak, seconds=sorted(times)[len(times) // 2])


def plan_child(args) -> dict:
    """In a fresh process: the planner's plans for every budget, from one measurement."""
    model, inputs, loss_fn = build(args.model, args.batch, args.seq, args.quick)
    budgets = [rc.MemoryBudget(f) for f in args.budgets]
    found = rc.plans(model, budgets, inputs, loss_fn=loss_fn)
    return {str(f): ({"error": str(p)} if isinstance(p, ValueError) else
                     {"policies": p.policies, "budget": p.budget, "predicted": p.predicted_bytes,
                      "phase": p.predicted_phase, "none": p.none_bytes, "cost": p.predicted_cost})
            for f, p in zip(args.budgets, found)}


def run_child(args, mode: str, policies=None) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--model", args.model, "--batch", str(args.batch),
               "--seq", str(args.seq), "--reps", str(args.reps), "--budgets", *map(str, args.budgets)]
    if policies is not None:
        command += ["--policies", json.dumps(policies)]
    if args.quick:
        command.append("--quick")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {mode} {policies} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_model(args) -> list[dict]:
    uniform = {p: run_child(args, "measure", p) for p in UNIFORM}
    plans = run_child(args, "plan")
    rows = [_row(args.model, policy, policy, m["predicted"], m) for policy, m in uniform.items()]
    for fraction in args.budgets:
        p = plans[str(fraction)]
        if "error" in p:
            rows.append({"model": args.model, "budget": f"{fraction:.1f}",
                         "plan": "infeasible: " + p["error"]})
            continue
        m = run_child(args, "measure", p["policies"])
        fitting = [u for u in UNIFORM if uniform[u]["measured"] <= p["budget"]]
        cheapest = min((uniform[u]["seconds"] for u in fitting), default=None)
        row = _row(args.model, f"{fraction:.1f} = {p['budget'] / MIB:.0f} MiB", _short(p["policies"]),
                   p["predicted"], m)
        row["measured/budget"] = f"{m['measured'] / p['budget']:.3f}"
        row["time vs uniform"] = "no uniform fits" if cheapest is None else f"{m['seconds'] / cheapest:.2f}"
        rows.append(row)
    return rows


def _row(model: str, budget: str, plan: str, predicted: int, measured: dict) -> dict:
    return {"model": model, "budget": budget, "plan": plan, "predicted MiB": f"{predicted / MIB:.0f}",
            "measured MiB": f"{measured['measured'] / MIB:.0f}",
            "pred. error": f"{predicted / measured['measured'] - 1:+.1%}",
            "step s": f"{measured['seconds']:.2f}"}


def _short(policies: list[str]) -> str:
    return "".join({"none": "n", "selective": "s", "full": "f"}[p] for p in policies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["hf-llama", "slmfast"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 layers x 128, for a smoke test")
    parser.add_argument("--child", choices=("measure", "plan"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--policies", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = measure_child(args) if args.child == "measure" else plan_child(args)
        print(json.dumps(result))
        return
    rows = []
    for name in args.models:
        args.model = name
        rows += bench_model(args)
    print(environment("cpu"))
    print(f"batch {args.batch} x seq {args.seq}; plan letters: n none, s selective, f full (block 0 first)")
    print_table(rows, ["model", "budget", "plan", "predicted MiB", "measured MiB", "measured/budget",
                       "pred. error", "step s", "time vs uniform"])


if __name__ == "__main__":
    main()
