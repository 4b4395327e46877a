"""Review round trip: export the samples that need a clinician's prompt, import their corrections.

``export_review`` writes ``data/masks/review.parquet`` as a task file (CSV or JSON by suffix): the
image path, the reason, the current boxes/mask, and empty columns ``boxes``, ``points``, ``mask_path``,
``note`` for the clinician. ``import_review`` validates a filled-in file and merges the corrections
into ``data/review/clinician_prompts.parquet`` (:data:`CLINICIAN_PROMPTS`, provenance ``clinician``);
corrected masks are normalised to {0, 255} PNGs and stored content-addressed under
``data/review/masks/``. Both paths are DVC dependencies of the mask stage, which then uses the
clinician's prompt for those samples (clinician mask > clinician boxes/points > everything else).

Formats (pixel frame of the stored image, origin top-left, inclusive boxes):
``boxes`` = JSON ``[[xmin, ymin, xmax, ymax], ...]``; ``points`` = JSON ``[[x, y, label], ...]`` with
label 1 = lesion, 0 = background; ``mask_path`` = a mask image (absolute, relative to the task file, or
workspace-relative). Bad rows are rejected with a reason (returned and written to
``data/review/last_import.json``), never a crash.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from cogalign_core import contract, io, tables

REVIEW_DIR = Path(contract.REVIEW)
PROMPTS_PATH = Path(contract.CLINICIAN_PROMPTS)
CLINICIAN_MASK_DIR = Path(contract.CLINICIAN_MASKS)
IMPORT_REPORT = Path(contract.REVIEW_IMPORT_REPORT)

POINT = pa.struct([("x", pa.int32()), ("y", pa.int32()), ("label", pa.int8())])

CLINICIAN_PROMPTS = pa.schema([
    ("sample_id", pa.string()),
    ("boxes", pa.list_(tables.BOX)),   # pixel frame, inclusive
    ("points", pa.list_(POINT)),       # label 1 = lesion, 0 = background
    ("mask_path", pa.string()),        # workspace-relative, under data/review/masks/, {0,255} PNG
    ("mask_sha256", pa.string()),
    ("provenance", tables.enum()),     # always "clinician"
    ("note", pa.string()),
    ("import_sha256", pa.string()),    # SHA-256 of the task file the row came from
])

TASK_COLUMNS: tuple[str, ...] = (
    "sample_id", "image_path", "image_file", "width", "height", "reason", "detail",
    "current_boxes", "current_mask_path", "boxes", "points", "mask_path", "note",
)
IMPORT_REJECT_REASONS: tuple[str, ...] = (
    "missing_sample_id", "unknown_sample", "duplicate_sample", "no_correction", "bad_boxes", "box_out_of_frame",
    "bad_points", "point_out_of_frame", "mask_not_found", "mask_unreadable", "mask_size_mismatch", "mask_empty",
)


@dataclass
class ImportReport:
    """Outcome of an import: accepted sample ids and rejected rows ``{row, sample_id, reason, detail}``."""

    accepted: list[str] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


class RowError(ValueError):
    """A task-file row that cannot be imported; ``reason`` is one of IMPORT_REJECT_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def read_clinician_prompts(path: Path) -> dict[str, dict[str, Any]]:
    """``sample_id -> row`` of the clinician prompt table; empty when the file does not exist."""
    if not path.exists():
        return {}
    return {r["sample_id"]: r for r in tables.read_rows(path, "clinician_prompts")}


def ensure_prompts_file(workspace: Path) -> Path:
    """Create an empty clinician prompt table if none exists (so DVC can depend on it from the start)."""
    path = Path(workspace) / PROMPTS_PATH
    if not path.exists():
        tables.write_rows([], path, CLINICIAN_PROMPTS, "clinician_prompts")
    (Path(workspace) / CLINICIAN_MASK_DIR).mkdir(parents=True, exist_ok=True)
    return path


def export_review(workspace: Path, out: Path) -> int:
    """Write the review queue as a task file (``.csv`` or ``.json`` by suffix); return the row count."""
    ws = Path(workspace).resolve()
    rows = tables.read_rows(ws / contract.MASK_REVIEW, "mask_review")
    tasks = []
    for r in rows:
        tasks.append({
            "sample_id": r["sample_id"],
            "image_path": r["image_path"],
            "image_file": str(ws / r["image_path"]),
            "width": r["width"], "height": r["height"],
            "reason": r["reason"], "detail": r["detail"] or "",
            "current_boxes": json.dumps([[b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for b in r["boxes"] or []]),
            "current_mask_path": r["mask_path"] or "",
            "boxes": "", "points": "", "mask_path": "", "note": "",
        })
    out = Path(out)
    if out.suffix.lower() == ".json":
        io.atomic_write_json(out, tasks)
    elif out.suffix.lower() == ".csv":
        with io.atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(TASK_COLUMNS))
            writer.writeheader()
            writer.writerows(tasks)
    else:
        raise ValueError(f"{out}: review task file must end in .csv or .json")
    return len(tasks)


def import_review(workspace: Path, file: Path) -> int:
    """Import a filled-in task file; return the number of samples whose prompts were stored.

    Rejected rows are listed in ``data/review/last_import.json`` (see :func:`import_review_report`).
    """
    return len(import_review_report(workspace, file).accepted)


def import_review_report(workspace: Path, file: Path) -> ImportReport:
    """Validate every row of ``file``, merge the good ones into the clinician prompt table."""
    ws = Path(workspace).resolve()
    file = Path(file).resolve()
    raw_rows = _read_task_file(file)
    frames = {a["sample_id"]: (a["width"], a["height"])
              for a in tables.read_rows(ws / contract.ANNOTATIONS, "annotations")}
    import_sha = io.sha256_file(file)
    report = ImportReport()
    new: dict[str, dict[str, Any]] = {}
    for i, raw in enumerate(raw_rows, start=1):
        sid = str(raw.get("sample_id") or "").strip()
        try:
            if not sid:
                raise RowError("missing_sample_id", "row has no sample_id")
            if sid not in frames:
                raise RowError("unknown_sample", f"{sid} is not in annotations.parquet")
            if sid in new:
                raise RowError("duplicate_sample", f"{sid} appears more than once in {file.name}")
            new[sid] = _validate_row(raw, frames[sid], ws, file.parent, sid, import_sha)
            report.accepted.append(sid)
        except RowError as e:
            report.rejected.append({"row": i, "sample_id": sid or None, "reason": e.reason, "detail": e.detail})
    path = ws / PROMPTS_PATH
    merged = read_clinician_prompts(path)
    merged.update(new)
    tables.write_rows([merged[k] for k in sorted(merged)], path, CLINICIAN_PROMPTS, "clinician_prompts")
    (ws / CLINICIAN_MASK_DIR).mkdir(parents=True, exist_ok=True)
    io.atomic_write_json(ws / IMPORT_REPORT, {"file_sha256": import_sha, "rows": len(raw_rows),
                                               "accepted": report.accepted, "rejected": report.rejected})
    return report


def _read_task_file(file: Path) -> list[dict[str, Any]]:
    if file.suffix.lower() == ".json":
        data = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{file}: expected a JSON list of task objects")
        return [d if isinstance(d, dict) else {} for d in data]
    if file.suffix.lower() == ".csv":
        with open(file, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"{file}: review task file must end in .csv or .json")


def _json_list(value: Any, reason: str) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(reason, f"not JSON: {value!r}") from e
    if not isinstance(value, list):
        raise RowError(reason, f"expected a list, got {value!r}")
    return value


def _ints(item: Any, n: int, reason: str) -> list[int]:
    if isinstance(item, dict):
        item = [item.get(k) for k in (("xmin", "ymin", "xmax", "ymax") if n == 4 else ("x", "y", "label"))]
    if not isinstance(item, list) or len(item) != n:
        raise RowError(reason, f"expected {n} integers, got {item!r}")
    try:
        vals = [int(v) for v in item]
    except (TypeError, ValueError) as e:
        raise RowError(reason, f"expected integers, got {item!r}") from e
    if any(float(v) != int(v) for v in item):
        raise RowError(reason, f"expected integers, got {item!r}")
    return vals


def _validate_row(raw: dict[str, Any], frame: tuple[int, int], ws: Path, base: Path, sid: str,
                  import_sha: str) -> dict[str, Any]:
    w, h = frame
    boxes = []
    for b in _json_list(raw.get("boxes"), "bad_boxes"):
        x0, y0, x1, y1 = _ints(b, 4, "bad_boxes")
        if not (0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h):
            raise RowError("box_out_of_frame", f"{[x0, y0, x1, y1]} outside {w}x{h} or inverted")
        boxes.append({"xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1})
    points = []
    for p in _json_list(raw.get("points"), "bad_points"):
        x, y, label = _ints(p, 3, "bad_points")
        if label not in (0, 1):
            raise RowError("bad_points", f"label must be 0 or 1, got {label}")
        if not (0 <= x < w and 0 <= y < h):
            raise RowError("point_out_of_frame", f"({x}, {y}) outside {w}x{h}")
        points.append({"x": x, "y": y, "label": label})
    mask_rel = mask_sha = None
    mask_value = str(raw.get("mask_path") or "").strip()
    if mask_value:
        mask_rel, mask_sha = _store_clinician_mask(mask_value, (h, w), ws, base)
    if not boxes and not points and not mask_rel:
        raise RowError("no_correction", "no boxes, points or mask_path given")
    return {"sample_id": sid, "boxes": boxes, "points": points, "mask_path": mask_rel, "mask_sha256": mask_sha,
            "provenance": "clinician", "note": str(raw.get("note") or "") or None, "import_sha256": import_sha}


def _store_clinician_mask(value: str, shape: tuple[int, int], ws: Path, base: Path) -> tuple[str, str]:
    from cogalign_core.mask_codec import encode_mask_png
    from cogalign_core.segmenters.ground_truth import MaskProblem, load_mask

    candidate = Path(value)
    options = [candidate] if candidate.is_absolute() else [base / candidate, ws / candidate]
    found = next((p for p in options if p.is_file()), None)
    if found is None:
        raise RowError("mask_not_found", f"{value}: no such file")
    try:
        mask = load_mask(found, shape, "clinician")
    except MaskProblem as e:
        raise RowError(e.reason.removeprefix("clinician_"), e.detail) from e
    path, digest = io.store_content_addressed(ws / CLINICIAN_MASK_DIR, encode_mask_png(mask), ".png")
    return path.relative_to(ws).as_posix(), digest
