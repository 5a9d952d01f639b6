"""The GPU dispatch table: which implementation runs each kind of call on a CUDA GPU.

A call on CUDA tensors runs one of slmfast's kernels only where the last GPU run recorded in the
repo showed that kernel correct (its tests passed on that run) and at least as fast as torch's
own fused path for that kind of call; everywhere else it runs torch's own ("native"): SDPA or
varlen_attn for attention, F.rms_norm / F.layer_norm for the norms, and the plain-PyTorch
reference backend for the other ops. The table is slmfast/gpu_dispatch.json, written by
benchmarks/gpu_dispatch.py from the results of benchmarks/gpu_check.sh; `slmfast info` prints it.

A kind of call is the op and a few keys, all of which a row must match exactly:
    dtype     "bfloat16", "float16", "float32", "float64"
    grad      whether gradients are needed (fwd+bwd time decides, else fwd time)
    attention only: head_dim (bucket: 64, 128 or 256), layout ("dense", "packed", "window"),
              causal
A row holds `ranking`: the implementations whose tests passed, fastest first, "native" among them
unless torch's own path failed its tests; the choice is the first one available here (the fixed
order cuda > triton > cpu > torch when none is). No row, no table, or a GPU whose compute
capability differs from the measured card's: "native" (nothing measured, so torch's own).

backend= and SLMFAST_BACKEND still force a backend: the table only drives the automatic choice
(backends._automatic, for calls that come through select() below with their kind).
SLMFAST_GPU_TABLE=path reads another table (tests use a fake one).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from slmfast import backends

TABLE_PATH = Path(__file__).with_name("gpu_dispatch.json")
ENV_TABLE = "SLMFAST_GPU_TABLE"
CHOICES = ("cuda", "triton", "native")
KIND_KEYS = ("dtype", "grad", "head_dim", "layout", "causal")
HEAD_DIM_BUCKETS = (64, 128, 256)


def head_dim_bucket(head_dim: int) -> int:
    """The attention head-dim bucket a head dim is measured under: the smallest of 64/128/256
    that holds it (a D=80 call goes with the D=128 measurement)."""
    for bucket in HEAD_DIM_BUCKETS:
        if head_dim <= bucket:
            return bucket
    return HEAD_DIM_BUCKETS[-1]


def _value(value):
    """A kind value as it is written in the table (dtypes by name)."""
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return value


def _path() -> Path:
    return Path(os.environ.get(ENV_TABLE) or TABLE_PATH)


@functools.cache
def _load(path: str) -> dict:
    try:
        table = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {"measured": None, "rows": []}
    except (OSError, ValueError) as exc:
        backends.warn_once(f"slmfast GPU dispatch table {path} is unreadable ({exc}); every GPU call "
                           "uses torch's own path")
        return {"measured": None, "rows": []}
    table.setdefault("measured", None)
    table.setdefault("rows", [])
    return table


def load() -> dict:
    """The table: {"measured": {card, capability, torch, triton, cuda, date, commit} or None,
    "rows": [{"op", kind keys..., "ranking", "ms", "excluded"}]}."""
    return _load(str(_path()))


def reload() -> dict:
    """Forget the cached table (after writing a new one, or changing SLMFAST_GPU_TABLE)."""
    _load.cache_clear()
    _device_capability.cache_clear()
    return load()


@functools.cache
def _device_capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def _capability(index: int) -> tuple[int, int]:
    """(major, minor) of CUDA device `index` (cached; tests replace this function)."""
    return _device_capability(index)


def applies_to(device: torch.device | None, table: dict | None = None) -> bool:
    """Whether the table's measurements were taken on a card like `device` (same compute
    capability). None: no device to compare (the rows are read as they are)."""
    table = load() if table is None else table
    measured = table.get("measured")
    if not measured:
        return False
    if device is None or device.type != "cuda":
        return True
    wanted = measured.get("capability")
    if wanted is None:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return list(_capability(index)) == list(wanted)


def find_row(op: str, kind: dict, table: dict | None = None) -> dict | None:
    """The row for this op and kind (every key of the row equal to the call's), or None."""
    table = load() if table is None else table
    wanted = {key: _value(value) for key, value in kind.items()}
    for row in table["rows"]:
        if row.get("op") != op:
            continue
        keys = [key for key in KIND_KEYS if key in row]
        if all(key in wanted and wanted[key] == row[key] for key in keys):
            return row
    return None


def ranking(op: str, device: torch.device | None = None, **kind) -> list[str]:
    """The implementations for this kind of call, best first ("native" always among them)."""
    table = load()
    if not applies_to(device, table):
        return ["native"]
    row = find_row(op, kind, table)
    if row is None:
        return ["native"]
    names = [name for name in row.get("ranking", []) if name in CHOICES]
    if "native" not in names and "native" not in row.get("excluded", {}):
        names.append("native")  # torch's own stays the fallback, unless it failed its tests
    return names


def choose(op: str, device: torch.device | None = None, **kind) -> str:
    """"cuda", "triton" or "native" for this kind of call, from the table alone (whatever is
    installed here); "native" when the table has no row for it."""
    return (ranking(op, device, **kind) or ["native"])[0]


def automatic(op: str, implemented: tuple[str, ...], device: torch.device, kind: dict) -> str:
    """The automatic choice for a call on a CUDA device: the first implementation of the
    ranking that this op has and that is available here (backends._automatic calls this)."""
    for name in ranking(op, device, **kind):
        if name == "native" or (name in implemented and backends.status(name).available
                                and backends.runs_on(name, device)):
            return name
    return backends._automatic(op, implemented, device)  # torch's own failed its tests: the fixed order


def fixed_order(op: str, implemented: tuple[str, ...], device: torch.device) -> str:
    """The automatic choice without the table (cuda > triton > cpu > torch): where an op's native
    path cannot take a call (say attention with return_lse), it runs this instead."""
    return backends._automatic(op, implemented, device)


def _forced(backend: str | None, chosen: str) -> bool:
    """Whether the backend of this call was asked for (backend= or an honoured SLMFAST_BACKEND)."""
    if backend is not None and backend != "auto":
        return True
    requested = os.environ.get(backends.ENV_BACKEND, "auto") or "auto"
    return requested != "auto" and requested == chosen


# Made when torch.compile traces a call, like backends.select: the kind is static metadata.
@torch.compiler.assume_constant_result
def select(op: str, implemented: tuple[str, ...], device: torch.device, backend: str | None,
           kind: tuple, has_native: bool, table_op: str | None = None) -> str:
    """backends.select, with the dispatch table deciding the automatic choice on CUDA tensors.

    `kind` is a tuple of (key, value) pairs (see the module docstring). Returns a backend name or
    "native"; an op without a native path of its own (`has_native` False) gets "torch" (its
    plain-PyTorch reference) instead. `table_op` names the row to read when it differs from
    `op` (glu_linear reads the swiglu/geglu rows, rms_norm_linear the rms_norm ones).
    """
    name = backends.select(op, implemented, device, backend)
    if device.type == "cuda" and not _forced(backend, name):
        name = backends._automatic(table_op or op, implemented, device, dict(kind))
    if name == "native" and not has_native:
        return "torch"
    return name


def describe(table: dict | None = None) -> list[str]:
    """Lines for `slmfast info`: where the table was measured and one line per row."""
    table = load() if table is None else table
    measured = table.get("measured")
    if not measured:
        return [f"GPU dispatch table ({_path().name}): no GPU run recorded; every CUDA call uses "
                "torch's own path (native)"]
    lines = [f"GPU dispatch table ({_path().name}): measured {measured.get('date')} on "
             f"{measured.get('card')} (sm_{''.join(map(str, measured.get('capability') or []))}), "
             f"torch {measured.get('torch')}, triton {measured.get('triton')}, "
             f"commit {measured.get('commit')}"]
    if torch.cuda.is_available() and not applies_to(torch.device("cuda"), table):
        lines.append("  (this GPU's compute capability differs: every CUDA call uses native here)")
    for row in table["rows"]:
        kind = " ".join(f"{key}={row[key]}" for key in KIND_KEYS if key in row)
        times = ", ".join(f"{name} {ms:.3f}" for name, ms in row.get("ms", {}).items())
        excluded = "; ".join(f"{name}: {why}" for name, why in row.get("excluded", {}).items())
        first = (row.get("ranking") or ["(fixed order)"])[0]
        lines.append(f"  {row['op']:<22} {kind:<62} -> {first:<7} ms: {times}"
                     + (f"  (excluded {excluded})" if excluded else ""))
    return lines
