"""Mask stage: one accepted lesion mask per lesion image, measured, or a review-queue entry with a reason.

Input: ``data/annotate/annotations.parquet`` and (optional) ``data/review/clinician_prompts.parquet``
(written by :func:`cogalign_core.review.import_review`). Output under ``data/masks/``:

- ``<h2>/<sha256>.png``: content-addressed masks, single-channel {0, 255}, same size as the image;
- ``masks.parquet`` (:data:`MASKS`): one row per annotated sample, ``status`` in
  {accepted, review, no_lesion}; ``in = accepted + review + no_lesion`` (see ``summary.json``);
- ``review.parquet`` (:data:`REVIEW`): one row per ``review`` sample with a machine-readable reason;
- ``qc.json``: Dice/IoU of every segmenter vs ground truth and vs the ``box_ellipse`` baseline, per dataset;
- ``summary.json`` (counts) and ``provenance.json``.

Which mask is accepted, in order: a clinician-drawn mask; the ground-truth mask (``masks.use_ground_truth``);
the ``masks.segmenter`` output on the prompts. Prompts, in order: clinician boxes/points; the dataset's
boxes; boxes of the ground-truth mask's components. A lesion sample with no prompt goes to review.
Samples labelled normal without any mask or prompt are ``no_lesion`` (nothing to segment).

Coordinates: pixel frame of the stored image, origin top-left; boxes inclusive. (Over 400 lines: the
schemas, acceptance order and QC gates change together; segmenters and mask encoding are modules of their own.)
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from cogalign_core import accounting, contract, io, reuse, tables, taxonomy
from cogalign_core.config import PipelineParams
from cogalign_core.config.masks import MaskParams
from cogalign_core.executor import map_items
from cogalign_core.mask_codec import encode_mask_png
from cogalign_core.provenance import write_provenance
from cogalign_core.review import read_clinician_prompts
from cogalign_core.segmenters import BASELINE, Prompt, PromptNeedsBox, build_segmenter
from cogalign_core.segmenters import quality as q
from cogalign_core.segmenters.base import clip_box
from cogalign_core.segmenters.ground_truth import MaskProblem, load_mask
from cogalign_core.settings import load_settings

log = logging.getLogger(__name__)

STAGE = "masks"
OUT_DIR = Path(contract.MASKS)
ANNOTATIONS_PATH = Path(contract.ANNOTATIONS)
MASKS_FILE = Path(contract.MASKS_TABLE).name
REVIEW_FILE = Path(contract.MASK_REVIEW).name

STATUSES: tuple[str, ...] = ("accepted", "review", "no_lesion")
SOURCES: tuple[str, ...] = ("clinician", "ground_truth", "sam", "box_ellipse", "grabcut")
PROMPT_SOURCES: tuple[str, ...] = ("clinician", "dataset_box", "gt_mask_box")
REVIEW_REASONS: tuple[str, ...] = (
    "no_prompt", "prompt_needs_sam", "image_unreadable",
    "gt_mask_unreadable", "gt_mask_size_mismatch", "gt_mask_empty",
    "clinician_mask_unreadable", "clinician_mask_size_mismatch", "clinician_mask_empty",
    "mask_empty", "mask_too_large", "mask_too_small", "too_many_components",
    "low_sam_score", "low_prompt_agreement", "low_dice_vs_gt",
)

SEGMENTER_QC = pa.struct([
    ("segmenter", pa.string()),
    ("dice_vs_gt", pa.float32()),
    ("iou_vs_gt", pa.float32()),
    ("dice_vs_baseline", pa.float32()),
    ("iou_vs_baseline", pa.float32()),
    ("area_fraction", pa.float32()),
    ("component_count", pa.int32()),
    ("score", pa.float32()),
])

MASKS = pa.schema([
    ("sample_id", pa.string()),
    ("dataset", tables.enum()),
    ("split", tables.enum()),
    ("image_path", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("status", tables.enum()),            # STATUSES
    ("source", tables.enum()),            # SOURCES: where the (current) mask came from; null when none
    ("mask_path", pa.string()),           # accepted (or, for review rows, current candidate) mask; may be null
    ("mask_sha256", pa.string()),
    ("prompt_source", tables.enum()),     # PROMPT_SOURCES, null when no prompt
    ("prompt_json", pa.string()),         # JSON list of {"box": [x0,y0,x1,y1] | null, "points": [[x,y,label]]}
    ("n_prompts", pa.int32()),
    ("score", pa.float32()),              # SAM mean predicted IoU when sam made the mask
    ("area_fraction", pa.float32()),
    ("component_count", pa.int32()),
    ("touches_border", pa.bool_()),
    ("mask_box", tables.BOX),             # inclusive box of the mask, pixel frame
    ("centroid_x", pa.float32()),         # mask centroid / width, in [0, 1]
    ("centroid_y", pa.float32()),         # mask centroid / height, in [0, 1]
    ("dice_vs_gt", pa.float32()),         # of the accepted mask; null without ground truth
    ("iou_vs_gt", pa.float32()),
    ("dice_vs_baseline", pa.float32()),   # vs box_ellipse on the same prompts; null without prompts
    ("iou_vs_baseline", pa.float32()),
    ("segmenter_qc", pa.list_(SEGMENTER_QC)),
    ("review_reason", tables.enum()),     # REVIEW_REASONS, null when accepted
])

REVIEW = pa.schema([
    ("sample_id", pa.string()),
    ("dataset", tables.enum()),
    ("image_path", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("reason", tables.enum()),            # REVIEW_REASONS
    ("detail", pa.string()),
    ("boxes", pa.list_(tables.BOX)),      # current prompt boxes, pixel frame, inclusive
    ("mask_path", pa.string()),           # current candidate mask, if any
    ("mask_sha256", pa.string()),
])


@dataclass
class SampleTask:
    """Everything the per-image worker needs (picklable). Paths are absolute."""

    sample_id: str
    image_path: str
    gt_mask_path: str | None
    dataset_boxes: list[tuple[int, int, int, int]]
    clinician_boxes: list[tuple[int, int, int, int]]
    clinician_points: list[tuple[int, int, int]]
    clinician_mask_path: str | None
    params: dict[str, Any]
    run_qc: bool = True  # also run the QC-only segmenters (in the seeded QC subset)
    identity: dict[str, Any] = field(default_factory=dict)  # what the sample's row depends on (reuse key)


@dataclass
class SampleMasks:
    """Worker output: masks are bool ``(H, W)`` arrays in the image's pixel frame."""

    sample_id: str
    shape: tuple[int, int] | None = None
    gt: np.ndarray | None = None
    gt_problem: MaskProblem | None = None
    clinician_mask: np.ndarray | None = None
    clinician_problem: MaskProblem | None = None
    prompts: list[Prompt] = field(default_factory=list)
    prompt_source: str | None = None
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    scores: dict[str, float | None] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    image_error: str | None = None


def load_rgb(path: str | Path) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)`` of an image file."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def build_prompts(task: SampleTask, shape: tuple[int, int], gt: np.ndarray | None) -> tuple[list[Prompt], str | None]:
    """Prompts in priority order (clinician > dataset boxes > ground-truth component boxes)."""
    h, w = shape
    if task.clinician_boxes or task.clinician_points:
        boxes = [clip_box(b, w, h) for b in task.clinician_boxes]
        points = tuple(task.clinician_points)
        if not boxes:
            return [Prompt(None, points)], "clinician"
        # Points refine the first box; further boxes stand alone.
        return [Prompt(boxes[0], points)] + [Prompt(b) for b in boxes[1:]], "clinician"
    valid = [clip_box(b, w, h) for b in task.dataset_boxes if b[0] <= b[2] and b[1] <= b[3]]
    if valid:
        return [Prompt(b) for b in valid], "dataset_box"
    if gt is not None:
        boxes = q.component_boxes(gt)
        if boxes:
            return [Prompt(b) for b in boxes], "gt_mask_box"
    return [], None


def segment_sample_cpu(task: SampleTask) -> SampleMasks:
    """Per-image worker: load image and stored masks, build prompts, run the CPU segmenters."""
    out = SampleMasks(task.sample_id)
    try:
        image = load_rgb(task.image_path)
    except (OSError, ValueError) as e:
        out.image_error = f"{Path(task.image_path).name}: {e}"
        return out
    out.shape = image.shape[:2]
    if task.gt_mask_path:
        try:
            out.gt = load_mask(task.gt_mask_path, out.shape, "gt")
        except MaskProblem as e:
            out.gt_problem = e
    if task.clinician_mask_path:
        try:
            out.clinician_mask = load_mask(task.clinician_mask_path, out.shape, "clinician")
        except MaskProblem as e:
            out.clinician_problem = e
    out.prompts, out.prompt_source = build_prompts(task, out.shape, out.gt)
    if not out.prompts:
        return out
    params = MaskParams.model_validate(task.params)
    for name in [n for n in _needed_segmenters(params, out.gt is not None and task.run_qc) if n != "sam"]:
        try:
            result = build_segmenter(name, params).segment(image, out.prompts)
        except PromptNeedsBox as e:
            out.errors[name] = str(e)
            continue
        out.masks[name] = result.mask
        out.scores[name] = result.score
    return out


def _needed_segmenters(params: MaskParams, has_gt: bool) -> list[str]:
    names = [params.segmenter, BASELINE]
    if has_gt:
        names += list(params.qc_segmenters)
    return list(dict.fromkeys(names))


def _sam_pass(workspace: Path, params: MaskParams, tasks: list[SampleTask], results: list[SampleMasks]) -> None:
    """Run SAM (one model, batched) in this process for the samples that need it."""
    todo = [(t, r) for t, r in zip(tasks, results, strict=True)
            if r.prompts and "sam" in _needed_segmenters(params, r.gt is not None and t.run_qc)]
    if not todo:
        return
    segmenter = build_segmenter("sam", params, workspace)  # raises naming masks.sam.checkpoint
    step = load_settings().sam_batch_size
    for start in range(0, len(todo), step):
        chunk = todo[start:start + step]
        images = [load_rgb(t.image_path) for t, _ in chunk]
        outs = segmenter.segment_batch(images, [r.prompts for _, r in chunk])  # type: ignore[attr-defined]
        for (_, r), o in zip(chunk, outs, strict=True):
            r.masks["sam"], r.scores["sam"] = o.mask, o.score


def _segmenter_qc(r: SampleMasks) -> list[dict[str, Any]]:
    base = r.masks.get(BASELINE)
    rows = []
    for name in sorted(r.masks):
        m = r.masks[name]
        rows.append({
            "segmenter": name,
            "dice_vs_gt": q.dice(m, r.gt) if r.gt is not None else None,
            "iou_vs_gt": q.iou(m, r.gt) if r.gt is not None else None,
            "dice_vs_baseline": q.dice(m, base) if base is not None else None,
            "iou_vs_baseline": q.iou(m, base) if base is not None else None,
            "area_fraction": q.area_fraction(m),
            "component_count": q.component_count(m),
            "score": r.scores.get(name),
        })
    return rows


def _qc_reason(mask: np.ndarray, source: str, r: SampleMasks, qc: Any) -> tuple[str, str] | None:
    area = q.area_fraction(mask)
    if area == 0:
        return "mask_empty", f"{source} mask has no foreground"
    if area > qc.max_area_fraction:
        return "mask_too_large", f"area fraction {area:.3f} > {qc.max_area_fraction}"
    if area < qc.min_area_fraction:
        return "mask_too_small", f"area fraction {area:.5f} < {qc.min_area_fraction}"
    comps = q.component_count(mask)
    if comps > qc.max_components:
        return "too_many_components", f"{comps} components > {qc.max_components}"
    if source == "sam" and (r.scores.get("sam") or 0.0) < qc.min_sam_score:
        return "low_sam_score", f"predicted IoU {r.scores.get('sam')} < {qc.min_sam_score}"
    if source in ("sam", "box_ellipse", "grabcut"):
        boxes = [p.box for p in r.prompts if p.box is not None]
        cov = q.box_coverage(mask, boxes)
        if cov < qc.min_box_coverage:
            return "low_prompt_agreement", f"mask covers {cov:.3f} of its prompt boxes < {qc.min_box_coverage}"
    if r.gt is not None and source not in ("ground_truth", "clinician"):
        d = q.dice(mask, r.gt)
        if d < qc.min_dice_vs_gt:
            return "low_dice_vs_gt", f"Dice {d:.3f} vs ground truth < {qc.min_dice_vs_gt}"
    return None


def finalize_sample(ann: dict[str, Any], r: SampleMasks, params: MaskParams, out_dir: Path,
                    workspace: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Choose the accepted mask, run QC gates, store the mask PNG; return (masks row, review row or None)."""
    row: dict[str, Any] = {k: ann.get(k) for k in ("sample_id", "dataset", "split", "image_path", "width", "height")}
    row.update(prompt_source=r.prompt_source, n_prompts=len(r.prompts),
               prompt_json=json.dumps([p.to_json() for p in r.prompts], sort_keys=True))
    reason: tuple[str, str] | None = None
    mask: np.ndarray | None = None
    source: str | None = None
    if r.image_error is not None:
        reason = ("image_unreadable", r.image_error)
    elif r.clinician_mask is not None:
        mask, source = r.clinician_mask, "clinician"
    elif r.gt is not None and params.use_ground_truth:
        mask, source = r.gt, "ground_truth"
    elif params.segmenter in r.masks:
        mask, source = r.masks[params.segmenter], params.segmenter
    if r.image_error is None:
        if mask is not None:
            reason = _qc_reason(mask, source or "", r, params.qc)
        elif r.clinician_problem is not None:
            reason = (r.clinician_problem.reason, r.clinician_problem.detail)
        elif r.gt_problem is not None and not r.prompts:
            reason = (r.gt_problem.reason, r.gt_problem.detail)
        elif params.segmenter in r.errors:
            reason = ("prompt_needs_sam", r.errors[params.segmenter])
        elif not r.prompts:
            reason = ("no_prompt", "no box, point or mask for a lesion sample")
        # A broken ground-truth mask is worth a clinician's look even when a prompt mask exists.
        if reason is None and r.gt_problem is not None and source not in ("clinician",):
            reason = (r.gt_problem.reason, r.gt_problem.detail)
    row["segmenter_qc"] = _segmenter_qc(r)
    if mask is not None:
        path, digest = io.store_content_addressed(out_dir, encode_mask_png(mask), ".png")
        h, w = mask.shape
        c = q.centroid(mask)
        box = q.box_of(mask)
        base = r.masks.get(BASELINE)
        row.update(
            source=source, mask_path=(OUT_DIR / path.relative_to(out_dir)).as_posix(), mask_sha256=digest,
            score=r.scores.get(source) if source in r.scores else None,
            area_fraction=q.area_fraction(mask), component_count=q.component_count(mask),
            touches_border=q.touches_border(mask),
            mask_box=dict(zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True)) if box else None,
            centroid_x=c[0] / w if c else None, centroid_y=c[1] / h if c else None,
            dice_vs_gt=q.dice(mask, r.gt) if r.gt is not None else None,
            iou_vs_gt=q.iou(mask, r.gt) if r.gt is not None else None,
            dice_vs_baseline=q.dice(mask, base) if base is not None else None,
            iou_vs_baseline=q.iou(mask, base) if base is not None else None,
        )
    if reason is None:
        row.update(status="accepted", review_reason=None)
        return row, None
    row.update(status="review", review_reason=reason[0])
    review = {
        "sample_id": row["sample_id"], "dataset": row["dataset"], "image_path": row["image_path"],
        "width": row["width"], "height": row["height"], "reason": reason[0], "detail": reason[1],
        "boxes": [dict(zip(("xmin", "ymin", "xmax", "ymax"), p.box, strict=True)) for p in r.prompts if p.box],
        "mask_path": row.get("mask_path"), "mask_sha256": row.get("mask_sha256"),
    }
    return row, review


def qc_report(rows: list[dict[str, Any]], params: MaskParams) -> dict[str, Any]:
    """Dice/IoU per segmenter vs ground truth and vs the baseline, per dataset and overall.

    ``dice_ratio_vs_baseline`` = mean Dice vs GT of the segmenter / mean Dice vs GT of ``box_ellipse``
    on the same samples (> 1: the segmenter beats its own prompt).
    """
    acc: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for s in row.get("segmenter_qc") or []:
            if s["dice_vs_gt"] is not None:
                item = {**s, "_sample_id": row["sample_id"]}
                acc[row["dataset"]][s["segmenter"]].append(item)
                acc["all"][s["segmenter"]].append(item)
    segmenters = sorted({params.segmenter, BASELINE, *params.qc_segmenters, "ground_truth"})

    def summarise(items: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        base_by_id = {s["_sample_id"]: s["dice_vs_gt"] for s in items.get(BASELINE, [])}
        for name in segmenters:
            if name == "ground_truth":
                continue
            its = items.get(name, [])
            def mean(key: str, its: list[dict[str, Any]] = its) -> float | None:
                return round(float(np.mean([s[key] for s in its])), 4) if its else None

            dice_gt = mean("dice_vs_gt")
            # The baseline on exactly the same samples (QC segmenters may run on a subset).
            paired = [base_by_id[s["_sample_id"]] for s in its if s["_sample_id"] in base_by_id]
            base_dice = float(np.mean(paired)) if paired else None
            out[name] = {
                "n": len(its), "mean_dice_vs_gt": dice_gt, "mean_iou_vs_gt": mean("iou_vs_gt"),
                "mean_dice_vs_baseline": mean("dice_vs_baseline"), "mean_iou_vs_baseline": mean("iou_vs_baseline"),
                "share_dice_below_0_5": round(float(np.mean([s["dice_vs_gt"] < 0.5 for s in its])), 4) if its else None,
                "baseline_dice_same_samples": round(base_dice, 4) if base_dice is not None else None,
                "dice_ratio_vs_baseline": round(dice_gt / base_dice, 4) if dice_gt is not None and base_dice else None,
            }
        return out

    return {
        "baseline": BASELINE,
        "segmenters": [s for s in segmenters if s != "ground_truth"],
        "accepted_segmenter": params.segmenter,
        "by_dataset": {ds: summarise(items) for ds, items in sorted(acc.items())},
        "accepted_sources": dict(sorted(Counter(r.get("source") or "none" for r in rows).items())),
        "status": dict(sorted(Counter(r["status"] for r in rows).items())),
        "review_reasons": dict(sorted(Counter(r["review_reason"] for r in rows if r.get("review_reason")).items())),
    }


def _is_lesion_sample(ann: dict[str, Any]) -> bool:
    diag = ann.get("diagnosis")
    return diag is None or taxonomy.is_lesion_diagnosis(diag)


def build_tasks(workspace: Path, annotations: list[dict[str, Any]], clinician: dict[str, dict[str, Any]],
                params: MaskParams) -> tuple[list[dict[str, Any]], list[SampleTask]]:
    """Split annotations into (no-lesion samples, tasks for the segmentation worker)."""
    no_lesion, tasks = [], []
    dump = params.model_dump(mode="json")
    for ann in annotations:
        c = clinician.get(ann["sample_id"])
        has_any = bool(ann.get("mask_path") or ann.get("boxes") or c)
        if not has_any and not _is_lesion_sample(ann):
            no_lesion.append(ann)
            continue
        tasks.append(SampleTask(
            sample_id=ann["sample_id"],
            image_path=str(workspace / ann["image_path"]),
            gt_mask_path=str(workspace / ann["mask_path"]) if ann.get("mask_path") else None,
            dataset_boxes=[(b["xmin"], b["ymin"], b["xmax"], b["ymax"]) for b in ann.get("boxes") or []],
            clinician_boxes=[(b["xmin"], b["ymin"], b["xmax"], b["ymax"]) for b in (c or {}).get("boxes") or []],
            clinician_points=[(p["x"], p["y"], p["label"]) for p in (c or {}).get("points") or []],
            clinician_mask_path=str(workspace / c["mask_path"]) if c and c.get("mask_path") else None,
            params=dump, identity=_identity(ann, c),
        ))
    for task in tasks:
        task.run_qc = task.gt_mask_path is not None and in_qc_subset(task.sample_id, params)
    return no_lesion, tasks


def _identity(ann: dict[str, Any], clinician: dict[str, Any] | None) -> dict[str, Any]:
    """Everything about one sample its masks row depends on (image/mask paths are content-addressed)."""
    c = clinician or {}
    return {"annotation": {k: ann.get(k) for k in ("sample_id", "dataset", "split", "image_path", "width", "height",
                                                    "mask_path", "boxes", "diagnosis")},
            "clinician": {k: c.get(k) for k in ("boxes", "points", "mask_path", "mask_sha256")} if c else None}


def in_qc_subset(sample_id: str, params: MaskParams) -> bool:
    """Whether the QC-only segmenters run on this ground-truth sample: a seeded hash below ``qc_fraction``.

    QC segmenters only measure (Dice vs ground truth and vs the ellipse baseline). The choice is per
    sample, so it never changes when other samples come or go (incremental reruns stay exact).
    """
    if params.qc_fraction >= 1:
        return True
    u = int(hashlib.sha256(f"{params.seed}:{sample_id}".encode()).hexdigest()[:15], 16) / float(16**15)
    return u < params.qc_fraction


def run_stage(workspace: Path, params: PipelineParams, item: str | None) -> None:
    """DVC stage ``masks``: see the module docstring for inputs and outputs."""
    del item  # one stage over all samples
    ws = Path(workspace)
    # Work on a staging copy that replaces data/masks as a whole at the end: readers (and a killed
    # run) never see half an output, while reused masks stay hard links.
    with io.staged_update(ws / OUT_DIR) as out_dir:
        _run_in(ws, params.masks, out_dir)


def _run_in(ws: Path, mp: MaskParams, out_dir: Path) -> None:
    """The mask stage, writing into ``out_dir`` (a staging copy of ``data/masks``)."""
    annotations = sorted(tables.read_rows(ws / ANNOTATIONS_PATH, "annotations"), key=lambda r: r["sample_id"])
    clinician = read_clinician_prompts(ws / mp.clinician_prompts)
    no_lesion, tasks = build_tasks(ws, annotations, clinician, mp)
    salt = reuse.stage_salt(STAGE, mp.model_dump(mode="json"))  # execution settings are not params
    keys = {t.sample_id: reuse.sample_key(salt, t.identity, t.run_qc) for t in tasks}
    old_keys, old_rows = reuse.previous(out_dir, MASKS_FILE, "masks", "sample_id")
    old_review = {r["sample_id"]: r for r in tables.read_rows(out_dir / REVIEW_FILE, "mask_review")} \
        if old_rows and (out_dir / REVIEW_FILE).exists() else {}
    rows, review, todo = [], [], []
    for t in tasks:
        prev = old_rows.get(t.sample_id)
        if prev and old_keys.get(t.sample_id) == keys[t.sample_id] and reuse.files_present(ws, prev, ("mask_path",)) \
                and (prev[0]["status"] != "review" or t.sample_id in old_review):
            rows += prev
            if prev[0]["status"] == "review":
                review.append(old_review[t.sample_id])
        else:
            todo.append(t)
    results = map_items(segment_sample_cpu, todo, desc="masks")
    _sam_pass(ws, mp, todo, results)
    by_id = {a["sample_id"]: a for a in annotations}
    for r in results:
        row, rev = finalize_sample(by_id[r.sample_id], r, mp, out_dir, ws)
        rows.append(row)
        if rev is not None:
            review.append(rev)
    for ann in no_lesion:
        rows.append({**{k: ann.get(k) for k in ("sample_id", "dataset", "split", "image_path", "width", "height")},
                     "status": "no_lesion", "n_prompts": 0, "prompt_json": "[]", "segmenter_qc": []})
    rows.sort(key=lambda r: r["sample_id"])
    review.sort(key=lambda r: r["sample_id"])
    io.prune_unreferenced(out_dir, {io.staged_path(ws, out_dir, OUT_DIR, r["mask_path"])
                                    for r in rows if r.get("mask_path")}, ws)
    tables.write_rows(rows, out_dir / MASKS_FILE, MASKS, "masks")
    tables.write_rows(review, out_dir / REVIEW_FILE, REVIEW, "mask_review")
    reuse.write_keys(out_dir, keys)
    report = qc_report(rows, mp)
    io.atomic_write_json(out_dir / "qc.json", report)
    counts = Counter(r["status"] for r in rows)
    summary = {"in": len(annotations), "out": len(rows), "accepted": counts["accepted"],
               "review": counts["review"], "no_lesion": counts["no_lesion"],
               "clinician_prompts": len(clinician), "sources": report["accepted_sources"],
               "review_reasons": report["review_reasons"],
               accounting.KEY: accounting.block(
                   "samples", len(annotations), counts["accepted"] + counts["no_lesion"],
                   Counter(f"review:{r['review_reason']}" for r in rows if r["status"] == "review"))}
    if summary["in"] != summary["accepted"] + summary["review"] + summary["no_lesion"]:
        raise AssertionError(f"mask stage lost samples: {summary}")
    io.atomic_write_json(out_dir / "summary.json", summary)
    inputs = [ANNOTATIONS_PATH.as_posix()] + ([mp.clinician_prompts] if (ws / mp.clinician_prompts).exists() else [])
    # Parallelism is not a fact about the output: leave it out so records match across machines.
    write_provenance(out_dir, STAGE, ws, inputs, mp.model_dump(mode="json"))
    counts = reuse.record_counts(ws, STAGE, computed=len(todo), reused=len(tasks) - len(todo))
    log.info("masks: %s; %s", summary, counts)
