"""The trainer's command-line commands, plugged into slmfast/cli.py:

  slmfast demo [--quick | --size S] [--out DIR] [--device D]
  slmfast pretrain [--config run.toml] [--key value | --section.key value ...]
  slmfast distill  [--config run.toml] [--key value ...]
  slmfast distill cache-teacher [--config run.toml] [--out DIR] [--key value ...]
      (--loss.cache_kind sampled --loss.samples N: N draws per position instead of the top k)
  slmfast checkpoint verify DIR        DIR: one checkpoint, a run directory, or its checkpoints/

Configuration errors print one line naming the key (and the nearest valid key for a typo) and
exit with status 2; data/teacher/cache mismatches, and a resume that finds no intact checkpoint,
exit with status 1. SLMFAST_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from slmfast.distill.config import ConfigError, DistillConfig


def _fail(error: Exception, code: int) -> int:
    if os.environ.get("SLMFAST_DEBUG") == "1":
        raise error
    print(f"error: {error}", file=sys.stderr)
    return code


def _guarded(fn):
    def run(args):
        try:
            return fn(args)
        except ConfigError as e:
            return _fail(e, 2)
        except (ValueError, FileNotFoundError) as e:
            return _fail(e, 1)
    return run


def _load(args, mode: str) -> DistillConfig:
    config = DistillConfig.from_args(args.config, args.overrides)
    config.validate(mode)
    return config


@_guarded
def cmd_pretrain(args) -> int:
    from slmfast.distill.trainer import train

    config = _load(args, "pretrain")
    if args.print_config:
        print(config.to_toml(), end="")
        return 0
    result = train(config, "pretrain")
    return 0 if result.status in ("completed", "max_tokens", "interrupted") else 3


@_guarded
def cmd_distill(args) -> int:
    if args.overrides and args.overrides[0] == "cache-teacher":
        args.overrides = args.overrides[1:]
        return _cache_teacher(args)
    from slmfast.distill.trainer import train

    config = _load(args, "distill")
    if args.print_config:
        print(config.to_toml(), end="")
        return 0
    result = train(config, "distill")
    return 0 if result.status in ("completed", "max_tokens", "interrupted") else 3


def _cache_teacher(args) -> int:
    out = None
    if "--out" in args.overrides:
        i = args.overrides.index("--out")
        if i + 1 >= len(args.overrides):
            raise ConfigError("--out needs a directory")
        out = args.overrides[i + 1]
        args.overrides = args.overrides[:i] + args.overrides[i + 2:]
    config = _load(args, "cache")
    if args.print_config:
        print(config.to_toml(), end="")
        return 0
    cache_teacher(config, out)
    return 0


def cache_teacher(config: DistillConfig, out: str | None = None) -> Path:
    """Run the teacher once over the train sequences the configured run will visit; write the cache
    to `out` (default: teacher.cache, else <out_dir>/teacher-cache)."""
    from slmfast.distill.cache import build_cache
    from slmfast.distill.data import TokenData, Windows, WindowSampler, prepare_data
    from slmfast.distill.distributed import resolve_device
    from slmfast.distill.setup import resolve_tokenizer
    from slmfast.distill.teacher import check_tokenizer, load_teacher

    config.validate("cache")
    dc, tr = config.data, config.train
    out = Path(out or config.teacher.cache or Path(config.out_dir) / "teacher-cache")
    data = TokenData(prepare_data(dc.source, dc.cache_dir or Path(config.out_dir) / "data",
                                  tokenizer_path=resolve_tokenizer(config), vocab_size=dc.vocab_size,
                                  val_fraction=dc.val_fraction, max_documents=dc.max_documents,
                                  text_field=dc.text_field, hf_split=dc.hf_split, pattern=dc.glob))
    device = resolve_device(config.device if config.teacher.device == "auto" else config.teacher.device)
    teacher = load_teacher(config.teacher.path, device=device, dtype_name=config.teacher.dtype)
    tokenizer = data.tokenizer()
    print("teacher: " + check_tokenizer(config.teacher.path, tokenizer, data.vocab_size, teacher.vocab_size,
                                        config.teacher.allow_unverified_tokenizer))
    windows = Windows(data.splits["train"], dc.seq_len, dc.pack)
    sampler = WindowSampler(windows.count, config.seed)
    needed = sampler.take(0, tr.steps * tr.batch_size * tr.grad_accum)
    lo = config.loss
    return build_cache(out, teacher=teacher, data=data, seq_len=dc.seq_len, pack=dc.pack, window_ids=needed,
                       k=lo.topk, batch_windows=max(1, tr.batch_size), progress=tr.progress,
                       tokenizer_json=tokenizer.to_str(), kind=lo.cache_kind, samples=lo.samples,
                       temperature=lo.temperature, sample_seed=lo.sample_seed)


def _reexec_with_passive_openmp() -> None:
    """OpenMP threads that spin while waiting (libgomp's default) collapse when the cores are shared:
    measured on the 2-core dev machine under load, a demo teacher step ran at 266 tokens/s with 2
    spinning threads, 1,123 with OMP_WAIT_POLICY=PASSIVE and 1,314 with one thread. The policy is
    read when the OpenMP runtime loads (with torch), so the command line re-executes itself once
    with it set, unless the user set it."""
    if "OMP_WAIT_POLICY" in os.environ or sys.argv[1:2] != ["demo"] or not hasattr(os, "execve"):
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    os.execve(sys.executable, [sys.executable, "-m", "slmfast", *sys.argv[1:]], env)


@_guarded
def cmd_demo(args) -> int:
    from slmfast.distill.demo import run_demo

    _reexec_with_passive_openmp()
    if args.overrides:
        raise ConfigError(f"demo: unrecognized arguments {' '.join(args.overrides)} "
                          "(options: --quick, --size, --out, --device, --threads, --no-progress, "
                          "--no-samples)")
    size = "quick" if args.quick else args.size
    out = args.out or ("runs/demo" if size == "default" else f"runs/demo-{size}")
    run_demo(out, size=size, device=args.device, progress=not args.no_progress, samples=not args.no_samples,
             threads=args.threads)
    return 0


def cmd_checkpoint_verify(args) -> int:
    """One line per checkpoint; status 1 if any is damaged, 2 if DIR holds no checkpoint."""
    from slmfast.distill.checkpoint import find_checkpoints, verify_checkpoint

    found = find_checkpoints(args.dir)
    if not found:
        print(f"error: no checkpoint in {args.dir} (expected a step-XXXXXXXX directory, a run directory "
              "with checkpoints/, or a directory of step-* checkpoints)", file=sys.stderr)
        return 2
    verdicts = [verify_checkpoint(path) for path in found]
    for verdict in verdicts:
        print(f"{verdict.path}: {verdict.describe()}")
    return 0 if all(v.ok for v in verdicts) else 1


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register demo, pretrain, distill and checkpoint on the top-level `slmfast` parser."""
    from slmfast.distill.demo import SIZES

    demo = sub.add_parser("demo", allow_abbrev=False,
                          help="distillation demo on the Python stdlib: teacher, student + KD, student alone")
    demo.add_argument("--quick", action="store_true", help="the CI size (under 2 minutes on 2 CPU cores)")
    demo.add_argument("--size", default="default", choices=list(SIZES),
                      help="default: under 10 minutes on 2 CPU cores; medium/large: for a GPU")
    demo.add_argument("--out", default=None, help="run directory (default runs/demo[-SIZE])")
    demo.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    demo.add_argument("--threads", type=int, default=0,
                      help="torch CPU threads (0: torch's default; 1 is fastest when the cores are shared)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--no-samples", action="store_true", help="skip the sampled continuations")
    demo.set_defaults(func=cmd_demo, accepts_overrides=True)
    for name, fn, text in (("pretrain", cmd_pretrain, "train a model with plain cross-entropy (no teacher)"),
                           ("distill", cmd_distill, "distill a student from a teacher; `distill "
                                                    "cache-teacher` writes the offline teacher cache "
                                                    "(top-k, or --loss.cache_kind sampled)")):
        p = sub.add_parser(name, allow_abbrev=False, help=text,
                           description=text + ". Every config key can be given as --key value or "
                                              "--section.key value (see --print-config).")
        p.add_argument("--config", default=None, help="TOML config file")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved config as TOML and exit")
        p.set_defaults(func=fn, accepts_overrides=True)
    checkpoint = sub.add_parser("checkpoint", help="inspect training checkpoints")
    actions = checkpoint.add_subparsers(dest="action", required=True)
    verify = actions.add_parser("verify", help="check that checkpoints are intact (files, sizes, sha256, "
                                               "headers); exit 1 if any is damaged")
    verify.add_argument("dir", help="one checkpoint (step-XXXXXXXX), a run directory, or its checkpoints/")
    verify.set_defaults(func=cmd_checkpoint_verify)
