"""Annotation stage: one hierarchical clinical-cognition row per ingested sample, plus splits.

Reads ``data/ingest/samples.parquet`` and writes ``data/annotate/annotations.parquet`` (schema
:data:`cogalign_core.tables.ANNOTATIONS`), ``rejects.parquet`` and ``summary.json``.

Each level's value carries its provenance: ``dataset_label`` (the source's class or dataset label
mapped through :mod:`cogalign_core.taxonomy`), ``derived_from_mask`` (lesion count / relative size
from the ground-truth mask) or ``clinician`` (a clinician CSV, which overrides).

Splits are assigned per *group*, never per image: samples sharing a dataset sequence/patient or a
near-duplicate cluster form one group (union-find), and the group's split is a salted hash of its
key, so adding a batch never moves an existing sample. ``role: test`` batches always land in
``external_test``.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cogalign_core import answer_format, contract, tables, taxonomy
from cogalign_core.config import PipelineParams
from cogalign_core.config.annotate import SplitParams
from cogalign_core.io import atomic_write_json
from cogalign_core.provenance import write_provenance

OUT_DIR = Path(contract.ANNOTATE)


def split_path(split: str) -> Path:
    """Workspace-relative path of one split's annotation table (same schema as annotations.parquet)."""
    return Path(contract.annotation_split(split))


def write_annotation_tables(rows: list[dict[str, Any]], workspace: Path) -> None:
    """Write ``annotations.parquet`` and one table per split (same schema).

    Training stages depend on their split's file only, so adding an external test batch does not
    make DVC retrain (image paths are content-addressed, so a split table changes exactly when
    its images do).
    """
    out = Path(workspace) / OUT_DIR
    tables.write_rows(rows, out / "annotations.parquet", tables.ANNOTATIONS, "annotations")
    for split in tables.SPLITS:
        tables.write_rows([r for r in rows if r["split"] == split], Path(workspace) / split_path(split),
                          tables.ANNOTATIONS, "annotations")


SAMPLES = Path(contract.SAMPLES)
# Components smaller than this fraction of the frame are mask noise, not lesions.
MIN_COMPONENT_FRACTION = 0.0005
CLINICIAN_LEVEL_COLUMNS = ("location", "morphology", "microvascular", "diagnosis")
CLINICIAN_CSV_HEADER = ",".join(("sample_id", *CLINICIAN_LEVEL_COLUMNS, "paris")) + "\n"


@dataclass(frozen=True)
class MaskFacts:
    """What a binary lesion mask says: component count, area fraction, boxes, frame region."""

    lesion_count: int
    area_fraction: float
    boxes: list[dict[str, int]]
    frame_region: str


def mask_facts(mask: np.ndarray) -> MaskFacts:
    """Describe a lesion mask.

    Args:
        mask: (H, W) uint8, nonzero = lesion, in the stored image's pixel frame.

    Returns:
        Components of at least :data:`MIN_COMPONENT_FRACTION` of the frame, their inclusive
        boxes (origin top-left), the lesion area fraction and the 3x3 frame region of the lesion
        centroid (``center``, ``upper left``, ...; ``none`` without a lesion).
    """
    import cv2

    binary = (mask > 0).astype(np.uint8)
    h, w = binary.shape
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    min_area = max(1, int(MIN_COMPONENT_FRACTION * h * w))
    keep = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= min_area]
    boxes = []
    for i in keep:
        x, y, bw, bh = (int(v) for v in stats[i, :4])
        boxes.append({"xmin": x, "ymin": y, "xmax": x + bw - 1, "ymax": y + bh - 1})
    area = float(sum(int(stats[i, cv2.CC_STAT_AREA]) for i in keep)) / float(h * w)
    if not keep:
        return MaskFacts(0, 0.0, [], "none")
    ys, xs = np.nonzero(np.isin(labels, keep))
    return MaskFacts(len(keep), area, boxes, frame_region(float(xs.mean()) / w, float(ys.mean()) / h))


def frame_region(cx: float, cy: float) -> str:
    """3x3 region name of a point given as fractions of width/height (origin top-left)."""
    col = ("left", "", "right")[min(2, int(cx * 3))]
    row = ("upper", "", "lower")[min(2, int(cy * 3))]
    name = " ".join(p for p in (row, col) if p)
    return name or "center"


def boxes_facts(boxes: list[dict[str, int]], width: int, height: int) -> MaskFacts:
    """Fallback description from source boxes when there is no mask (area = union-free box sum)."""
    if not boxes:
        return MaskFacts(0, 0.0, [], "none")
    area = sum((b["xmax"] - b["xmin"] + 1) * (b["ymax"] - b["ymin"] + 1) for b in boxes) / float(width * height)
    cx = sum((b["xmin"] + b["xmax"]) / 2 for b in boxes) / len(boxes) / width
    cy = sum((b["ymin"] + b["ymax"]) / 2 for b in boxes) / len(boxes) / height
    return MaskFacts(len(boxes), min(1.0, area), boxes, frame_region(cx, cy))


# ---------------------------------------------------------------------------------------- splits


class _UnionFind:
    """Union-find whose root is always the earliest member by ``order``."""

    def __init__(self, order: dict[str, tuple[int, str]]) -> None:
        self.parent: dict[str, str] = {}
        self.order = order

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The earlier-registered root wins, so existing group keys survive new batches.
            self.parent[max(ra, rb, key=self.order.__getitem__)] = min(ra, rb, key=self.order.__getitem__)


def group_keys(samples: list[dict[str, Any]], batch_order: dict[str, int]) -> dict[str, str]:
    """Group key per sample_id: the base key of the group's earliest-registered member.

    A sample's base key is ``dataset|seq:<hashed sequence/patient>`` when the source gives one,
    else ``dataset|dup:<near-duplicate cluster>``. Samples sharing a sequence/patient or a
    near-duplicate cluster are unioned into one group.
    """
    order = {s["sample_id"]: (batch_order.get(s["batch_id"], 1 << 30), s["sample_id"]) for s in samples}
    uf = _UnionFind(order)
    by_base: dict[str, str] = {}
    by_cluster: dict[str, str] = {}
    for s in sorted(samples, key=lambda r: order[r["sample_id"]]):
        sid = s["sample_id"]
        uf.find(sid)
        base = _base_key(s)
        if base in by_base:
            uf.union(by_base[base], sid)
        else:
            by_base[base] = sid
        cluster = s.get("near_dup_cluster") or sid
        if cluster in by_cluster:
            uf.union(by_cluster[cluster], sid)
        else:
            by_cluster[cluster] = sid
    base_of = {s["sample_id"]: _base_key(s) for s in samples}
    return {sid: base_of[uf.find(sid)] for sid in base_of}


def _base_key(sample: dict[str, Any]) -> str:
    if sample.get("group_id_hash"):
        return f"{sample['dataset']}|seq:{sample['group_id_hash']}"
    return f"{sample['dataset']}|dup:{sample.get('near_dup_cluster') or sample['sample_id']}"


def split_for(group_key: str, diagnosis: str, split: SplitParams) -> str:
    """Deterministic split of a group: a salted hash mapped onto the train/val/test fractions.

    The diagnosis stratum is part of the hashed key, so each stratum's groups are split by the
    same fractions independently (stratified in expectation) while a group's split never depends
    on which other groups exist.
    """
    digest = hashlib.sha256(f"{split.salt}|{diagnosis}|{group_key}".encode()).hexdigest()
    u = int(digest[:15], 16) / float(16**15)
    if u < split.train:
        return "train"
    if u < split.train + split.val:
        return "val"
    return "test"


# ----------------------------------------------------------------------------------- clinician


def read_clinician_csv(path: Path, known_ids: set[str]) -> tuple[dict[str, dict[str, str]], list[dict[str, Any]]]:
    """Parse a clinician label CSV into per-sample overrides and rejects (with reasons).

    Columns: ``sample_id`` plus any of ``location, morphology, microvascular, diagnosis, paris``
    (``paris`` like ``0-Is`` maps to the morphology term ``paris 0-is``). Empty cells mean "no
    opinion". Every level value must be a taxonomy term.
    """
    overrides: dict[str, dict[str, str]] = {}
    rejects: list[dict[str, Any]] = []

    def reject(row: int, sid: str | None, reason: str, detail: str) -> None:
        rejects.append({"source": "clinician_csv", "row": row, "sample_id": sid, "reason": reason, "detail": detail})

    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reject(0, None, "unreadable_file", f"{type(exc).__name__}: {exc}")
        return overrides, rejects
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or "sample_id" not in reader.fieldnames:
        reject(0, None, "missing_column", "the clinician CSV needs a sample_id column")
        return overrides, rejects
    for i, row in enumerate(reader, start=1):
        if None in row or any(v is None for v in row.values()):
            reject(i, row.get("sample_id"), "malformed_row", "wrong number of fields")
            continue
        sid = (row.get("sample_id") or "").strip()
        if sid not in known_ids:
            reject(i, sid or None, "unknown_sample", "sample_id not in the ingested samples")
            continue
        values: dict[str, str] = {}
        bad = False
        for level in CLINICIAN_LEVEL_COLUMNS:
            raw = (row.get(level) or "").strip()
            if raw:
                term = taxonomy.normalise_term(raw)
                if not taxonomy.is_term(level, term):
                    reject(i, sid, f"unknown_term:{level}", raw)
                    bad = True
                values[level] = term
        paris = (row.get("paris") or "").strip()
        if paris:
            term = taxonomy.normalise_term(f"paris {paris.lower().removeprefix('paris').strip()}")
            if term not in taxonomy.PARIS_TERMS:
                reject(i, sid, "unknown_term:paris", paris)
                bad = True
            values["morphology"] = term
        if bad:
            continue
        if not values:
            reject(i, sid, "empty_row", "no level given")
            continue
        overrides.setdefault(sid, {}).update(values)
    return overrides, rejects


# --------------------------------------------------------------------------------------- stage


def annotate_samples(samples: list[dict[str, Any]], workspace: Path, params: PipelineParams,
                     clinician: dict[str, dict[str, str]] | None = None
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Build annotation rows (sorted by sample_id) and rejects for ingested samples."""
    clinician = clinician or {}
    batch_order = {b: i for i, b in enumerate(params.batches)}
    keys = group_keys(samples, batch_order)
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for s in sorted(samples, key=lambda r: r["sample_id"]):
        sid = s["sample_id"]
        label = taxonomy.label_for(s["dataset"], s.get("class_label"), s.get("kvasir_sessile"))
        override = clinician.get(sid, {})
        if label is None and "diagnosis" not in override:
            rejects.append({"source": "dataset_label", "row": None, "sample_id": sid, "reason": "unmapped_label",
                            "detail": f"dataset={s['dataset']} class_label={s.get('class_label')!r}"})
            continue
        facts = _facts(s, workspace)
        values: dict[str, tuple[str, str]] = {}
        if label is not None:
            values["location"] = (label.location or taxonomy.NOT_ASSESSABLE, "dataset_label")
            values["microvascular"] = (label.microvascular or taxonomy.NOT_ASSESSABLE, "dataset_label")
            values["diagnosis"] = (label.diagnosis, "dataset_label")
            if label.morphology is not None:
                values["morphology"] = (label.morphology, "dataset_label")
            elif s.get("mask_path"):
                values["morphology"] = (taxonomy.morphology_from_mask(facts.lesion_count, facts.area_fraction),
                                        "derived_from_mask")
            else:
                values["morphology"] = (taxonomy.NOT_ASSESSABLE, "dataset_label")
        for level, term in override.items():
            values[level] = (term, "clinician")
        for level in taxonomy.LEVELS:
            values.setdefault(level, (taxonomy.NOT_ASSESSABLE, "clinician"))
        diagnosis = values["diagnosis"][0]
        group_key = keys[sid]
        role = s.get("role") or "train"
        split = "external_test" if role == "test" else split_for(group_key, diagnosis, params.annotate.split)
        row = {
            "sample_id": sid, "dataset": s["dataset"], "batch_id": s["batch_id"], "role": role, "split": split,
            "group_key": hashlib.sha256(group_key.encode()).hexdigest()[:16],
            "image_path": s["image_path"], "width": s["width"], "height": s["height"],
            "mask_path": s.get("mask_path"), "boxes": facts.boxes, "lesion_count": facts.lesion_count,
            "lesion_area_fraction": facts.area_fraction, "frame_region": facts.frame_region,
        }
        for level in taxonomy.LEVELS:
            row[level], row[f"{level}_source"] = values[level]
        row["answer"] = answer_format.render_answer({lv: values[lv][0] for lv in taxonomy.LEVELS})
        rows.append(row)
    return rows, rejects


def _facts(sample: dict[str, Any], workspace: Path) -> MaskFacts:
    if sample.get("mask_path"):
        with Image.open(workspace / sample["mask_path"]) as im:
            return mask_facts(np.asarray(im.convert("L")))
    return boxes_facts(list(sample.get("boxes") or []), int(sample["width"]), int(sample["height"]))


def run_stage(workspace: Path, params: PipelineParams, item: str | None = None) -> None:
    """DVC stage ``annotate``: samples.parquet (+ clinician CSV) -> annotations.parquet."""
    samples = tables.read_rows(workspace / SAMPLES, "samples")
    clinician: dict[str, dict[str, str]] = {}
    clinician_rejects: list[dict[str, Any]] = []
    inputs = [str(SAMPLES)]
    if params.annotate.clinician_csv:
        path = workspace / params.annotate.clinician_csv
        inputs.append(params.annotate.clinician_csv)
        if path.exists():
            clinician, clinician_rejects = read_clinician_csv(path, {s["sample_id"] for s in samples})
        else:
            clinician_rejects = [{"source": "clinician_csv", "row": 0, "sample_id": None, "reason": "missing_file",
                                  "detail": params.annotate.clinician_csv}]
    rows, rejects = annotate_samples(samples, workspace, params, clinician)
    rejects = clinician_rejects + rejects
    out = workspace / OUT_DIR
    write_annotation_tables(rows, workspace)
    tables.write_rows(rejects, out / "rejects.parquet", tables.ANNOTATION_REJECTS, "annotation_rejects")
    unlabelled = sum(1 for r in rejects if r["source"] == "dataset_label")
    if len(rows) + unlabelled != len(samples):
        raise AssertionError(f"annotate conservation broken: {len(samples)} in, {len(rows)} + {unlabelled} out")
    by_split = Counter(r["split"] for r in rows)
    by_split_diag: dict[str, Counter[str]] = defaultdict(Counter)
    for r in rows:
        by_split_diag[r["diagnosis"]][r["split"]] += 1
    atomic_write_json(out / "summary.json", {
        "samples_in": len(samples),
        "annotated": len(rows),
        "rejected_unlabelled": unlabelled,
        "clinician_rows_rejected": len(clinician_rejects),
        "clinician_overrides": len(clinician),
        "groups": len({r["group_key"] for r in rows}),
        "split_counts": dict(sorted(by_split.items())),
        "split_counts_by_diagnosis": {d: dict(sorted(c.items())) for d, c in sorted(by_split_diag.items())},
        "taxonomy_version": taxonomy.TAXONOMY_VERSION,
    })
    write_provenance(out, "annotate", workspace, inputs,
                     {"annotate": params.annotate.model_dump(mode="json"), "batches": params.batches})
