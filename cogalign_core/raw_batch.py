"""Raw batch registration: copy a source tree into the workspace's patient-data zone, unchanged.

``register_batch`` walks SOURCE without following symbolic links, copies every regular file to
``<raw_root>/<batch_id>/files/<relative path>`` and writes ``<raw_root>/<batch_id>/batch.json``
describing the layout and everything that was *not* copied (symlinks, unreadable entries), so
the ingest stage can count them. No file is decoded here and nothing is filtered: judging files
is the ingest stage's job, where every verdict is recorded. DVC tracking is the CLI's business.

All or nothing: the copy goes to a temporary folder, is checked against the source listing (file
count and bytes, per file and in total) and only then renamed into place. Entries the source
itself refuses (permission denied, special files, symlinks, names that are not UTF-8) are recorded
for the ingest stage to quarantine; any failure once copying has started (an I/O error reading
the source, a file that changes or vanishes meanwhile, a full or read-only disk) raises
:class:`CopyFailed` and leaves nothing behind. A manifest is validated before anything is copied.

Layouts (seg, classes, manifest, collection) and their detection live in :mod:`raw_layout`.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import re
import stat
from pathlib import Path
from typing import Any

from cogalign_core import contract, taxonomy
from cogalign_core.io import atomic_dir, atomic_write_json
from cogalign_core.raw_layout import (
    LAYOUT_CHECKS,
    LAYOUT_HELP,
    LAYOUTS,
    MANIFEST_PATH_COLUMNS,
    detect_layout,
    find_manifest,
    is_classes,
    is_seg,
    visible_dirs,
)

ROLES: tuple[str, ...] = ("train", "test")
BATCH_FILE = contract.RAW_BATCH_RECORD
FILES_DIR = contract.RAW_FILES
BATCH_FORMAT_VERSION = 1
_COPY_CHUNK = 1 << 20
# Opening a source entry fails with these for a reason of the entry itself: recorded, not fatal.
_ENTRY_REFUSED = frozenset({errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENAMETOOLONG})
_BATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
WITHDRAWN_SUFFIX = ".withdrawn"  # data/raw/<batch>.withdrawn: a withdrawn batch's id stays taken
_AUTO_ID = re.compile(r"^b(\d{4,})(?:\.dvc|" + re.escape(WITHDRAWN_SUFFIX) + r")?$")


class CopyFailed(RuntimeError):
    """Copying a source into the raw zone failed part-way; nothing was registered."""


def next_batch_id(raw_root: str | os.PathLike[str]) -> str:
    """The next automatic batch id under ``raw_root``: ``b0001``, ``b0002``, ... (max existing + 1).

    Withdrawn batches count (their ids are never reused). Callers hold the workspace lock, so two
    registrations cannot pick the same id.
    """
    root = Path(raw_root)
    numbers = [int(m.group(1)) for p in (root.iterdir() if root.is_dir() else []) if (m := _AUTO_ID.match(p.name))]
    return f"b{max(numbers, default=0) + 1:04d}"


def validate_manifest(path: Path) -> int:
    """Refuse a manifest the ingest stage could not use; return its number of rows naming a file.

    Checks: UTF-8 text (a BOM is fine), a header with a path column (one of
    :data:`MANIFEST_PATH_COLUMNS`, case-insensitive), and at least one row with a path. Rows
    that are malformed in other ways are the ingest stage's business (quarantined one by one).

    Raises:
        ValueError: saying what is wrong with the manifest and how to fix it.
    """
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"manifest {path.name} is not UTF-8 text (byte {exc.start}: {exc.reason}): "
                         "save it as a UTF-8 CSV") from exc
    except OSError as exc:
        raise ValueError(f"manifest {path} cannot be read: {exc.strerror or exc}") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise ValueError(f"manifest {path.name} is empty: it needs a header with a path column "
                         f"({', '.join(MANIFEST_PATH_COLUMNS)}) and one row per image") from None
    except csv.Error as exc:
        raise ValueError(f"manifest {path.name}: the header line is not valid CSV ({exc})") from exc
    column = next((header.index(c) for c in MANIFEST_PATH_COLUMNS if c in header), None)
    if column is None:
        raise ValueError(f"manifest {path.name} has no path column (header: {', '.join(header) or 'empty'}); "
                         f"name the image column one of: {', '.join(MANIFEST_PATH_COLUMNS)}")
    rows = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error:
            continue  # a malformed row: quarantined by the ingest stage
        rows += len(fields) > column and bool(fields[column].strip())
    if rows == 0:
        raise ValueError(f"manifest {path.name} has no row with a {header[column]!r} value: nothing to ingest")
    return rows


def _datasets(root: Path, layout: str, dataset: str | None, manifest: Path | None) -> list[dict[str, Any]]:
    """One entry per dataset in the batch: {path (relative, '' = root), dataset, layout, ...}."""
    if layout == "collection":
        entries = []
        for d in visible_dirs(root):
            sub = "seg" if is_seg(d) else "classes" if is_classes(d) else None
            if sub is None:
                raise ValueError(f"collection: sub-folder {d.name}/ is neither a seg nor a classes dataset")
            entries.append({"path": d.name, "layout": sub,
                            "dataset": dataset or taxonomy.dataset_from_name(d.name)})
        if not entries:
            raise ValueError(f"collection: {root} has no dataset sub-folders")
        return entries
    entry: dict[str, Any] = {"path": "", "layout": layout, "dataset": dataset or taxonomy.dataset_from_name(root.name)}
    if manifest is not None:
        entry["manifest"] = manifest.relative_to(root).as_posix()
    return [entry]


def _copy_tree(root: Path, dest: Path) -> dict[str, Any]:
    """Copy regular files under ``root`` to ``dest`` without following symlinks, then verify the copy.

    Returns counts plus ``escapes`` (every symlink: not copied; ``outside_root`` says whether its
    target resolves outside ``root``) and ``unreadable`` (entries the source refuses: folders that
    cannot be listed, files that cannot be opened, names that are not UTF-8, special files).

    Raises:
        CopyFailed: a read error once copying began, a file that changed or vanished during the
            copy, a write error (disk full, read-only), or a copy that does not match the listing.
    """
    files = 0
    total_bytes = 0
    escapes: list[dict[str, Any]] = []
    unreadable: list[dict[str, str]] = []
    root_resolved = root.resolve()
    buffer = bytearray(_COPY_CHUNK)
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            if exc.errno not in _ENTRY_REFUSED:
                raise CopyFailed(f"listing {folder} failed: {exc.strerror or exc}") from exc
            unreadable.append({"path": _rel(folder, root), "error": f"cannot list folder: {exc.strerror or exc}"})
            continue
        for e in entries:
            path = Path(e.path)
            rel = _rel(path, root)
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                unreadable.append({"path": rel.encode("utf-8", "backslashreplace").decode(),
                                   "error": "file name is not valid UTF-8"})
                continue
            try:
                st = os.lstat(path)
            except OSError as exc:
                if exc.errno not in _ENTRY_REFUSED:
                    raise CopyFailed(f"{path} vanished or cannot be read while copying: {exc.strerror or exc}") from exc
                unreadable.append({"path": rel, "error": f"stat failed: {exc.strerror or exc}"})
                continue
            if stat.S_ISLNK(st.st_mode):
                target = os.path.realpath(path)
                outside = not (Path(target) == root_resolved or Path(target).is_relative_to(root_resolved))
                escapes.append({"path": rel, "outside_root": outside})
            elif stat.S_ISDIR(st.st_mode):
                stack.append(path)
            elif stat.S_ISREG(st.st_mode):
                try:
                    source = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in _copy_file
                except OSError as exc:
                    if exc.errno not in _ENTRY_REFUSED:
                        raise CopyFailed(f"{path} vanished or cannot be opened while copying: "
                                         f"{exc.strerror or exc}") from exc
                    unreadable.append({"path": rel, "error": f"read failed: {exc.strerror or exc}"})
                    continue
                _copy_file(source, path, dest / rel, st.st_size, buffer)
                files += 1
                total_bytes += st.st_size
            else:
                unreadable.append({"path": rel, "error": "not a regular file (device, socket or FIFO)"})
    _verify_copy(dest, files, total_bytes)
    escapes.sort(key=lambda d: d["path"])
    unreadable.sort(key=lambda d: d["path"])
    return {"files": files, "bytes": total_bytes, "escapes": escapes, "unreadable": unreadable}


def _copy_file(source: Any, src: Path, dst: Path, listed_size: int, buffer: bytearray) -> None:
    """Copy the open ``source`` (``src``) to a new file ``dst``: exactly ``listed_size`` bytes or CopyFailed."""
    view = memoryview(buffer)
    with source:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise CopyFailed(f"cannot create {dst}: {exc.strerror or exc}") from exc
        copied = 0
        try:
            while True:
                try:
                    n = source.readinto(buffer)
                except OSError as exc:
                    raise CopyFailed(f"reading {src} failed after {copied} bytes: {exc.strerror or exc}") from exc
                if not n:
                    break
                chunk = view[:n]
                while chunk:
                    try:
                        written = os.write(fd, chunk)
                    except OSError as exc:
                        raise CopyFailed(f"writing {dst} failed: {exc.strerror or exc}") from exc
                    chunk = chunk[written:]
                copied += n
        finally:
            os.close(fd)
    if copied != listed_size:
        raise CopyFailed(f"{src} changed while it was copied ({listed_size} bytes listed, {copied} read)")


def _verify_copy(dest: Path, files: int, total_bytes: int) -> None:
    """Check the copy against the source listing: same number of regular files, same bytes."""
    found_files = found_bytes = 0
    for dirpath, _, filenames in os.walk(dest):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                found_files += 1
                found_bytes += st.st_size
    if (found_files, found_bytes) != (files, total_bytes):
        raise CopyFailed(f"the copy in {dest} holds {found_files} files / {found_bytes} bytes, the source listing "
                         f"{files} files / {total_bytes} bytes")


def _rel(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return "" if rel == "." else rel


def register_batch(source: str | os.PathLike[str], raw_root: str | os.PathLike[str], batch_id: str,
                   layout: str = "auto", role: str = "train", dataset: str | None = None,
                   labels: dict[str, str | None] | None = None) -> dict[str, Any]:
    """Copy SOURCE into ``raw_root/batch_id/files/`` and write ``batch.json``; return its content.

    Args:
        source: a folder (seg/classes/collection/manifest) or, for ``manifest``, the CSV itself
            (its folder becomes the batch root).
        raw_root: the workspace's ``data/raw``.
        batch_id: new batch id (``next_batch_id`` gives the next automatic one); must not exist.
        layout: ``auto`` | ``seg`` | ``classes`` | ``manifest`` | ``collection``.
        role: ``train`` or ``test`` (a test batch always lands in the external test split).
        dataset: dataset id overriding the one derived from folder names (applies to every
            sub-dataset of a collection).
        labels: taxonomy terms for every image of the batch (``diagnosis``, ``location``, ...), validated
            against :mod:`taxonomy`; per-row manifest label columns win over them.

    The batch directory appears atomically (complete and verified, or not at all).

    Raises:
        ValueError: unknown layout/role, invalid or existing batch id, a layout that does not
            fit the source, or an unusable manifest (with the reason).
        CopyFailed: the copy failed part-way (see :func:`_copy_tree`); nothing is left behind.
        OSError: writing ``batch.json`` failed (disk full, read-only); nothing is left behind.
    """
    src = Path(source)
    if not _BATCH_ID.match(batch_id):
        raise ValueError(f"invalid batch id {batch_id!r}: letters, digits, '_', '.', '-' (max 64)")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    batch_labels = taxonomy.validate_labels(labels or {})
    if layout not in ("auto", *LAYOUTS):
        raise ValueError(f"layout must be auto or one of {LAYOUTS}, got {layout!r}")
    if not src.exists():
        raise ValueError(f"source {src} does not exist")
    manifest: Path | None = None
    if layout == "manifest":
        root, manifest = find_manifest(src)
        validate_manifest(manifest)
    else:
        root = src
        if layout == "auto":
            layout = detect_layout(src)
        elif not src.is_dir():
            raise ValueError(f"{src} is not a directory")
        elif not LAYOUT_CHECKS[layout](src):
            raise ValueError(f"{src} does not have the {layout} layout ({LAYOUT_HELP[layout]})")
    datasets = _datasets(root, layout, dataset, manifest)
    final = Path(raw_root) / batch_id
    if final.exists():
        raise ValueError(f"batch {batch_id} already exists at {final}: batch ids are immutable")
    with atomic_dir(final) as tmp:
        copied = _copy_tree(root, tmp / FILES_DIR)
        (tmp / FILES_DIR).mkdir(exist_ok=True)
        record = {
            "format_version": BATCH_FORMAT_VERSION,
            "batch_id": batch_id,
            "layout": layout,
            "role": role,
            "source_name": root.resolve().name,
            "datasets": datasets,
            "labels": batch_labels,
            "entries": {"files": copied["files"], "bytes": copied["bytes"],
                        "escapes": len(copied["escapes"]), "unreadable": len(copied["unreadable"])},
            "escapes": copied["escapes"],
            "unreadable": copied["unreadable"],
        }
        atomic_write_json(tmp / BATCH_FILE, record)
    return record


def read_batch(raw_root: str | os.PathLike[str], batch_id: str) -> dict[str, Any]:
    """Load ``raw_root/batch_id/batch.json`` (raises FileNotFoundError with the path when absent)."""
    import json

    path = Path(raw_root) / batch_id / BATCH_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: batch {batch_id} is not registered (cogalign ingest)")
    return json.loads(path.read_text())
