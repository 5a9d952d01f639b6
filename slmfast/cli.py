"""The one command line: `python -m slmfast <command>` (also installed as `slmfast`).

Commands: info (versions, build, backends and the GPU dispatch table); demo, pretrain, distill,
checkpoint verify (slmfast/distill/commands.py); memory (slmfast/recompute/command.py). Each
command is a small function that parses its own arguments. Commands that take config overrides
(`--section.key value`) receive the arguments argparse does not know in `args.overrides`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from slmfast import backends, gpu_table
from slmfast._version import __version__


def _cpu_capabilities() -> dict:
    """The CPU kernels' vector ISAs (backends.cpu_capabilities), or the error that choosing one
    raised (SLMFAST_CPU_CAPABILITY asking for one this CPU lacks)."""
    try:
        return backends.cpu_capabilities()
    except RuntimeError as exc:
        return {"error": str(exc)}


def info_dict() -> dict:
    return {
        "version": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton": backends.triton_version(),
        "build": backends.build_info(),
        "cpu": _cpu_capabilities(),
        "backends": {s.name: {"available": s.available, "reason": s.reason}
                     for s in backends.all_status()},
        "gpu_dispatch": gpu_table.load(),
    }


def cmd_info(args: argparse.Namespace) -> int:
    info = info_dict()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"slmfast {info['version']}  (python {info['python']}, torch {info['torch']}, "
          f"CUDA {info['cuda'] or 'none'}, triton {info['triton'] or 'not installed'})")
    if info["gpu"]:
        print(f"GPU: {info['gpu']}")
    build = info["build"]
    if build:
        print("build: " + ", ".join(f"{k}={v}" for k, v in build.items()))
    else:
        print("build: slmfast._C is not built")
    cpu = info["cpu"]
    if "error" in cpu:
        print(f"cpu kernels: {cpu['error']}")
    elif cpu["compiled"]:
        print(f"cpu kernels: {cpu['chosen']} (compiled: {', '.join(cpu['compiled'])}; this CPU supports: "
              f"{', '.join(cpu['supported'])}; cap with SLMFAST_CPU_CAPABILITY)")
    print(f"\n{'backend':<8} {'available':<10} reason")
    for name, state in info["backends"].items():
        print(f"{name:<8} {'yes' if state['available'] else 'no':<10} {state['reason']}")
    print()
    for line in gpu_table.describe(info["gpu_dispatch"]):
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slmfast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, build info and available backends")
    info.add_argument("--json", action="store_true", help="print the same as JSON")
    info.set_defaults(func=cmd_info)
    from slmfast.distill.commands import add_commands
    from slmfast.recompute.command import add_command as add_memory_command
    add_commands(sub)
    add_memory_command(sub)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
