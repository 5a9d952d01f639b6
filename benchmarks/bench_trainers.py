"""slmfast inside the trainers people already use: tokens/s and peak memory, with and without it.

Three pairs, each trained for a few steps by the trainer itself (its data loader, optimizer,
gradient clipping, scheduler), on the same model config, the same data and the same seed:

  hf-pretrain   transformers.Trainer pretraining a LlamaForCausalLM (the causal-LM loss).
                own: the model as transformers builds it (SDPA attention, logits + cross-entropy);
                slmfast: the same model after `slmfast.integrations.hf.patch(model)` (slmfast's
                attention, norms, gated MLP and RoPE, and the loss from hidden states without logits).
  hf-distill    transformers.Trainer distilling a frozen teacher into the student,
                T^2 * KL(teacher || student) at temperature T + alpha * CE, over the target tokens.
                own: `LogitDistillationTrainer` below, the recipe users write: both models to full
                logits, log_softmax in float32, F.kl_div and F.cross_entropy;
                slmfast: `slmfast.integrations.hf.DistillationTrainer` (loss="forward_kl", the same T
                and alpha), which computes the same loss from both models' hidden states with the
                fused distillation loss (neither model's logits exist).
  trl-distill   TRL's DistillationTrainer (on-policy: the student generates the completions every
                step, the teacher scores them, the loss is TRL's generalized JSD with its beta).
                own: TRL as shipped (DistillationConfig's defaults, gradient checkpointing included);
                slmfast: the same after `slmfast.integrations.trl.patch()` (the loss on slmfast's
                fused kernels). Every completion is generated to full length (min_new_tokens), so both
                sides train on the same number of tokens.

Each pair runs in float32 and under bf16 autocast (TrainingArguments(bf16=True) on the CPU:
float32 weights, bfloat16 matmuls). The student is a Llama of 6 layers x 384 (6 heads, 2 KV heads,
intermediate 1024, vocabulary 32000, tied embeddings: 21.7M parameters, 12.3M of them the
embedding), the teacher the same twice as deep (12 layers, 31.2M). --quick: a tiny model and 2 steps.

Method. Every variant runs in a fresh child process (`--child PAIR/SIDE/DTYPE`) that imports the
same libraries for both sides of a pair and loads slmfast's kernels. Memory: once the trainer has
built the models and the optimizer (its on_train_begin callback) the child resets its peak resident
set size (VmHWM, via /proc/self/clear_refs) and notes its RSS; "above models" is the peak over the
whole run minus that RSS: gradients, AdamW's state, activations, logits and the loss's temporaries
(and, for TRL, generation). Time: the wall time between the trainer's on_step_begin and on_step_end
callbacks (forward, backward, clipping, optimizer step; for TRL also the generation, which is
timed on its own too); tokens/s = tokens per step / the median step time over the steps after the
warm-up. Tokens per step: batch x sequence length the student trains on (for TRL the prompt and
the completion). The losses are the ones the trainer's training_step returns; the first step's
loss of both sides (same weights, same batch) must agree within FIRST_LOSS_RTOL, and the run exits
with status 1 when one does not or a child fails.

Threads: one per child by default (--threads). The development machine's 2 cores are shared with
other jobs, and with 2 OpenMP threads on oversubscribed cores every small matmul waits for a
descheduled thread at its barrier: one TRL generation of 16 tokens took 35 s with 2 threads and
1.1 s with 1, both while other jobs ran. On a quiet machine pass --threads 2 (or more).

    python benchmarks/bench_trainers.py [--pairs hf-pretrain hf-distill trl-distill] [--dtypes fp32 bf16]
                                        [--batch 4 --seq 256 --steps 3 --warmup 1 --threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, reset_peak_rss, status_kib  # noqa: E402

PAIRS = ("hf-pretrain", "hf-distill", "trl-distill")
SIDES = ("own", "slmfast")
DTYPES = ("fp32", "bf16")

# Model shapes and the default run; --quick swaps in the tiny one.
DEFAULT = dict(vocab=32000, hidden=384, layers=6, heads=6, kv_heads=2, intermediate=1024, teacher_layers=12,
               batch=4, seq=256, prompt=64, completion=64, steps=3, warmup=1, threads=1)
QUICK = dict(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, teacher_layers=4,
             batch=2, seq=32, prompt=8, completion=8, steps=1, warmup=1, threads=1)
TEMPERATURE, ALPHA, BETA = 2.0, 0.5, 0.5      # the distillation pairs: T, CE weight, TRL's JSD beta

# The first step's loss of the two sides (same weights, same batch) agrees within a relative
# tolerance:
#   fp32: both sides compute the same float32 quantity and differ only in the order of their sums
#         (chunked log-sum-exp over the vocabulary, fused norms, a different attention kernel). A
#         float32 sum of n terms has a typical relative error ~ sqrt(n) * 2^-24; n = 32000 (one
#         row's log-sum-exp) gives ~1e-5, and a loss that is a mean over rows does not grow it, so
#         1e-4 leaves a factor 10 (the TRL trainer test, tests/integrations/test_trl.py, uses 1e-4
#         for the same comparison).
#   bf16: under autocast each matmul output is rounded to bfloat16 (relative error up to 2^-9 =
#         2e-3), and the sides round at different points (HF's norms cast back to bf16 inputs of
#         the next matmul, the fused kernels keep float32 inside), so a logit differs by a few
#         units of 2^-9; the loss, a mean of log-sum-exp minus a logit over the rows, differs by as
#         much, not by more. 1e-2 is 5 units of 2^-9.
FIRST_LOSS_RTOL = {"fp32": 1e-4, "bf16": 1e-2}

# The targets: slmfast / own tokens/s at least SPEED, peak above models at most MEMORY.
TARGETS = {"hf-distill": dict(speed=1.5, memory=0.5), "trl-distill": dict(speed=1.5, memory=0.5),
           "hf-pretrain": dict(speed=1.2, memory=None, dtypes=("bf16",))}


# ---- models and data -----------------------------------------------------------------------

def llama(shape: dict, layers: int, seed: int, use_cache: bool = False):
    """A randomly initialized LlamaForCausalLM; use_cache only for a model that generates (TRL)."""
    import transformers

    torch.manual_seed(seed)
    positions = max(shape["seq"], shape["prompt"] + shape["completion"])
    config = transformers.LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=layers, num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=positions, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
        bos_token_id=1, use_cache=use_cache)
    return transformers.LlamaForCausalLM(config)


def token_rows(shape: dict, rows: int, seed: int = 0) -> list[dict]:
    """Random token ids as causal-LM rows (input_ids = labels, no padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, shape["vocab"], (rows, shape["seq"]), generator=g)    # (rows, T)
    return [dict(input_ids=r, attention_mask=torch.ones_like(r), labels=r.clone()) for r in ids]


def word_tokenizer(vocab: int):
    """A word-level tokenizer whose words w0, w1, ... are the ids 3.. vocab-1 (0 pad, 1 eos, 2 unk)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(vocab - 3)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", padding_side="left")


def prompt_rows(shape: dict, rows: int, seed: int = 0) -> list[dict]:
    """Prompts of exactly shape["prompt"] random words (no padding in a batch)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape["vocab"] - 3, (rows, shape["prompt"]), generator=g)   # (rows, P)
    return [{"prompt": " ".join(f"w{i}" for i in r.tolist())} for r in ids]


# ---- the trainers ----------------------------------------------------------------------------

def logit_distillation_trainer():
    """The class, built on first use (it subclasses transformers.Trainer)."""
    import torch.nn.functional as F
    import transformers

    class LogitDistillationTrainer(transformers.Trainer):
        """Distillation as it is usually written in a Trainer subclass: full logits of both models,
        sum over target tokens of T^2 * KL(teacher || student) + alpha * CE, divided by their count."""

        def __init__(self, *args, teacher, temperature: float, alpha: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher.eval().requires_grad_(False).to(self.args.device)
            self.temperature, self.alpha = temperature, alpha

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            t = self.temperature
            batch = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            logits = model(**batch).logits[:, :-1]                                   # (B, T-1, V)
            # The teacher is no model the Trainer prepared, so Accelerate's autocast (bf16=True) is not
            # around its forward: enter it here, as hf.DistillationTrainer does for both models.
            with torch.no_grad(), self.accelerator.autocast():
                teacher_logits = self.teacher(**batch).logits[:, :-1]                # (B, T-1, V)
            targets = inputs["labels"][:, 1:]                                        # (B, T-1)
            valid = targets != -100
            student = logits[valid].float()                                          # (N, V)
            log_q = F.log_softmax(student / t, dim=-1)
            log_p = F.log_softmax(teacher_logits[valid].float() / t, dim=-1)
            soft = F.kl_div(log_q, log_p, log_target=True, reduction="sum") * t * t
            hard = F.cross_entropy(student, targets[valid], reduction="sum")
            loss = (soft + self.alpha * hard) / valid.sum().clamp(min=1)
            return (loss, None) if return_outputs else loss

    return LogitDistillationTrainer


def training_args(shape: dict, dtype: str, out: str) -> dict:
    return dict(output_dir=out, max_steps=shape["warmup"] + shape["steps"],
                per_device_train_batch_size=shape["batch"], learning_rate=1e-4, logging_steps=10_000,
                report_to=[], save_strategy="no", use_cpu=True, bf16=dtype == "bf16", disable_tqdm=True,
                seed=0, dataloader_num_workers=0)


def build(pair: str, side: str, dtype: str, shape: dict, out: str):
    """(trainer, tokens per step) of one variant; the student has seed 0, the teacher seed 1."""
    import transformers

    from slmfast.integrations import hf

    rows = shape["batch"] * (shape["warmup"] + shape["steps"])
    if pair == "hf-pretrain":
        model = llama(shape, shape["layers"], seed=0)
        if side == "slmfast":
            hf.patch(model)
        args = transformers.TrainingArguments(**training_args(shape, dtype, out))
        return transformers.Trainer(model=model, args=args, train_dataset=token_rows(shape, rows)), \
            shape["batch"] * shape["seq"]
    if pair == "hf-distill":
        student, teacher = llama(shape, shape["layers"], 0), llama(shape, shape["teacher_layers"], 1)
        args = transformers.TrainingArguments(**training_args(shape, dtype, out))
        common = dict(model=student, args=args, train_dataset=token_rows(shape, rows), teacher=teacher,
                      temperature=TEMPERATURE, alpha=ALPHA)
        if side == "slmfast":
            trainer = hf.DistillationTrainer(loss="forward_kl", **common)
        else:
            trainer = logit_distillation_trainer()(**common)
        return trainer, shape["batch"] * shape["seq"]
    import trl

    from slmfast.integrations import trl as slm_trl

    if side == "slmfast":
        slm_trl.patch()
    else:
        slm_trl.unpatch()
    student = llama(shape, shape["layers"], 0, use_cache=True)          # it generates the completions
    teacher = llama(shape, shape["teacher_layers"], 1)
    kwargs = training_args(shape, dtype, out)
    kwargs.update(max_completion_length=shape["completion"], beta=BETA, temperature=TEMPERATURE,
                  generation_kwargs={"min_new_tokens": shape["completion"]})
    args = trl.DistillationConfig(**kwargs)
    trainer = trl.DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                      train_dataset=prompt_rows(shape, rows),
                                      processing_class=word_tokenizer(shape["vocab"]))
    return trainer, shape["batch"] * (shape["prompt"] + shape["completion"])


# ---- the child: one variant, one process -------------------------------------------------

def child(variant: str, shape: dict) -> None:
    import transformers

    from slmfast import backends

    pair, side, dtype = variant.split("/")
    torch.set_num_threads(shape["threads"])
    backends.extension()                               # the kernels' code is resident on both sides
    steps, losses, generation, memory = [], [], [], {}

    class Probe(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            reset_peak_rss()                           # the models and the optimizer exist now
            memory["base_kib"] = status_kib("VmRSS")

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        trainer, tokens = build(pair, side, dtype, shape, out)
        trainer.add_callback(Probe())
        training_step = trainer.training_step

        def record_loss(*args, **kwargs):
            loss = training_step(*args, **kwargs)
            losses.append(float(loss))
            return loss

        trainer.training_step = record_loss
        if pair == "trl-distill":
            generate = trainer._generate

            def timed_generate(*args, **kwargs):
                t0 = time.perf_counter()
                result = generate(*args, **kwargs)
                generation.append(time.perf_counter() - t0)
                return result

            trainer._generate = timed_generate
        trainer.train()
        peak_kib = status_kib("VmHWM")
    timed = steps[shape["warmup"]:]
    step_s = statistics.median(timed)
    result = dict(variant=variant, tokens_per_step=tokens, step_s=step_s, tokens_s=tokens / step_s,
                  steps_s=steps, first_loss=losses[0], final_loss=losses[-1], losses=losses,
                  base_mib=memory["base_kib"] / 1024, peak_mib=peak_kib / 1024,
                  above_mib=(peak_kib - memory["base_kib"]) / 1024)
    if generation:
        gen_s = statistics.median(generation[shape["warmup"]:])
        result.update(generation_s=gen_s, tokens_s_without_generation=tokens / (step_s - gen_s))
    print(json.dumps(result))


# ---- the parent: the table ---------------------------------------------------------------------

def run_variant(variant: str, shape: dict, shape_args: list[str]) -> tuple[dict | None, str]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(shape["threads"])}
    out = subprocess.run([sys.executable, __file__, "--child", variant, *shape_args], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        return None, (out.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(out.stdout.strip().splitlines()[-1]), ""


def verdict(pair: str, dtype: str, speed: float, memory: float) -> str:
    target = TARGETS[pair]
    if dtype not in target.get("dtypes", DTYPES):
        return "-"
    parts = [f"speed >= {target['speed']}: {'met' if speed >= target['speed'] else 'missed'}"]
    if target["memory"] is not None:
        parts.append(f"memory <= {target['memory']}: {'met' if memory <= target['memory'] else 'missed'}")
    return "; ".join(parts)


def fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def describe(shape: dict) -> str:
    """The run's shapes in one line, with the part of every 'above models' figure that both sides
    share: the student's float32 gradients and AdamW's two moments (3 x its parameter bytes)."""
    h, kv_width = shape["hidden"], shape["hidden"] // shape["heads"] * shape["kv_heads"]
    per_layer = 2 * h * h + 2 * h * kv_width + 3 * h * shape["intermediate"]
    student = shape["vocab"] * h + shape["layers"] * per_layer
    return (f"student {shape['layers']} x {h} (heads {shape['heads']}/{shape['kv_heads']}, intermediate "
            f"{shape['intermediate']}, {student / 1e6:.1f}M parameters), teacher {shape['teacher_layers']} "
            f"layers, vocab {shape['vocab']}, tied embeddings; batch {shape['batch']} x seq {shape['seq']} "
            f"(TRL: prompt {shape['prompt']} + completion {shape['completion']}); {shape['warmup']} warm-up "
            f"+ {shape['steps']} timed steps; T={TEMPERATURE}, alpha={ALPHA}, TRL beta={BETA}; grads + AdamW "
            f"state of the student: {3 * 4 * student / 2 ** 20:,.0f} MiB of every 'above models' figure")


def table_row(pair: str, dtype: str, side: str, r: dict, own: dict | None) -> tuple[str, bool]:
    """One markdown row, and whether its numbers are finite and (slmfast) its first loss agrees."""
    ok = all(math.isfinite(r[k]) for k in ("tokens_s", "above_mib", "first_loss", "final_loss"))
    speed = memory = agree = target = "-"
    if side == "slmfast" and own is not None:
        s, m = r["tokens_s"] / own["tokens_s"], r["above_mib"] / own["above_mib"]
        rel = abs(r["first_loss"] - own["first_loss"]) / abs(own["first_loss"])
        close = rel <= FIRST_LOSS_RTOL[dtype]
        ok &= close
        speed, memory = f"{s:.2f}", f"{m:.2f}"
        agree = f"{'yes' if close else 'NO'} (rel {rel:.1e} <= {FIRST_LOSS_RTOL[dtype]:.0e})"
        target = verdict(pair, dtype, s, m)
    without = fmt(r["tokens_s_without_generation"]) if "generation_s" in r else "-"
    cells = [pair, dtype, side, fmt(r["tokens_s"]), without, fmt(r["above_mib"]), f"{r['first_loss']:.6f}",
             f"{r['final_loss']:.6f}", speed, memory, agree, target]
    return "| " + " | ".join(cells) + " |", ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS))
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--quick", action="store_true", help="a tiny model and 2 steps (a smoke test)")
    for name, value in DEFAULT.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"default {value} (--quick: {QUICK[name]})")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    shape = dict(QUICK if a.quick else DEFAULT)
    for name in DEFAULT:
        value = getattr(a, name)
        if value is not None:
            if value < (0 if name == "warmup" else 1):
                raise SystemExit(f"bench_trainers: --{name.replace('_', '-')} must be positive, got {value}")
            shape[name] = value
    if a.child:
        child(a.child, shape)
        return
    shape_args = [arg for name in DEFAULT for arg in (f"--{name.replace('_', '-')}", str(shape[name]))]
    torch.set_num_threads(shape["threads"])           # what the children run with, for the environment line
    print(environment("cpu"))
    print(describe(shape))
    print("| pair | dtype | variant | tokens/s | tokens/s w/o generation | peak above models MiB | "
          "first-step loss | final loss | speed x | memory x | first losses agree | target |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    failed = False
    for pair in a.pairs:
        for dtype in a.dtypes:
            rows = {}
            for side in SIDES:
                rows[side], error = run_variant(f"{pair}/{side}/{dtype}", shape, shape_args)
                if rows[side] is None:
                    failed = True
                    print(f"| {pair} | {dtype} | {side} | failed: {error} |")
            for side, r in rows.items():
                if r is not None:
                    line, ok = table_row(pair, dtype, side, r, rows["own"])
                    failed |= not ok
                    print(line, flush=True)
    print("speed x = slmfast tokens/s / own tokens/s (> 1 is faster); memory x = slmfast / own peak RSS "
          "above the models (< 1 is less); one child process per row")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
