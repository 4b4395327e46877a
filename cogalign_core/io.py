"""Atomic, content-addressed file writing.

Every artifact is written to a temporary sibling and renamed into place, so a killed stage never
leaves a half-written file: readers see the old file or the new one, never a prefix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".cogalign-tmp-"


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    The temp file lives in the same directory so the final ``os.replace`` is atomic on POSIX.
    On any exception the temp file is removed and ``path`` is untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=final.suffix, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (deterministic bytes) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` as a whole on success.

    Used for multi-file artifacts (a saved model): the directory appears complete or not at all.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def content_addressed_path(root: str | os.PathLike[str], digest: str, suffix: str) -> Path:
    """``root/ab/abcdef....suffix`` for a hex digest: a two-level fan-out keeps directories small."""
    return Path(root) / digest[:2] / f"{digest}{suffix}"


def store_content_addressed(root: str | os.PathLike[str], data: bytes, suffix: str) -> tuple[Path, str]:
    """Store ``data`` under its SHA-256 in ``root``; return (path, digest). Idempotent."""
    digest = sha256_bytes(data)
    path = content_addressed_path(root, digest, suffix)
    if not path.exists():
        atomic_write_bytes(path, data)
    return path, digest


def prune_unreferenced(root: str | os.PathLike[str], keep: set[str], workspace: str | os.PathLike[str]) -> None:
    """Delete content-addressed files under ``root/<h2>/`` that ``keep`` (workspace-relative paths)
    does not name, and the prefix folders left empty, so a stage's outputs are exactly this run's."""
    base, ws = Path(root), Path(workspace)
    for path in base.glob("??/*"):
        if path.is_file() and path.relative_to(ws).as_posix() not in keep:
            path.unlink()
    for folder in base.glob("??"):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def remove_stale_temps(root: str | os.PathLike[str]) -> list[Path]:
    """Delete temp files/dirs left by a killed writer under ``root``; return what was removed."""
    removed: list[Path] = []
    base = Path(root)
    if not base.exists():
        return removed
    for p in sorted(base.rglob(f"{TMP_PREFIX}*"), key=lambda p: len(p.parts), reverse=True):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
