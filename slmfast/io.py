"""Atomic file and directory writes, used by every save in slmfast (models, checkpoints, caches).

A reader never sees a half-written result: content goes to a temporary sibling, is flushed to
disk (fsync), and is renamed into place, which POSIX makes atomic. Replacing an existing
directory renames the old one aside first and deletes it only after the new one is in place, so
a crash at any point leaves either the old or the new directory complete (plus, at worst, a
leftover `.tmp-*`/`.old-*` sibling that the next write removes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path


def fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_leftovers(target: Path) -> None:
    """Remove temporary siblings of `target` left by an interrupted write."""
    for sibling in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(sibling, ignore_errors=True)
    for sibling in target.parent.glob(f".{target.name}.old-*"):
        shutil.rmtree(sibling, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str | Path):
    """Yield a temporary directory; on success it replaces `target` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
