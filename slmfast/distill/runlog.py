"""Run logging: a JSONL log of every logged step and evaluation, TensorBoard events when the
tensorboard package is installed, and plain-text tables. Only rank 0 creates one.

log.jsonl rows: {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"} for training
and {"step", "tokens", "eval": {...}} for evaluations. On resume, rows past the checkpoint's step
are dropped first, so the log reads as one uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path


class RunLog:
    def __init__(self, out_dir: Path, resume_step: int | None = None, tensorboard: bool = True, log=print):
        self.path = Path(out_dir) / "log.jsonl"
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a", buffering=1)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except (ImportError, ModuleNotFoundError):
                log("log: tensorboard is not installed; writing log.jsonl only "
                    "(pip install tensorboard for events)")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        if self.writer is not None:
            step = row["step"]
            for key, value in row.items():
                if key == "eval":
                    for k, v in value.items():
                        if isinstance(v, (int, float)) and v is not None:
                            self.writer.add_scalar(f"eval/{k}", v, step)
                elif key not in ("step",) and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_log(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A plain-text table (also valid Markdown): first column left-aligned, the others right."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(row):
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)]
        return "| " + " | ".join(parts) + " |"

    sep = "|" + "|".join((":" + "-" * (w + 1)) if a == "l" else ("-" * (w + 1) + ":")
                         for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}" if suffix else f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.3g}P{unit}"


def human_bytes(n: float) -> str:
    for suffix in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {suffix}" if suffix != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
