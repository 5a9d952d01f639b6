"""Distillation training step: slmfast against the same step written in plain PyTorch.

One step = teacher forward (no grad) + student forward + loss + backward + AdamW step, on the
same token batch, with a teacher and a student of the same shapes in both variants:
  slmfast  slmfast.models.CausalLM teacher and student (fused norms, attention, SwiGLU), the loss
           on hidden states with slmfast.functional.distill_loss (chunked: no logits tensor)
  plain    transformers' LlamaForCausalLM teacher and student (SDPA attention), full logits of
           both, KL(teacher || student) at temperature T via log_softmax in float32, * T^2, plus
           alpha * cross-entropy: how a distillation step is usually written
Loss: forward KL, T = 2, alpha = 0.5, fp32 (the CPU default of the trainer).

Peak memory on the CPU is the peak resident set size of a fresh child process per variant
(VmHWM), and the part above the RSS after the models are built ("above models": activations,
logits, gradients and optimizer state, the analogue of a GPU's max_memory_allocated minus the
weights). Time: median of --reps steps after a warm-up step.

    python benchmarks/bench_distill.py [--batch 8] [--seq 512] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, print_table, status_kib  # noqa: E402

VOCAB = 8192
TEACHER = dict(hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6, num_kv_heads=2)
STUDENT = dict(hidden_size=192, intermediate_size=512, num_layers=2, num_heads=3, num_kv_heads=1)
TEMPERATURE, ALPHA = 2.0, 0.5


def slmfast_step_fn(ids):
    from slmfast import functional as SF
    from slmfast.models import CausalLM, LlamaConfig

    teacher = CausalLM(LlamaConfig(vocab_size=VOCAB, **TEACHER)).eval().requires_grad_(False)
    student = CausalLM(LlamaConfig(vocab_size=VOCAB, **STUDENT)).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).reshape(-1)   # (B*T,)

    def step():
        with torch.no_grad():
            teacher_hidden = teacher.hidden_states(ids).reshape(-1, TEACHER["hidden_size"])   # (N, Ht)
        hidden = student.hidden_states(ids).reshape(-1, STUDENT["hidden_size"])              # (N, Hs)
        loss = SF.distill_loss(hidden, student.output_weight, teacher_hidden, teacher.output_weight, targets,
                               kind="forward_kl", temperature=TEMPERATURE, hard_weight=ALPHA)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def plain_step_fn(ids):
    import transformers

    def llama(shape):
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=shape["hidden_size"],
                                          intermediate_size=shape["intermediate_size"],
                                          num_hidden_layers=shape["num_layers"],
                                          num_attention_heads=shape["num_heads"],
                                          num_key_value_heads=shape["num_kv_heads"], tie_word_embeddings=True,
                                          use_cache=False)
        return transformers.LlamaForCausalLM(config)

    teacher = llama(TEACHER).eval().requires_grad_(False)
    student = llama(STUDENT).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).reshape(-1)   # (B*T,)

    def step():
        with torch.no_grad():
            teacher_logits = teacher(ids).logits.reshape(-1, VOCAB)                          # (N, V)
        logits = student(ids).logits.reshape(-1, VOCAB)                                      # (N, V)
        valid = targets != -100
        student_logp = F.log_softmax(logits[valid].float() / TEMPERATURE, dim=-1)
        teacher_logp = F.log_softmax(teacher_logits[valid].float() / TEMPERATURE, dim=-1)
        soft = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean") * TEMPERATURE ** 2
        loss = soft + ALPHA * F.cross_entropy(logits.float(), targets, ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def child(variant: str, batch: int, seq: int, reps: int) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch, seq))                                               # (B, T)
    step = (slmfast_step_fn if variant == "slmfast" else plain_step_fn)(ids)
    base_kib = status_kib("VmRSS")
    step()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    peak_kib = status_kib("VmHWM")
    print(json.dumps({"variant": variant, "time_s": times[len(times) // 2], "peak_mib": peak_kib / 1024,
                      "above_models_mib": (peak_kib - base_kib) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--child", choices=("slmfast", "plain"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batch, args.seq, args.reps)
        return
    print(environment("cpu"))
    results = {}
    for variant in ("plain", "slmfast"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--batch", str(args.batch),
                              "--seq", str(args.seq), "--reps", str(args.reps)],
                             capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    tokens = args.batch * args.seq
    base = results["plain"]
    rows = [{"variant": v, "step s": f"{r['time_s']:.3f}", "tokens/s": f"{tokens / r['time_s']:.0f}",
             "speed vs plain": f"{base['time_s'] / r['time_s']:.2f}", "peak MiB": f"{r['peak_mib']:.0f}",
             "above models MiB": f"{r['above_models_mib']:.0f}",
             "above-models ratio": f"{r['above_models_mib'] / base['above_models_mib']:.2f}"}
            for v, r in results.items()]
    print(f"teacher 6 x 384, student 2 x 192, vocab {VOCAB}, batch {args.batch} x seq {args.seq}, fp32; "
          "speed vs plain > 1 is faster, ratio < 1 is less memory")
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
