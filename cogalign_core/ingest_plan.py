"""Planning for ``ingest_batch``: a registered raw batch's layout -> decode tasks + pre-decode quarantine rows.

Reads only the layout (file names, ``metadata.csv``, ``bboxes.json``, manifests; naming rules from
:mod:`cogalign_core.raw_layout`): no pixel is decoded here (:mod:`cogalign_core.ingest_decode` does
that). Every unit (image file, manifest row, entry registration could not copy, rejected metadata
row) ends up as a task or a quarantine row with its reason, counted in :attr:`BatchPlan.counts`.

Over 400 lines on purpose: the four layouts (seg, classes, manifest, collection) share one
bookkeeping class (:class:`_Planner`) whose counts must add up across them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cogalign_core import raw_layout, tables, taxonomy
from cogalign_core.privacy import redact_names, salted_hash
from cogalign_core.raw_layout import (
    GROUP_COLUMNS,
    MANIFEST_BBOX_COLUMNS,
    MANIFEST_GROUP_COLUMNS,
    MANIFEST_LABEL_COLUMNS,
    MANIFEST_MASK_COLUMNS,
    MANIFEST_PATH_COLUMNS,
    STEM_COLUMNS,
)
from cogalign_core.raw_layout import column as _column
from cogalign_core.raw_layout import stem_key as _stem_key

_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f", ""}


@dataclass(frozen=True)
class ItemTask:
    """One image to decode, with everything the worker needs and the labels it carries.

    ``boxes`` are (xmin, ymin, xmax, ymax) inclusive pixel corners in the frame ``boxes_frame``
    = (width, height) declared by the source (``None``: the image's own frame).
    """

    rel_path: str
    image_file: str
    name_hash: str
    dataset: str
    class_label: str | None = None
    group_id_hash: str | None = None
    kvasir_sessile: bool | None = None
    mask_rel: str | None = None
    mask_file: str | None = None
    mask_required: bool = False
    mask_problem: tuple[str, str] | None = None  # (reason, detail) found while planning
    boxes: tuple[tuple[int, int, int, int], ...] | None = None
    boxes_frame: tuple[int, int] | None = None
    labels: dict[str, str] | None = None  # taxonomy terms of a manifest row (win over the batch's labels)



@dataclass
class BatchPlan:
    """Everything found while reading a batch's layout, before any pixel is decoded."""

    tasks: list[ItemTask] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)  # entries and metadata rows
    counts: Counter[str] = field(default_factory=Counter)
    names: dict[str, str] = field(default_factory=dict)  # name hash -> unit name (in memory only, never written)


def _quarantine_row(batch_id: str, rel: str, salt: str, kind: str, reason: str, detail: str,
                    *names: str | None) -> dict[str, Any]:
    """A quarantine row: the unit's keyed name hash and the reason; names (``rel`` and ``names``) leave the
    detail (original paths stay in the raw zone; ``cogalign quarantine`` resolves hashes locally)."""
    if reason not in tables.QUARANTINE_REASONS:
        raise ValueError(f"unknown quarantine reason {reason!r}")
    return {"batch_id": batch_id, "name_hash": salted_hash(rel, salt), "kind": kind, "reason": reason,
            "detail": redact_names(detail, rel, *names)}



def _files_under(root: Path, prefix: str) -> list[str]:
    """Sorted POSIX paths (relative to ``root``) of regular files under ``root/prefix``."""
    base = root / prefix if prefix else root
    if not base.is_dir():
        return []
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in filenames:
            out.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(out)


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in rel.split("/"))


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str] | None, str]]]:
    """(header, [(line number, fields or None, error)]) of a CSV; never raises on content."""
    text = path.read_bytes().decode("utf-8-sig", errors="strict")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, list[str] | None, str]] = []
    header: list[str] | None = None
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            rows.append((reader.line_num, None, f"CSV syntax: {exc}"))
            continue
        if header is None:
            header = [h.strip().lower() for h in fields]
            continue
        if not any(f.strip() for f in fields):
            continue  # blank line
        rows.append((reader.line_num, fields, ""))
    return header or [], rows


def _parse_bool(value: str) -> bool | None:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return None if v == "" else False
    raise ValueError(f"not a boolean: {value!r}")


class _Planner:
    """Builds :class:`BatchPlan` for one batch (all layouts share the bookkeeping here)."""

    def __init__(self, batch: dict[str, Any], files_root: Path, salt: str) -> None:
        self.batch = batch
        self.batch_id = batch["batch_id"]
        self.root = files_root
        self.salt = salt
        self.plan = BatchPlan()
        self.blocked = {e["path"]: e for e in batch.get("escapes", [])}
        self.blocked_unreadable = {e["path"]: e for e in batch.get("unreadable", [])}

    def reject(self, rel: str, kind: str, reason: str, detail: str, unit: str | None) -> None:
        """Quarantine a pre-decode unit; ``unit`` names the seen-counter it adds to (None: already counted)."""
        row = _quarantine_row(self.batch_id, rel, self.salt, kind, reason, detail)
        self.plan.quarantine.append(row)
        self.plan.names[row["name_hash"]] = rel
        if unit is not None:
            self.plan.counts[unit] += 1

    def group_hash(self, dataset: str, column: str, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return salted_hash(raw_layout.group_text(dataset, column, value), self.salt)

    def entries(self) -> None:
        for e in self.batch.get("escapes", []):
            if e.get("outside_root", True):
                self.reject(e["path"], "entry", "outside_source_root",
                            "symbolic link whose target resolves outside the source root: not followed", "entries")
            else:
                self.reject(e["path"], "entry", "unreadable",
                            "symbolic link inside the source root: not followed (its target counts on its own)",
                            "entries")
        for e in self.batch.get("unreadable", []):
            self.reject(e["path"], "entry", "unreadable", e.get("error", "unreadable"), "entries")

    # ---- seg
    def seg(self, prefix: str, dataset: str) -> None:
        join = (lambda *p: posixpath.join(prefix, *p)) if prefix else (lambda *p: posixpath.join(*p))
        images = [r for r in _files_under(self.root, join(raw_layout.SEG_IMAGES)) if not _is_hidden(r)]
        masks_by_key: dict[str, list[str]] = {}
        masks_dir = join(raw_layout.SEG_MASKS)
        for m in _files_under(self.root, masks_dir):
            if _is_hidden(m):
                self.plan.counts["not_in_layout"] += 1
                continue
            key = raw_layout.item_key(m, masks_dir)
            masks_by_key.setdefault(key, []).append(m)
        meta = self._seg_metadata(join(raw_layout.SEG_METADATA), dataset)
        boxes = self._seg_boxes(join(raw_layout.SEG_BBOXES))
        blocked_masks = {posixpath.splitext(p)[0] for p in self.blocked if p.startswith(masks_dir + "/")}
        used_masks: set[str] = set()
        matched_meta: set[str] = set()
        images_dir = join(raw_layout.SEG_IMAGES)
        for rel in images:
            key = raw_layout.item_key(rel, images_dir)
            stem = posixpath.basename(key)
            candidates = masks_by_key.get(key, [])
            mask_rel = candidates[0] if candidates else None
            if mask_rel:
                used_masks.add(mask_rel)
            problem = None
            if mask_rel is None and join(raw_layout.SEG_MASKS, key) in blocked_masks:
                problem = ("mask_missing", "the mask is a symbolic link, not followed")
            row = meta.get(stem, {})
            if stem in meta:
                matched_meta.add(stem)
            box_entry = boxes.get(stem)
            self.plan.tasks.append(ItemTask(
                rel_path=rel, image_file=str(self.root / rel), name_hash=salted_hash(rel, self.salt), dataset=dataset,
                group_id_hash=row.get("group"), kvasir_sessile=row.get("sessile"),
                mask_rel=mask_rel, mask_file=str(self.root / mask_rel) if mask_rel else None, mask_required=True,
                mask_problem=problem,
                boxes=box_entry[0] if box_entry else None, boxes_frame=box_entry[1] if box_entry else None))
            self.plan.counts["image_files"] += 1
        self.plan.counts["orphan_masks"] += sum(len(v) for v in masks_by_key.values()) - len(used_masks)
        self.plan.counts["extra_masks_per_image"] += sum(max(0, len(v) - 1) for v in masks_by_key.values())
        self.plan.counts["metadata_rows_unmatched"] += len(set(meta) - matched_meta)
        known = {join(raw_layout.SEG_METADATA), join(raw_layout.SEG_BBOXES)}
        for rel in _files_under(self.root, prefix):
            if rel in known or rel.startswith(images_dir + "/") or rel.startswith(masks_dir + "/"):
                continue
            self.plan.counts["not_in_layout"] += 1
        self.plan.counts["not_in_layout"] += sum(1 for r in _files_under(self.root, images_dir) if _is_hidden(r))

    def _seg_metadata(self, rel: str, dataset: str) -> dict[str, dict[str, Any]]:
        path = self.root / rel
        if not path.is_file():
            return {}
        try:
            header, rows = _read_csv(path)
        except (UnicodeDecodeError, OSError) as exc:
            self.reject(rel, "manifest_row", "malformed_manifest_row", f"whole file unreadable: {exc}",
                        "metadata_rows_rejected")
            return {}
        stem_col = _column(header, STEM_COLUMNS)
        if stem_col is None:
            self.reject(rel, "manifest_row", "malformed_manifest_row",
                        f"no id column (one of {', '.join(STEM_COLUMNS)}) in header {header}", "metadata_rows_rejected")
            return {}
        group_cols = [(c, header.index(c)) for c in GROUP_COLUMNS if c in header]
        sessile_col = _column(header, ("kvasir_sessile", "sessile"))
        out: dict[str, dict[str, Any]] = {}
        for line, fields, error in rows:
            where = f"{rel}#L{line}"
            if fields is None:
                self.reject(where, "manifest_row", "malformed_manifest_row", error, "metadata_rows_rejected")
                continue
            if len(fields) != len(header):
                self.reject(where, "manifest_row", "malformed_manifest_row",
                            f"{len(fields)} fields, header has {len(header)}", "metadata_rows_rejected")
                continue
            stem = _stem_key(fields[stem_col])
            if not stem:
                self.reject(where, "manifest_row", "malformed_manifest_row", "empty id", "metadata_rows_rejected")
                continue
            if stem in out:
                self.reject(where, "manifest_row", "malformed_manifest_row",
                            "duplicate id (the first row is used)", "metadata_rows_rejected")
                continue
            try:
                sessile = _parse_bool(fields[sessile_col]) if sessile_col is not None else None
            except ValueError as exc:
                self.reject(where, "manifest_row", "malformed_manifest_row", str(exc), "metadata_rows_rejected")
                continue
            group = None
            # sequence/patient first; the dataset's near-duplicate group only when neither is given
            for name, idx in group_cols:
                group = self.group_hash(dataset, name, fields[idx])
                if group:
                    break
            out[stem] = {"group": group, "sessile": sessile}
        return out

    def _seg_boxes(self, rel: str) -> dict[str, tuple[tuple[tuple[int, int, int, int], ...], tuple[int, int] | None]]:
        path = self.root / rel
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_bytes().decode("utf-8-sig"))
            if not isinstance(data, dict):
                raise ValueError("top level is not an object")
        except (ValueError, UnicodeDecodeError) as exc:
            self.reject(rel, "manifest_row", "malformed_manifest_row", f"bboxes.json unreadable: {exc}",
                        "metadata_rows_rejected")
            return {}
        out = {}
        for stem in sorted(data):
            entry = data[stem]
            try:
                frame = None
                if isinstance(entry, dict) and "width" in entry and "height" in entry:
                    frame = (int(entry["width"]), int(entry["height"]))
                    if frame[0] <= 0 or frame[1] <= 0:
                        raise ValueError(f"declared size {frame}")
                raw = entry["bbox"] if isinstance(entry, dict) else entry
                boxes = tuple(_box_from_any(b) for b in raw)
            except (KeyError, TypeError, ValueError) as exc:
                self.reject(f"{rel}#{stem}", "manifest_row", "malformed_manifest_row", f"bad box entry: {exc}",
                            "metadata_rows_rejected")
                continue
            out[_stem_key(stem)] = (boxes, frame)
        return out

    # ---- classes
    def classes(self, prefix: str, dataset: str) -> None:
        for rel in _files_under(self.root, prefix):
            inner = posixpath.relpath(rel, prefix) if prefix else rel
            parts = inner.split("/")
            if len(parts) < 2 or _is_hidden(inner):
                self.plan.counts["not_in_layout"] += 1
                continue
            self.plan.tasks.append(ItemTask(rel_path=rel, image_file=str(self.root / rel),
                                            name_hash=salted_hash(rel, self.salt), dataset=dataset,
                                            class_label=parts[0]))
            self.plan.counts["image_files"] += 1

    # ---- manifest
    def manifest(self, manifest_rel: str, dataset: str) -> None:
        path = self.root / manifest_rel
        try:
            header, rows = _read_csv(path)
        except (UnicodeDecodeError, OSError) as exc:
            raise ValueError(f"manifest {manifest_rel} is unreadable: {exc}") from exc
        path_col = _column(header, MANIFEST_PATH_COLUMNS)
        if path_col is None:
            raise ValueError(f"manifest {manifest_rel}: no path column (one of {', '.join(MANIFEST_PATH_COLUMNS)})")
        label_col = _column(header, MANIFEST_LABEL_COLUMNS)
        mask_col = _column(header, MANIFEST_MASK_COLUMNS)
        bbox_col = _column(header, MANIFEST_BBOX_COLUMNS)
        group_col = _column(header, MANIFEST_GROUP_COLUMNS)
        level_cols = [(level, header.index(level)) for level in raw_layout.MANIFEST_LEVEL_COLUMNS if level in header]
        referenced = {manifest_rel}
        for line, fields, error in rows:
            where = f"{manifest_rel}#L{line}"
            self.plan.counts["manifest_rows"] += 1
            if fields is None or len(fields) != len(header):
                detail = error or f"{len(fields or [])} fields, header has {len(header)}"
                self.reject(where, "manifest_row", "malformed_manifest_row", detail, None)
                continue
            raw_path = fields[path_col].strip()
            resolved = self._inside(raw_path)
            if not raw_path:
                self.reject(where, "manifest_row", "malformed_manifest_row", "empty path", None)
                continue
            if resolved is None:
                self.reject(raw_path, "manifest_row", "outside_source_root",
                            f"{where}: path leaves the manifest's folder", None)
                continue
            if not (self.root / resolved).is_file():
                reason, detail = self._missing(resolved)
                self.reject(resolved, "manifest_row", reason, f"{where}: {detail}", None)
                continue
            boxes = None
            if bbox_col is not None and fields[bbox_col].strip():
                try:
                    boxes = _parse_boxes(fields[bbox_col])
                except ValueError as exc:
                    self.reject(where, "manifest_row", "malformed_manifest_row", f"bbox: {exc}", None)
                    continue
            mask_rel = mask_problem = None
            if mask_col is not None and fields[mask_col].strip():
                mask_raw = fields[mask_col].strip()
                mask_rel = self._inside(mask_raw)
                if mask_rel is None:
                    mask_problem = ("mask_missing", f"{where}: the mask path leaves the manifest's folder")
                elif not (self.root / mask_rel).is_file():
                    mask_problem = ("mask_missing", f"{where}: {self._missing(mask_rel)[1]}")
                    mask_rel = None
                else:
                    referenced.add(mask_rel)
            referenced.add(resolved)
            try:
                row_labels = taxonomy.validate_labels({level: fields[i] for level, i in level_cols})
            except ValueError as exc:
                self.reject(where, "manifest_row", "malformed_manifest_row", f"label: {exc}", None)
                continue
            label = fields[label_col].strip() if label_col is not None else ""
            group = self.group_hash(dataset, header[group_col], fields[group_col]) if group_col is not None else None
            self.plan.tasks.append(ItemTask(
                rel_path=resolved, image_file=str(self.root / resolved), name_hash=salted_hash(resolved, self.salt),
                dataset=dataset, class_label=label or None, group_id_hash=group,
                mask_rel=mask_rel, mask_file=str(self.root / mask_rel) if mask_rel else None,
                mask_problem=mask_problem, boxes=boxes, labels=row_labels or None))
        self.plan.counts["not_in_layout"] += sum(1 for r in _files_under(self.root, "") if r not in referenced)

    def _inside(self, raw: str) -> str | None:
        """Normalised POSIX path inside the batch root, or None when it escapes (../, absolute)."""
        return raw_layout.manifest_path(raw)

    def _missing(self, rel: str) -> tuple[str, str]:
        if rel in self.blocked:
            outside = self.blocked[rel].get("outside_root", True)
            return ("outside_source_root" if outside else "unreadable"), "symbolic link, not followed"
        if rel in self.blocked_unreadable:
            return "unreadable", self.blocked_unreadable[rel].get("error", "unreadable")
        return "malformed_manifest_row", "file not found"


def _box_from_any(b: Any) -> tuple[int, int, int, int]:
    vals = [b["xmin"], b["ymin"], b["xmax"], b["ymax"]] if isinstance(b, dict) else list(b)
    if len(vals) != 4:
        raise ValueError(f"a box needs 4 numbers, got {len(vals)}")
    nums = [float(v) for v in vals]
    if not all(np.isfinite(nums)):
        raise ValueError("non-finite coordinate")
    x0, y0, x1, y1 = (round(v) for v in nums)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"inverted box {vals}")
    return (x0, y0, x1, y1)


def _parse_boxes(text: str) -> tuple[tuple[int, int, int, int], ...]:
    """Manifest bbox cell: JSON (list of boxes / dicts) or ``x0,y0,x1,y1[;x0,y0,x1,y1...]``."""
    t = text.strip()
    if t.startswith("[") or t.startswith("{"):
        try:
            data = json.loads(t)
        except ValueError as exc:
            raise ValueError(f"invalid JSON: {exc}") from exc
        if isinstance(data, dict) or (isinstance(data, list) and data and not isinstance(data[0], list | dict)):
            data = [data]
        return tuple(_box_from_any(b) for b in data)
    return tuple(_box_from_any(part.split(",")) for part in t.split(";") if part.strip())


def plan_batch(batch: dict[str, Any], files_root: Path, salt: str) -> BatchPlan:
    """Read a registered batch's layout into decode tasks and pre-decode quarantine rows."""
    planner = _Planner(batch, files_root, salt)
    planner.entries()
    datasets = batch["datasets"]
    for ds in datasets:
        if ds["layout"] == "seg":
            planner.seg(ds["path"], ds["dataset"])
        elif ds["layout"] == "classes":
            planner.classes(ds["path"], ds["dataset"])
        elif ds["layout"] == "manifest":
            planner.manifest(ds["manifest"], ds["dataset"])
        else:
            raise ValueError(f"batch {batch['batch_id']}: unknown dataset layout {ds['layout']!r}")
    if batch["layout"] == "collection":
        inside = tuple(ds["path"] + "/" for ds in datasets)
        planner.plan.counts["not_in_layout"] += sum(1 for r in _files_under(files_root, "") if not r.startswith(inside))
    planner.plan.names.update({t.name_hash: t.rel_path for t in planner.plan.tasks})
    return planner.plan
