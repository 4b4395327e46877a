"""Integrity of a workspace's DVC data: cache objects (and, on demand, outputs) re-hashed against dvc.lock.

What is checked: every output DVC tracks for the current pipeline (``dvc.lock`` entries of the
stages in ``dvc.yaml`` and the raw batches' ``.dvc`` files, as DVC's own index lists them). Each
file's cache object must hash to its name (the md5 ``dvc.lock`` records); a directory's listing
(its ``.dir`` object) is checked the same way and then every file it names.

Fast path (``cogalign run``, ``cogalign status``, ``cogalign verify``): an object whose size,
mtime and inode are unchanged since this module last hashed it and found it good is not read
again (the record is ``.cogalign/verified.json``). DVC's own state database is deliberately not
trusted here: DVC records the *expected* hash for files it checks out without reading them, which
is how a corrupted object spreads into the workspace unseen. Full (``cogalign verify --full``):
every object and every workspace copy of an output is re-hashed; this also finds bit rot that
left size and mtime untouched.

Hashing, object paths and ``.dir`` parsing are DVC's own (``dvc_data``); this module decides only
what to check and how to report it. Nothing here changes the workspace except ``repair``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cogalign.workspace import STATE_DIR, Workspace
from cogalign_core.io import atomic_write_json

RECORD = STATE_DIR / "verified.json"
RECORD_FORMAT = 1


@dataclass(frozen=True)
class Problem:
    """One integrity failure. ``kind``: ``corrupt_object`` (a cache object's content does not match
    its name), ``missing_object`` (absent from the cache) or ``modified_output`` (a workspace copy
    differs from ``dvc.lock``; found by full checks). ``path`` is the workspace file concerned."""

    kind: str
    path: str
    owner: str  # stage (``annotate``) or raw batch file (``data/raw/b0001.dvc``)
    expected: str
    found: str | None = None
    object_path: str | None = None

    def line(self) -> str:
        where = f" (cache object {self.object_path})" if self.object_path else ""
        if self.kind == "corrupt_object":
            return f"{self.path} (output of {self.owner}): cache object is corrupted{where}: md5 {self.found}, " \
                   f"dvc.lock says {self.expected}"
        if self.kind == "missing_object":
            return f"{self.path} (output of {self.owner}): cache object missing{where}, " \
                   f"dvc.lock says md5 {self.expected}"
        return f"{self.path} (output of {self.owner}): workspace copy differs from dvc.lock: md5 {self.found}, " \
               f"expected {self.expected}"


@dataclass
class IntegrityReport:
    """Outcome of :func:`verify`: problems found and how much was read."""

    full: bool
    problems: list[Problem] = field(default_factory=list)
    objects: int = 0
    objects_hashed: int = 0
    workspace_files: int = 0
    seconds: float = 0.0

    @property
    def corrupt(self) -> list[Problem]:
        return [p for p in self.problems if p.kind == "corrupt_object"]

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self, problems: list[Problem] | None = None, limit: int = 10) -> str:
        """``problems`` (default: all), one per line (at most ``limit``), then what to do."""
        problems = self.problems if problems is None else problems
        lines = [p.line() for p in problems[:limit]]
        if len(problems) > limit:
            lines.append(f"... and {len(problems) - limit} more (`cogalign verify` lists them all)")
        if any(p.kind == "corrupt_object" for p in problems):
            lines.append("`cogalign verify --repair` removes the corrupted objects and their workspace copies; "
                         "`cogalign run` then rebuilds stage outputs (raw data must come back from its source or a "
                         "remote: `dvc fetch`)")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Tracked:
    owner: str
    path: str           # workspace-relative POSIX path of the output (file or directory)
    md5: str            # as in dvc.lock / the .dvc file (``.dir`` suffix for directories)


def tracked_outputs(ws: Workspace) -> tuple[list[_Tracked], Any]:
    """Outputs DVC tracks for the current pipeline (with their recorded md5) and the local cache."""
    from dvc.repo import Repo

    with Repo(str(ws.root)) as repo:
        tracked = []
        for out in repo.index.outs:
            if not out.use_cache or out.hash_info is None or not out.hash_info.value:
                continue  # never run yet, or not cached (metrics with cache: false)
            rel = Path(out.fs_path).relative_to(ws.root).as_posix()
            stage_file = Path(out.stage.path)  # dvc.yaml, or a raw batch's .dvc file
            owner = out.stage.name if stage_file.name == "dvc.yaml" else stage_file.relative_to(ws.root).as_posix()
            tracked.append(_Tracked(owner, rel, out.hash_info.value))
        return sorted(tracked, key=lambda t: t.path), repo.cache.local


def _load_record(ws: Workspace) -> dict[str, list[int]]:
    try:
        doc = json.loads((ws.root / RECORD).read_text())
        return dict(doc["objects"]) if doc.get("format") == RECORD_FORMAT else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def verify(ws: Workspace, full: bool = False) -> IntegrityReport:
    """Check every tracked output's cache objects (and with ``full`` its workspace copy) against dvc.lock."""
    from dvc_data.hashfile.hash import file_md5
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    start = time.perf_counter()
    report = IntegrityReport(full=full)
    tracked, odb = tracked_outputs(ws)
    record = {} if full else _load_record(ws)
    good: dict[str, list[int]] = {}
    seen: dict[str, bool] = {}  # oid -> verdict (identical files share one object)

    def object_ok(oid: str, owner: str, path: str) -> bool:
        if oid in seen:
            return seen[oid]
        seen[oid] = ok = _check_object(oid, owner, path)
        return ok

    def _check_object(oid: str, owner: str, path: str) -> bool:
        obj = Path(odb.oid_to_path(oid))
        rel_obj = obj.relative_to(ws.root).as_posix() if obj.is_relative_to(ws.root) else str(obj)
        try:
            st = obj.stat()
        except FileNotFoundError:
            report.problems.append(Problem("missing_object", path, owner, oid, object_path=rel_obj))
            return False
        report.objects += 1
        if record.get(oid) == _stamp(st):
            good[oid] = record[oid]
            return True
        report.objects_hashed += 1
        actual = file_md5(str(obj))
        if actual != oid.removesuffix(".dir"):
            report.problems.append(Problem("corrupt_object", path, owner, oid.removesuffix(".dir"), actual, rel_obj))
            return False
        good[oid] = _stamp(st)
        return True

    def workspace_ok(rel: str, md5: str, owner: str) -> None:
        path = ws.root / rel
        if not path.is_file():
            return  # absent outputs are DVC's business (`dvc status`: deleted; a run restores them)
        report.workspace_files += 1
        actual = file_md5(str(path))
        if actual != md5:
            report.problems.append(Problem("modified_output", rel, owner, md5, actual))

    for t in tracked:
        if not t.md5.endswith(".dir"):
            object_ok(t.md5, t.owner, t.path)
            if full:
                workspace_ok(t.path, t.md5, t.owner)
            continue
        if not object_ok(t.md5, t.owner, t.path):
            continue  # the listing itself is unusable
        tree = Tree.load(odb, HashInfo("md5", t.md5))
        for key, (_, entry) in tree.iteritems():
            rel = "/".join((t.path, *key))
            object_ok(entry.value, t.owner, rel)
            if full:
                workspace_ok(rel, entry.value, t.owner)
    _save_record(ws, good)
    report.seconds = time.perf_counter() - start
    return report


def _save_record(ws: Workspace, good: dict[str, list[int]]) -> None:
    # A read-only or full disk: the next check hashes again, nothing is lost.
    with contextlib.suppress(OSError):
        atomic_write_json(ws.root / RECORD, {"format": RECORD_FORMAT, "objects": dict(sorted(good.items()))})


def repair(ws: Workspace, report: IntegrityReport) -> list[str]:
    """Remove the corrupted cache objects of ``report`` and the workspace copies made from them.

    Afterwards DVC sees those outputs as missing and not cached: ``cogalign run`` reruns the stages
    that made them; a raw batch's files must be restored from their source or a remote. Returns
    the removed paths (workspace-relative). Call under the workspace lock.
    """
    removed = []
    for p in report.corrupt:
        for rel in (p.object_path, p.path):
            target = ws.root / rel if rel else None
            if target is None or not target.is_file():
                continue
            if rel == p.path:
                from dvc_data.hashfile.hash import file_md5

                if file_md5(str(target)) == p.expected:
                    continue  # an intact workspace copy (cache type copy/reflink): keep it
            target.chmod(0o644)
            target.unlink()
            removed.append(rel)
    return removed
