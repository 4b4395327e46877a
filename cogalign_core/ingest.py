"""Ingest stages: per-batch decode/validate/store (``ingest_batch``) and the cross-batch merge (``ingest``).

``run_batch_stage`` turns one registered raw batch (``data/raw/<batch>/``, see :mod:`raw_batch`) into
``data/ingest/batches/<batch>/``:

- ``images/<h2>/<sha>.{jpg,png}``: every decodable image as 8-bit RGB without metadata
  (content-addressed by the stored bytes; see :mod:`imaging` for the stored forms);
- ``masks/<h2>/<sha>.png``: validated {0,255} single-channel masks of the same size;
- ``records.parquet`` (``tables.SAMPLES``; ``near_dup_cluster`` is filled by the merge),
  ``quarantine.parquet`` (``tables.QUARANTINE``), ``duplicates.parquet`` (``tables.DUPLICATES``,
  exact duplicates inside the batch), ``summary.json`` and ``provenance.json``.

Units counted: every image file in an item location of the layout (or every manifest row), every
entry registration could not copy (symlinks, unreadable files), and every rejected metadata row
(``metadata.csv`` / ``bboxes.json``). ``seen = ingested + duplicates + quarantined`` is checked
and recorded; a violation is a bug and raises. Files outside the layout's item locations
(READMEs, ``__init__.py``, hidden files) are not units; they are counted as ``not_in_layout``.

``run_merge_stage`` reads the batches named in ``params.batches`` in order and writes
``data/ingest/{samples,quarantine,duplicates}.parquet``, ``summary.json`` and ``provenance.json``.

Privacy: original paths appear only in ``quarantine.rel_path`` (an operator must find the bad
file; the quarantine table stays in the workspace). Everywhere else names, sequence and patient
ids are salted hashes (:func:`privacy.salted_hash`).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cogalign_core import contract, imaging, raw_layout, tables
from cogalign_core.config import PipelineParams
from cogalign_core.executor import default_workers, map_items
from cogalign_core.io import atomic_dir, atomic_write_json, sha256_bytes
from cogalign_core.privacy import salted_hash
from cogalign_core.provenance import write_provenance
from cogalign_core.raw_batch import FILES_DIR, read_batch
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

INGEST_DIR = Path(contract.INGEST)
RAW_DIR = Path(contract.RAW)
BATCHES_DIR = Path(contract.INGEST_BATCHES)

_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f", ""}


# --------------------------------------------------------------------------------------------
# Work items


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


@dataclass(frozen=True)
class DecodeSettings:
    """Per-run settings shipped to workers. ``out_dir`` is the batch output (temp) folder."""

    out_dir: str
    max_pixels: int
    min_side: int
    mask_threshold: int


@dataclass
class BatchPlan:
    """Everything found while reading a batch's layout, before any pixel is decoded."""

    tasks: list[ItemTask] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)  # entries and metadata rows
    counts: Counter[str] = field(default_factory=Counter)


def _quarantine_row(batch_id: str, rel: str, salt: str, kind: str, reason: str, detail: str) -> dict[str, Any]:
    if reason not in tables.QUARANTINE_REASONS:
        raise ValueError(f"unknown quarantine reason {reason!r}")
    return {"batch_id": batch_id, "rel_path": rel, "name_hash": salted_hash(rel, salt), "kind": kind,
            "reason": reason, "detail": detail}


# --------------------------------------------------------------------------------------------
# Worker


def _store(out_dir: str, sub: str, data: bytes, suffix: str) -> tuple[str, str]:
    """Write ``data`` content-addressed as ``out_dir/sub/<h2>/<sha><suffix>``; return (relative path, sha256).

    The whole batch folder is an ``atomic_dir``, so a partial file can never be published and a
    plain exclusive create suffices (a concurrent writer of the same digest writes the same bytes).
    Plain ``os`` calls: this runs once per file and pathlib/mkdir overhead rivals the decode.
    """
    digest = sha256_bytes(data)
    rel = f"{sub}/{digest[:2]}/{digest}{suffix}"
    path = os.path.join(out_dir, rel)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return rel, digest
    except FileExistsError:
        return rel, digest
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return rel, digest


def _fit_boxes(task: ItemTask, width: int, height: int) -> tuple[list[dict[str, int]] | None, int]:
    """Boxes in the stored image frame (scaled from the declared frame, clipped); (boxes, dropped)."""
    if task.boxes is None:
        return None, 0
    sx = sy = 1.0
    if task.boxes_frame and tuple(task.boxes_frame) != (width, height):
        sx, sy = width / task.boxes_frame[0], height / task.boxes_frame[1]
    out, dropped = [], 0
    for xmin, ymin, xmax, ymax in task.boxes:
        x0 = min(max(round(xmin * sx), 0), width - 1)
        y0 = min(max(round(ymin * sy), 0), height - 1)
        x1 = min(max(round(xmax * sx), 0), width - 1)
        y1 = min(max(round(ymax * sy), 0), height - 1)
        if x1 < x0 or y1 < y0:
            dropped += 1
            continue
        out.append({"xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1})
    return out, dropped


def process_item(settings: DecodeSettings, task: ItemTask) -> dict[str, Any]:
    """Decode, validate and store one image (and its mask). Never raises.

    Returns ``{"ok": True, ...record fields}`` or ``{"ok": False, "kind", "reason", "detail"}``.
    """
    try:
        return _process_item(settings, task)
    except Exception as exc:  # a bug or an exotic decoder failure: record it, keep the batch going
        return {"ok": False, "kind": "image", "reason": "undecodable", "internal_error": True,
                "detail": f"internal error: {type(exc).__name__}: {exc}"}


def _process_item(settings: DecodeSettings, task: ItemTask) -> dict[str, Any]:
    out_dir = settings.out_dir
    try:
        img = imaging.decode_image(task.image_file, settings.max_pixels, settings.min_side)
    except imaging.Rejected as r:
        return {"ok": False, "kind": "image", "reason": r.reason, "detail": r.detail}
    size = img.image.size
    mask = None
    if task.mask_problem is not None:
        return {"ok": False, "kind": "mask", "reason": task.mask_problem[0], "detail": task.mask_problem[1]}
    if task.mask_file is not None:
        try:
            mask = imaging.decode_mask(task.mask_file, size, settings.mask_threshold, settings.max_pixels)
        except imaging.Rejected as r:
            return {"ok": False, "kind": "mask", "reason": r.reason, "detail": f"{task.mask_rel}: {r.detail}"}
    elif task.mask_required:
        return {"ok": False, "kind": "mask", "reason": "mask_missing", "detail": "no mask with the image's stem"}
    image_rel, image_sha = _store(out_dir, "images", img.stored, img.stored_suffix)
    result: dict[str, Any] = {
        "ok": True, "sample_id": img.sample_id, "image_rel": image_rel, "image_sha256": image_sha,
        "width": size[0], "height": size[1], "source_format": img.source_format, "source_mode": img.source_mode,
        "metadata_stripped": img.had_metadata, "phash": _phash(img.image),
        "mask_rel": None, "mask_sha256": None, "mask_binarise_threshold": None, "mask_area_fraction": None,
    }
    if mask is not None:
        mask_rel, mask_sha = _store(out_dir, "masks", mask.stored, ".png")
        result.update(mask_rel=mask_rel, mask_sha256=mask_sha, mask_binarise_threshold=mask.threshold,
                      mask_area_fraction=mask.area_fraction)
    result["boxes"], result["boxes_dropped"] = _fit_boxes(task, *size)
    return result


def _phash(image: Any) -> str:
    """Perceptual hash of the image box-reduced to a short side of 64-127 px.

    The Lanczos resize to 32x32 inside phash costs as much as the JPEG decode on a full frame;
    a box reduction first keeps the hash within ~1 bit of the unreduced one at a fraction of the cost.
    """
    factor = max(1, min(image.size) // 64)
    return imaging.phash_hex(image.reduce(factor) if factor > 1 else image)


# --------------------------------------------------------------------------------------------
# Planning: layout -> tasks


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
        self.plan.quarantine.append(_quarantine_row(self.batch_id, rel, self.salt, kind, reason, detail))
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
                    mask_problem = ("mask_missing", f"{where}: mask path {mask_raw!r} leaves the manifest's folder")
                elif not (self.root / mask_rel).is_file():
                    mask_problem = ("mask_missing", f"{where}: {self._missing(mask_rel)[1]}")
                    mask_rel = None
                else:
                    referenced.add(mask_rel)
            referenced.add(resolved)
            label = fields[label_col].strip() if label_col is not None else ""
            group = self.group_hash(dataset, header[group_col], fields[group_col]) if group_col is not None else None
            self.plan.tasks.append(ItemTask(
                rel_path=resolved, image_file=str(self.root / resolved), name_hash=salted_hash(resolved, self.salt),
                dataset=dataset, class_label=label or None, group_id_hash=group,
                mask_rel=mask_rel, mask_file=str(self.root / mask_rel) if mask_rel else None,
                mask_problem=mask_problem, boxes=boxes))
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
    return planner.plan


# --------------------------------------------------------------------------------------------
# Batch stage


def run_batch_stage(workspace: Path, params: PipelineParams, item: str | None) -> None:
    """DVC stage ``ingest_batch@<item>``: ingest raw batch ``item`` into ``data/ingest/batches/<item>/``."""
    if not item:
        raise ValueError("ingest_batch needs a batch id (--item BATCH)")
    ws = Path(workspace)
    salt = params.privacy.salt
    salted_hash("check", salt)  # fail early and clearly on an empty salt
    batch = read_batch(ws / RAW_DIR, item)
    files_root = ws / RAW_DIR / item / FILES_DIR
    plan = plan_batch(batch, files_root, salt)
    out_final = ws / BATCHES_DIR / item
    cfg = params.ingest
    with atomic_dir(out_final) as tmp:
        settings = DecodeSettings(out_dir=str(tmp), max_pixels=cfg.max_pixels, min_side=cfg.min_side,
                                  mask_threshold=cfg.mask_threshold)
        results = map_items(functools.partial(process_item, settings), plan.tasks,
                            desc=f"ingest {item}", chunksize=_chunksize(len(plan.tasks)))
        records, quarantine, duplicates, counts = _collect(batch, plan, results, salt)
        _remove_unreferenced(tmp, records)
        tables.write_rows(records, tmp / "records.parquet", tables.SAMPLES, "samples")
        tables.write_rows(quarantine, tmp / "quarantine.parquet", tables.QUARANTINE, "quarantine")
        tables.write_rows(duplicates, tmp / "duplicates.parquet", tables.DUPLICATES, "duplicates")
        atomic_write_json(tmp / "summary.json", _batch_summary(batch, plan, counts, records, quarantine, duplicates))
        write_provenance(tmp, "ingest_batch", ws, [contract.raw_batch_record(item)],
                         {"ingest": cfg.model_dump(mode="json")}, extra={"batch_id": item})


def _chunksize(n_tasks: int, workers: int = 0) -> int:
    """Items per pool task: ~4 chunks per worker (amortises IPC), at most 16 (keeps the tail short)."""
    return max(1, min(16, n_tasks // (4 * default_workers(workers))))


def _collect(batch: dict[str, Any], plan: BatchPlan, results: list[dict[str, Any]], salt: str
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], Counter[str]]:
    batch_id = batch["batch_id"]
    quarantine = list(plan.quarantine)
    records: dict[str, dict[str, Any]] = {}
    duplicates: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    prefix = f"{BATCHES_DIR.as_posix()}/{batch_id}/"
    for task, res in zip(plan.tasks, results, strict=True):
        if not res["ok"]:
            quarantine.append(_quarantine_row(batch_id, task.rel_path, salt, res["kind"], res["reason"], res["detail"]))
            counts["internal_errors"] += int(bool(res.get("internal_error")))
            continue
        sid = res["sample_id"]
        if sid in records:
            duplicates.append({"batch_id": batch_id, "name_hash": task.name_hash, "duplicate_of": sid})
            continue
        counts["boxes_dropped"] += res["boxes_dropped"]
        counts["binarised_masks"] += int(res["mask_binarise_threshold"] is not None)
        records[sid] = {
            "sample_id": sid, "batch_id": batch_id, "role": batch["role"], "dataset": task.dataset,
            "class_label": task.class_label, "name_hash": task.name_hash, "group_id_hash": task.group_id_hash,
            "image_path": prefix + res["image_rel"], "image_sha256": res["image_sha256"],
            "width": res["width"], "height": res["height"], "source_format": res["source_format"],
            "source_mode": res["source_mode"], "metadata_stripped": res["metadata_stripped"], "phash": res["phash"],
            "near_dup_cluster": None,
            "mask_path": prefix + res["mask_rel"] if res["mask_rel"] else None, "mask_sha256": res["mask_sha256"],
            "mask_binarise_threshold": res["mask_binarise_threshold"],
            "mask_area_fraction": res["mask_area_fraction"], "boxes": res["boxes"],
            "kvasir_sessile": task.kvasir_sessile,
        }
    rows = sorted(records.values(), key=lambda r: r["sample_id"])
    quarantine.sort(key=lambda q: (q["rel_path"], q["kind"], q["reason"]))
    duplicates.sort(key=lambda d: (d["duplicate_of"], d["name_hash"]))
    return rows, quarantine, duplicates, counts


def _remove_unreferenced(out_dir: Path, records: list[dict[str, Any]]) -> None:
    """Delete stored files only duplicates referenced (their first copy keeps the sample)."""
    keep = {r["image_path"].split("/", 4)[-1] for r in records}
    keep |= {r["mask_path"].split("/", 4)[-1] for r in records if r["mask_path"]}
    for sub in ("images", "masks"):
        for path in sorted((out_dir / sub).rglob("*")) if (out_dir / sub).is_dir() else []:
            if path.is_file() and path.relative_to(out_dir).as_posix() not in keep:
                path.unlink()


def _batch_summary(batch: dict[str, Any], plan: BatchPlan, counts: Counter[str], records: list[dict[str, Any]],
                   quarantine: list[dict[str, Any]], duplicates: list[dict[str, Any]]) -> dict[str, Any]:
    c = plan.counts
    seen_parts = {
        "image_files": c["image_files"],
        "manifest_rows": c["manifest_rows"],
        "metadata_rows_rejected": c["metadata_rows_rejected"],
        "entries": c["entries"],
    }
    seen = sum(seen_parts.values())
    out = len(records) + len(duplicates) + len(quarantine)
    summary = {
        "batch_id": batch["batch_id"], "layout": batch["layout"], "role": batch["role"],
        "datasets": {ds["path"] or ".": ds["dataset"] for ds in batch["datasets"]},
        "seen": seen, "seen_by_unit": seen_parts,
        "ingested": len(records), "duplicates_within_batch": len(duplicates), "quarantined": len(quarantine),
        "quarantined_by_reason": dict(sorted(Counter(q["reason"] for q in quarantine).items())),
        "quarantined_by_kind": dict(sorted(Counter(q["kind"] for q in quarantine).items())),
        "with_mask": sum(1 for r in records if r["mask_path"]),
        "binarised_masks": counts["binarised_masks"],
        "metadata_stripped": sum(1 for r in records if r["metadata_stripped"]),
        "boxes_dropped": counts["boxes_dropped"],
        "orphan_masks": c["orphan_masks"], "extra_masks_per_image": c["extra_masks_per_image"],
        "metadata_rows_unmatched": c["metadata_rows_unmatched"], "not_in_layout": c["not_in_layout"],
        "internal_errors": counts["internal_errors"],
        "conservation": {"seen": seen, "ingested_plus_duplicates_plus_quarantined": out, "ok": seen == out},
    }
    if seen != out:
        raise RuntimeError(f"batch {batch['batch_id']}: conservation violated: seen {seen} != {out} "
                           f"(ingested {len(records)} + duplicates {len(duplicates)} + quarantined {len(quarantine)})")
    return summary


# --------------------------------------------------------------------------------------------
# Merge stage


def near_duplicate_clusters(sample_ids: list[str], phashes: list[str], max_distance: int) -> list[str]:
    """Cluster id per sample, for samples given in (batch order, sample_id) order.

    A sample joins the cluster of the *earliest* earlier sample within ``max_distance`` bits
    (Hamming on the 64-bit phash), else starts its own cluster named by its sample_id. A sample's
    cluster depends only on samples before it, so appending a batch never changes an existing
    cluster id (the price: a new image close to two existing clusters joins the earlier one and
    does not merge them). O(n^2/2) vectorised popcounts: fine to ~1e5 samples.
    """
    n = len(sample_ids)
    hashes = np.array([int(h, 16) for h in phashes], dtype=np.uint64) if n else np.zeros(0, np.uint64)
    cluster: list[str] = []
    for i in range(n):
        if i:
            dist = np.bitwise_count(hashes[:i] ^ hashes[i])
            near = np.flatnonzero(dist <= max_distance)
            if near.size:
                cluster.append(cluster[int(near[0])])
                continue
        cluster.append(sample_ids[i])
    return cluster


def run_merge_stage(workspace: Path, params: PipelineParams, item: str | None = None) -> None:
    """DVC stage ``ingest``: merge ingested batches (``params.batches`` order) into ``data/ingest/``."""
    ws = Path(workspace)
    samples: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    duplicates: list[dict[str, Any]] = []
    seen_ids: set[str] = set()
    per_batch: dict[str, dict[str, int]] = {}
    inputs: list[str] = []
    for batch_id in params.batches:
        bdir = ws / BATCHES_DIR / batch_id
        if not (bdir / "summary.json").exists():
            raise FileNotFoundError(f"{bdir}/summary.json not found: run the ingest_batch stage for {batch_id} first")
        inputs += [f"{BATCHES_DIR.as_posix()}/{batch_id}/{n}" for n in
                   ("records.parquet", "quarantine.parquet", "duplicates.parquet", "summary.json")]
        bsum = json.loads((bdir / "summary.json").read_text())
        records = tables.read_rows(bdir / "records.parquet", "samples")
        bquar = tables.read_rows(bdir / "quarantine.parquet", "quarantine")
        bdups = tables.read_rows(bdir / "duplicates.parquet", "duplicates")
        cross = 0
        for r in sorted(records, key=lambda r: r["sample_id"]):
            if r["sample_id"] in seen_ids:
                duplicates.append({"batch_id": batch_id, "name_hash": r["name_hash"], "duplicate_of": r["sample_id"]})
                cross += 1
                continue
            seen_ids.add(r["sample_id"])
            samples.append(r)
        quarantine += bquar
        duplicates += bdups
        stats = {"seen": bsum["seen"], "ingested": len(records) - cross,
                 "duplicates": len(bdups) + cross, "duplicates_within_batch": len(bdups),
                 "duplicates_across_batches": cross, "quarantined": len(bquar)}
        stats["conservation_ok"] = stats["seen"] == stats["ingested"] + stats["duplicates"] + stats["quarantined"]
        if not stats["conservation_ok"]:
            raise RuntimeError(f"ingest merge: conservation violated for batch {batch_id}: {stats}")
        per_batch[batch_id] = stats
    clusters = near_duplicate_clusters([s["sample_id"] for s in samples], [s["phash"] for s in samples],
                                       params.ingest.phash_max_distance)
    for s, c in zip(samples, clusters, strict=True):
        s["near_dup_cluster"] = c
    keys = ("seen", "ingested", "duplicates", "duplicates_within_batch", "duplicates_across_batches", "quarantined")
    total = {k: sum(b[k] for b in per_batch.values()) for k in keys}
    total["conservation_ok"] = total["seen"] == total["ingested"] + total["duplicates"] + total["quarantined"]
    if not total["conservation_ok"]:
        raise RuntimeError(f"ingest merge: conservation violated: {total}")
    out = ws / INGEST_DIR
    tables.write_rows(samples, out / "samples.parquet", tables.SAMPLES, "samples")
    tables.write_rows(quarantine, out / "quarantine.parquet", tables.QUARANTINE, "quarantine")
    tables.write_rows(duplicates, out / "duplicates.parquet", tables.DUPLICATES, "duplicates")
    summary = {
        "batches": per_batch, "total": total,
        "near_duplicate_clusters": len(set(clusters)),
        "samples_in_multi_member_clusters": sum(n for n in Counter(clusters).values() if n > 1),
        "quarantined_by_reason": dict(sorted(Counter(q["reason"] for q in quarantine).items())),
    }
    atomic_write_json(out / "summary.json", summary)
    write_provenance(out, "ingest", ws, inputs, {"batches": list(params.batches),
                                                 "ingest.phash_max_distance": params.ingest.phash_max_distance})
