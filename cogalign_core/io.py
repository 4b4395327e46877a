"""Atomic, content-addressed file writing.

Every artifact is written to a temporary sibling and renamed into place, so a killed stage never
leaves a half-written file: readers see the old file or the new one, never a prefix.

Temporary names carry their owner: ``.cogalign-tmp-<pid>-<host>-<random>`` (``host`` is a short
digest of the host name). :func:`remove_stale_temps` removes only temps whose owner process is gone,
so a cleanup never deletes another live writer's work in progress (a copy being registered, a
stage writing its outputs).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".cogalign-tmp-"
# PNGs the pipeline encodes itself (converted raw images, counterfactuals): zlib level 1 encodes ~3x
# faster than PIL's default 6 for files ~10 % larger; the pixels are the same either way.
PNG_COMPRESS_LEVEL = 1
_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_OWNED_TEMP = re.compile(re.escape(TMP_PREFIX) + r"(\d+)-([0-9a-f]{8})-")


def temp_prefix() -> str:
    """Prefix of this process's temporary names: ``.cogalign-tmp-<pid>-<host>-`` (the owner, for cleanup)."""
    return f"{TMP_PREFIX}{os.getpid()}-{_HOST_TAG}-"


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
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), suffix=final.suffix, dir=final.parent)
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

    Used for multi-file artifacts (a saved model, a stage's output folder): the directory appears
    complete or not at all. An existing ``path`` is swapped out in one step where the kernel can
    exchange two names (Linux ``renameat2``), else moved aside just before the new one moves in.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the published folder from other users
        if not final.exists():
            os.replace(tmp, final)
        elif _exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the old content
        else:
            aside = Path(tempfile.mkdtemp(prefix=f"{temp_prefix()}old-", dir=final.parent)) / final.name
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside.parent, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_update(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a staging copy of folder ``path`` that replaces it as a whole on success (:func:`atomic_dir`).

    The copy is made of hard links (a plain copy where links are impossible), so an incremental
    stage keeps and reuses its earlier files at the cost of a link each, while readers of ``path``
    see the previous output, whole, until the swap. Writers must replace files (``atomic_*``,
    content-addressed stores), never modify one in place: a hard link shares its content.
    """
    final = Path(path)
    with atomic_dir(final) as staging:
        if final.is_dir():
            _link_tree(final, staging)
        yield staging


def staged_path(workspace: Path, staging: Path, folder: str | os.PathLike[str], published: str) -> str:
    """Where ``published`` (a workspace-relative path under ``folder``) lies inside ``staging``, the
    staging copy of ``folder``, as a workspace-relative path (for :func:`prune_unreferenced`)."""
    return (staging / Path(published).relative_to(folder)).relative_to(workspace).as_posix()


def _link_tree(src: Path, dst: Path) -> None:
    """Recreate ``src``'s folders under ``dst`` and hard-link its files there (temps left out)."""
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = [d for d in dirnames if not d.startswith(TMP_PREFIX)]
        target = dst / Path(dirpath).relative_to(src)
        target.mkdir(exist_ok=True)
        for name in filenames:
            if name.startswith(TMP_PREFIX):
                continue
            try:
                os.link(Path(dirpath) / name, target / name)
            except OSError:  # another file system, or a link limit: copy instead
                shutil.copy2(Path(dirpath) / name, target / name)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


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


def _process_alive(pid: int) -> bool:
    """True while ``pid`` runs on this host (a zombie, killed but not yet reaped, counts as gone)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    return stat[stat.rindex(")") + 2:][:1] not in ("Z", "X")


def temp_owner_alive(path: str | os.PathLike[str]) -> bool:
    """Whether the process that named temp ``path`` may still be writing it.

    Temps of another host cannot be judged here and count as alive; names without an owner
    (written before owners were recorded) count as dead.
    """
    m = _OWNED_TEMP.match(Path(path).name)
    if m is None:
        return False
    if m.group(2) != _HOST_TAG:
        return True
    return _process_alive(int(m.group(1)))


def remove_stale_temps(root: str | os.PathLike[str]) -> list[Path]:
    """Delete temp files/dirs under ``root`` whose owner process is gone; return what was removed.

    A temp of a live process (another command's copy in progress, a running stage) is left alone.
    """
    removed: list[Path] = []
    base = Path(root)
    if not base.exists():
        return removed
    gone: set[Path] = set()
    for p in sorted(base.rglob(f"{TMP_PREFIX}*"), key=lambda p: len(p.parts)):  # outermost first
        if any(q in gone for q in p.parents) or temp_owner_alive(p):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            gone.add(p)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
