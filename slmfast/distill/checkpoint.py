"""Training checkpoints: written atomically, keep-last-N, verified before a resume, loaded
without unpickling code.

A checkpoint is a directory <out_dir>/checkpoints/step-XXXXXXXX/ holding
  config.json, model.safetensors   the student, in slmfast's model format (slmfast/models/io.py),
                                   so a checkpoint is also a model directory: a teacher, or
                                   `from_pretrained`
  tokenizer.json                   the data tokenizer (optional)
  optimizer.pt                     optimizer state_dict (tensors, numbers, lists)
  rng.pt                           torch CPU (+ CUDA) generator states and Python's `random` state
  trainer_state.json               the manifest: step, tokens, data position, fault counters, run
                                   identity, and under "files" the size and sha256 of every other
                                   file, recorded at save time
It is built in a hidden temporary sibling and renamed into place (slmfast.io.atomic_directory),
so a crash or `kill -9` at any moment leaves the previous checkpoints intact and no partial
step-* directory. optimizer.pt and rng.pt are read with torch.load(weights_only=True), which
refuses anything but tensors and plain containers; weights are safetensors.

A disk can still damage a finished checkpoint (a truncated copy, a full disk during an rsync, a
file replaced by hand). `verify_checkpoint` checks one: every file present, parseable (the
safetensors header, the JSON files, the torch archives under a weights-only load that reads no
tensor data), and of the recorded size and sha256. `latest_checkpoint`, which a resume uses, skips
damaged checkpoints with a one-line warning naming the file and the reason, and raises
CheckpointError when none is intact. Checkpoints written before checksums were recorded still
verify on everything but the checksums, and the verdict says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import random
import re
import shutil
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from slmfast.io import atomic_directory
from slmfast.models.config import LlamaConfig
from slmfast.models.io import CONFIG_NAME, WEIGHTS_NAME, read_model_files, write_model_files

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
TOKENIZER_FILE = "tokenizer.json"
REQUIRED_FILES = (CONFIG_NAME, WEIGHTS_NAME, OPTIMIZER_FILE, RNG_FILE, STATE_FILE)
FILES_KEY = "files"             # the manifest's record of sizes and checksums
_HASH_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint (or every checkpoint of a run) cannot be used; the message is one line that
    names the file and the reason. The command line prints it and exits non-zero."""


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Every step-XXXXXXXX directory of a run, oldest first, intact or not (writes in progress
    and writes a crash interrupted are hidden `.step-*` siblings and never listed)."""
    return _step_dirs(checkpoint_dir(out_dir))


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def _print_warning(message: str) -> None:
    """Default `warn` of latest_checkpoint: stderr, from the first process of a distributed job only."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_rank() != 0:
        return
    print(f"warning: {message}", file=sys.stderr, flush=True)


def latest_checkpoint(out_dir: str | Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint of the run that verifies (verify_checkpoint), or None when the run has
    none. Each newer damaged one is reported through `warn` (default: one line on stderr) and
    skipped; an intact one without recorded checksums is reported too. Raises CheckpointError
    when checkpoints exist but none is intact."""
    warn = warn if warn is not None else _print_warning
    found = list_checkpoints(out_dir)
    newest_problem = None
    for path in reversed(found):
        verdict = verify_checkpoint(path)
        if verdict.ok:
            if not verdict.checksummed:
                warn(f"checkpoint {path} has no recorded checksums (written by an earlier slmfast): "
                     "its files parse, but their contents are not verified")
            return path
        newest_problem = newest_problem or f"{path.name}/{verdict.problem}"
        warn(f"checkpoint {path} is damaged ({verdict.problem}); falling back to an older one")
    if found:
        raise CheckpointError(f"no intact checkpoint in {checkpoint_dir(out_dir)}: all {len(found)} are "
                              f"damaged (newest: {newest_problem}); `slmfast checkpoint verify "
                              f"{out_dir}` lists them")
    return None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def file_record(path: Path) -> dict:
    """{"bytes": size, "sha256": hex digest} of one file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def save_checkpoint(out_dir: str | Path, step: int, *, model_state: dict[str, torch.Tensor], model_config,
                    optimizer_state: dict, trainer_state: dict, tokenizer_json: str | None = None,
                    keep_last: int = 3) -> Path:
    """Write step-XXXXXXXX atomically, then delete all but the newest `keep_last`. The manifest
    (trainer_state.json) is `trainer_state` plus the size and sha256 of every other file."""
    if FILES_KEY in trainer_state:
        raise ValueError(f"trainer_state must not hold the key {FILES_KEY!r}: the checkpoint records its "
                         "files' checksums under it")
    target = checkpoint_dir(out_dir) / f"step-{step:08d}"
    with atomic_directory(target) as tmp:
        write_model_files(tmp, model_state, model_config)
        if tokenizer_json is not None:
            (tmp / TOKENIZER_FILE).write_text(tokenizer_json)
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        torch.save(rng_state(), tmp / RNG_FILE)
        records = {p.name: file_record(p) for p in sorted(tmp.iterdir())}
        manifest = {**trainer_state, FILES_KEY: records}
        (tmp / STATE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    prune(out_dir, keep_last)
    return target


def prune(out_dir: str | Path, keep_last: int) -> None:
    found = list_checkpoints(out_dir)
    for old in found[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    # Leftovers of writes interrupted by a crash (hidden temporary siblings).
    root = checkpoint_dir(out_dir)
    for leftover in root.glob(".step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


# ---- reading and verifying ---------------------------------------------------------------------------

def _one_line(error: BaseException) -> str:
    """The part of a library's error message that says what is wrong, on one line."""
    text = str(error)
    refused = re.search(r"GLOBAL (\S+)", text)
    if isinstance(error, pickle.UnpicklingError) and refused:
        return f"holds a pickled {refused.group(1)}; nothing was run"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return first.split(". ")[0].rstrip(".")


@contextlib.contextmanager
def _reading(path: Path, failure: str):
    """Turn any failure to read or parse `path` into a one-line CheckpointError naming it:
    "<path>: <failure> (<the library's reason>)"."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as error:          # safetensors, torch, json and OS errors alike
        raise CheckpointError(f"{path}: {failure} ({_one_line(error)})") from error


def _check_zip(path: Path) -> None:
    """torch.save writes a zip archive: refuse anything else (a bare pickle is never unpickled), and
    name a truncated archive as such (zipfile reads only the directory at the end of the file)."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise CheckpointError(f"{path}: not a torch archive (torch.save writes a zip file)")
    try:
        zipfile.ZipFile(path).close()
    except zipfile.BadZipFile as error:
        raise CheckpointError(f"{path}: a damaged zip archive, truncated or overwritten ({error})") from error


def _load_torch_file(path: Path, map_location="cpu", *, mmap: bool = False):
    """torch.load with weights_only=True, which refuses any pickled object but tensors and plain
    containers without running it; with `mmap`, tensor data is mapped, not read."""
    with _reading(path, "torch.load(weights_only=True) refuses it"):
        _check_zip(path)
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def _parse_check(path: Path) -> None:
    """Parse `path` as what its name says it is, without reading tensor data."""
    if path.suffix == ".pt":
        _load_torch_file(path, mmap=True)
    elif path.name == CONFIG_NAME:
        with _reading(path, "not a valid model config"):
            LlamaConfig.load(path)
    elif path.suffix == ".json":
        with _reading(path, "not valid JSON"):
            json.loads(path.read_text())
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        with _reading(path, "its safetensors header does not parse"):
            with safe_open(str(path), framework="pt") as f:
                f.keys()


def _manifest(path: Path) -> dict:
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{state_path}: missing")
    with _reading(state_path, "the manifest is not valid JSON"):
        manifest = json.loads(state_path.read_text())
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{state_path}: not a JSON object")
    records = manifest.get(FILES_KEY)
    if records is not None and not (isinstance(records, dict) and all(
            Path(name).name == name not in ("", ".", "..") and isinstance(r, dict)
            and isinstance(r.get("bytes"), int) and isinstance(r.get("sha256"), str)
            for name, r in records.items())):
        raise CheckpointError(f"{state_path}: its {FILES_KEY!r} record is malformed")
    return manifest


@dataclass(frozen=True)
class Verdict:
    """What verify_checkpoint found: `problem` is None for an intact checkpoint, else
    "<file>: <reason>"; `checksummed` says whether sizes and sha256 were recorded and checked."""

    path: Path
    problem: str | None
    checksummed: bool

    @property
    def ok(self) -> bool:
        return self.problem is None

    def describe(self) -> str:
        if not self.ok:
            return f"bad: {self.problem}"
        if self.checksummed:
            return "ok"
        return "ok (no recorded checksums: an earlier format; its files parse, contents not checksummed)"


def verify_checkpoint(path: str | Path) -> Verdict:
    """Check one checkpoint directory without loading it: the manifest parses; every required
    file, and every file the manifest records, exists and parses (JSON, the safetensors header, the
    torch archives under a weights-only load that maps but does not read tensor data) and has the
    recorded size and sha256. Stops at the first problem."""
    path = Path(path)
    checksummed = False
    try:
        manifest = _manifest(path)
        records = manifest.get(FILES_KEY)
        checksummed = records is not None
        names = list(dict.fromkeys([*REQUIRED_FILES, *(records or {})]))
        for name in names:
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"{file}: missing")
            if name == STATE_FILE:
                continue            # parsed above; it cannot hold its own checksum
            _parse_check(file)
            if records is None:
                continue
            if name not in records:
                raise CheckpointError(f"{file}: not recorded in the manifest")
            expected = records[name]
            size = file.stat().st_size
            if size != expected["bytes"]:
                raise CheckpointError(f"{file}: {size:,} bytes, but {expected['bytes']:,} were written")
            if file_record(file)["sha256"] != expected["sha256"]:
                raise CheckpointError(f"{file}: sha256 differs from the one recorded when it was written")
    except CheckpointError as error:
        return Verdict(path, _relative(str(error), path), checksummed)
    return Verdict(path, None, checksummed)


def _relative(message: str, path: Path) -> str:
    """`.../step-00000006/model.safetensors: reason` -> `model.safetensors: reason`."""
    prefix = f"{path}/"
    return message[len(prefix):] if message.startswith(prefix) else message


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """{'model': state dict (lm_head re-tied), 'config': LlamaConfig, 'optimizer', 'rng', 'state'}.
    'state' is the trainer state as saved (without the manifest's file records). A file that is
    missing or does not parse raises CheckpointError naming it; a pickled object is never run."""
    path = Path(path)
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing ({path} is not a complete checkpoint)")
    _parse_check(path / CONFIG_NAME)
    with _reading(path / WEIGHTS_NAME, "cannot be loaded"):
        config, model = read_model_files(path)
    state = _manifest(path)
    state.pop(FILES_KEY, None)
    return {
        "model": model,
        "config": config,
        "optimizer": _load_torch_file(path / OPTIMIZER_FILE, map_location),
        "rng": _load_torch_file(path / RNG_FILE),
        "state": state,
    }


def find_checkpoints(directory: str | Path) -> list[Path]:
    """The checkpoints `slmfast checkpoint verify DIR` checks: DIR itself when it is one (it holds a
    manifest or is named step-XXXXXXXX), else those of the run DIR (DIR/checkpoints/step-*), else
    the step-* directories directly under DIR."""
    directory = Path(directory)
    if (directory / STATE_FILE).is_file() or STEP_DIR.match(directory.name):
        return [directory]
    return list_checkpoints(directory) or _step_dirs(directory)
