"""Counterfactual stage: lesion removed (counterfactual normal), matched control, optional "both" image.

For every accepted lesion mask (``data/masks/masks.parquet``, status ``accepted``):

1. dilate the mask by a margin that grows with lesion size (``margin_fraction`` x equivalent diameter,
   clipped to [``margin_min_px``, ``margin_max_px``]); the result is the *fill* region;
2. check the ground-truth mask (when one exists) lies fully inside the fill;
3. a fill that reaches the image edge or the black border around the lens is clipped to the lens
   image; black pixels are never inpainting sources (the lens edge is replicated outward, as an image
   edge is) and keep their values. Only a fill with too little mucosa around it
   (``min_context_fraction``) is excluded (``lesion_touches_border``);
4. inpaint the fill (:mod:`cogalign_core.inpaint`); pixels outside it are checked bit-identical;
5. place a *matched control*: the fill's exact shape translated to a position drawn from a fixed
   lesion-position prior (the mirror position first, then seeded draws), fully inside the field of
   view (:mod:`cogalign_core.fov`), at least ``control_gap_px`` away from the fill, choosing the
   candidate whose surrounding ring looks most like the lesion's ring (mean CIELAB distance);
6. optionally a *both* image (lesion removed and control filled) so the count of filled regions does
   not reveal the label.

**Per-sample, hence incremental and leak-free.** A parent's rows depend only on that parent (image,
masks, labels, split), the params and the code: never on other images. So a new batch changes no
existing row (the stage recomputes only new or changed parents, see :mod:`cogalign_core.reuse`), and
a control for a train parent can use no test-split position or statistic.

Labels: counterfactual normal and both = normal at every level except location (unchanged); microvascular
stays the parent's; the control keeps the parent's labels. Every derived image inherits the parent's
split. A sample whose control cannot be placed is written but ``excluded`` with reason
``no_room_for_control``; bad input (unreadable/empty/oversized/mis-sized mask, lesion without mucosa
around it, ground truth outside the fill) gives an excluded row with its reason, never a crash.

Outputs under ``data/counterfactual/`` (a ``persist`` output): ``images/<h2>/<sha>.png``,
``fill_masks/<h2>/<sha>.png``, ``counterfactuals.parquet`` (:data:`COUNTERFACTUALS`),
``split_<split>.parquet``, ``reuse_keys.parquet``, ``summary.json`` (with coverage by reason),
``provenance.json``. Pixel frame of the stored image, origin top-left.

Over 400 lines on purpose: the table schema, the per-parent rules and the stage loop change together;
the FOV estimate and the inpainters live in their own modules.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image

from cogalign_core import accounting, answer_format, contract, io, reuse, tables, taxonomy
from cogalign_core.cf_coverage import coverage
from cogalign_core.config import PipelineParams
from cogalign_core.config.counterfactual import CounterfactualParams
from cogalign_core.executor import map_items
from cogalign_core.fov import dark_border, estimate_fov
from cogalign_core.inpaint import build_inpainter, roi
from cogalign_core.provenance import write_provenance
from cogalign_core.segmenters.ground_truth import MaskProblem, load_mask
from cogalign_core.segmenters.quality import touches_border

log = logging.getLogger(__name__)

STAGE = "counterfactual"
OUT_DIR = Path(contract.COUNTERFACTUAL)
MASKS_PATH = Path(contract.MASKS_TABLE)
ANNOTATIONS_PATH = Path(contract.ANNOTATIONS)
TABLE_FILE = Path(contract.COUNTERFACTUALS).name

KINDS: tuple[str, ...] = ("counterfactual_normal", "control", "both")
EXCLUSION_REASONS: tuple[str, ...] = (
    "image_unreadable", "mask_unreadable", "mask_size_mismatch", "mask_empty", "mask_too_large",
    "lesion_touches_border", "gt_outside_fill", "no_room_for_control",
)

COUNTERFACTUALS = pa.schema(
    [
        ("sample_id", pa.string()),              # "c" + 16 hex of SHA-256(parent | kind | image sha)
        ("parent_sample_id", pa.string()),
        ("dataset", tables.enum()),
        ("kind", tables.enum()),                 # KINDS
        ("split", tables.enum()),                # inherited from the parent
        ("image_path", pa.string()),             # null when excluded before inpainting
        ("image_sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mask_sha256", pa.string()),            # the parent's accepted mask (mask id)
        ("fill_mask_path", pa.string()),         # the region(s) filled in this image, {0,255} PNG
        ("fill_mask_sha256", pa.string()),
        ("method", tables.enum()),               # inpainter: telea | ns
        ("params_json", pa.string()),            # the params used, plus per-image margin/offset
        ("margin_px", pa.int32()),
        ("fill_area_fraction", pa.float32()),
        ("fill_clipped", pa.bool_()),            # the lesion's fill was clipped to the lens image (border lesion)
        ("outside_identical", pa.bool_()),       # every pixel outside the fill equals the source
        ("changed_fraction", pa.float32()),      # share of fill pixels whose value changed
        ("gt_inside_fill", pa.float32()),        # share of ground-truth pixels inside the fill; null without GT
        ("fill_mean_l", pa.float32()),           # CIELAB L* (0-255 OpenCV scale) mean/std in the fill ...
        ("fill_std_l", pa.float32()),
        ("ring_mean_l", pa.float32()),           # ... and in a ring of ring_px around it (inside the FOV)
        ("ring_std_l", pa.float32()),
        ("control_offset_x", pa.int32()),        # translation lesion fill -> control region, px
        ("control_offset_y", pa.int32()),
        ("control_match_distance", pa.float32()),  # CIELAB distance of the rings (lesion vs control)
    ]
    + [f for level in taxonomy.LEVELS for f in ((level, tables.enum()), (f"{level}_source", tables.enum()))]
    + [
        ("answer", pa.string()),
        ("excluded", pa.bool_()),                # excluded from RL and evaluation
        ("exclusion_reason", tables.enum()),     # EXCLUSION_REASONS
    ]
)


def _parent_accounting(tasks: list[Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accepted lesion masks in; parents with a usable counterfactual normal out; the others by reason."""
    normal = {r["parent_sample_id"]: r for r in rows if r["kind"] == "counterfactual_normal"}
    dropped: Counter[str] = Counter()
    usable = 0
    for t in tasks:
        r = normal.get(t.sample_id)
        if r is not None and not r["excluded"]:
            usable += 1
        else:
            dropped[(r or {}).get("exclusion_reason") or "no_counterfactual_normal"] += 1
    return accounting.block("lesion masks", len(tasks), usable, dropped)


@dataclass
class ParentTask:
    """One accepted lesion mask to turn into derived images (picklable; paths workspace-relative)."""

    workspace: str
    sample_id: str
    dataset: str
    split: str
    image_path: str
    mask_path: str
    mask_sha256: str
    gt_mask_path: str | None
    labels: dict[str, str]
    sources: dict[str, str]
    params: dict[str, Any]

    def identity(self) -> dict[str, Any]:
        """Everything about the parent its rows depend on (paths are content-addressed)."""
        return {k: v for k, v in vars(self).items() if k not in ("workspace", "params")}


def margin_for(area_px: int, params: CounterfactualParams) -> int:
    """Dilation margin (px) for a lesion of ``area_px`` pixels: grows with its equivalent diameter."""
    diameter = 2.0 * math.sqrt(max(area_px, 0) / math.pi)
    return int(min(max(round(params.margin_fraction * diameter), params.margin_min_px), params.margin_max_px))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Bool mask grown by an elliptical structuring element of ``radius`` px.

    Only the mask's bounding box grown by ``radius`` is dilated (nothing farther can change), so
    the cost follows the lesion, not the frame; the result equals a full-frame ``cv2.dilate``.
    """
    if radius <= 0:
        return mask.copy()
    out = np.zeros(mask.shape, dtype=bool)
    rows, cols = roi(mask, radius)
    if rows.stop > rows.start:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        out[rows, cols] = cv2.dilate(mask[rows, cols].astype(np.uint8), k) > 0
    return out


def normal_labels(parent: dict[str, str], parent_sources: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Labels of a lesion-removed image: normal everywhere, location and microvascular kept."""
    labels = {"location": parent["location"], "morphology": taxonomy.NO_LESION,
              "microvascular": parent["microvascular"], "diagnosis": taxonomy.NORMAL}
    sources = {"location": parent_sources["location"], "morphology": "derived_from_mask",
               "microvascular": parent_sources["microvascular"], "diagnosis": "derived_from_mask"}
    return labels, sources


def _png(array: np.ndarray) -> bytes:
    buf = BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=io.PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _ring(region: np.ndarray, width: int, fov: np.ndarray) -> np.ndarray:
    return dilate(region, width) & ~region & fov


def _lab_mean(lab: np.ndarray, region: np.ndarray) -> np.ndarray | None:
    return lab[region].astype(np.float64).mean(axis=0) if region.any() else None


def context_fraction(region: np.ndarray, outside: np.ndarray) -> float:
    """Share of the pixels just around ``region`` (8-neighbourhood) that are mucosa: inside the frame and
    not ``outside`` (black border). 1.0 for a lesion surrounded by mucosa."""
    padded = np.pad(region, 1)
    around = dilate(padded, 1) & ~padded
    usable = np.pad(~outside, 1)  # the frame's own edge counts as no context
    n = int(around.sum())
    return float((around & usable).sum()) / n if n else 0.0


def prior_positions(fill_centre: tuple[float, float], params: CounterfactualParams,
                    rng: np.random.Generator) -> list[tuple[float, float]]:
    """Candidate control centroids (fractions of width/height): the fill's mirror position, then draws
    from the fixed lesion-position prior (independent normals, clipped to the frame)."""
    cx, cy = fill_centre
    out = [(1.0 - cx, 1.0 - cy)]
    n = params.control_candidates - 1
    if n > 0:
        draws = rng.normal(0.0, params.control_prior_sd, size=(n, 2))
        draws += (params.control_prior_x, params.control_prior_y)
        out += [(float(x), float(y)) for x, y in np.clip(draws, 0.0, 1.0)]
    return out


def place_control(fill: np.ndarray, fov: np.ndarray, lab: np.ndarray, params: CounterfactualParams,
                  rng: np.random.Generator) -> tuple[np.ndarray, int, int, float, str] | None:
    """Find a control region: ``fill`` translated, inside ``fov``, ``control_gap_px`` away from ``fill``.

    First pass (``prior``): :func:`prior_positions`. Only when none is valid, a second pass
    (``grid``) tries a seeded sample of the valid positions of a coarse grid over the frame. Among
    valid positions the one whose surrounding ring best matches the lesion's ring (mean CIELAB
    distance) wins, ties to the first tried. Returns ``(region, dx, dy, distance, pass)`` or ``None``.
    """
    h, w = fill.shape
    ys, xs = np.nonzero(fill)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    crop = fill[y0:y1 + 1, x0:x1 + 1]
    ch, cw = crop.shape
    cx, cy = float(xs.mean()), float(ys.mean())
    forbidden = dilate(fill, params.control_gap_px) | ~fov
    lesion_ring = _lab_mean(lab, _ring(fill, params.ring_px, fov))

    def valid(dx: int, dy: int) -> bool:
        nx0, ny0 = x0 + dx, y0 + dy
        if nx0 < 0 or ny0 < 0 or nx0 + cw > w or ny0 + ch > h:
            return False
        return not (forbidden[ny0:ny0 + ch, nx0:nx0 + cw] & crop).any()

    # The ring around a translated region is the translated ring of the crop (dilation commutes with
    # translation), so it is dilated once here and only pasted per candidate, in a local window.
    r = max(0, params.ring_px)
    padded = np.pad(crop, r)
    crop_ring = dilate(padded, r) & ~padded
    allowed = fov & ~fill

    def ring_mean_at(dx: int, dy: int) -> np.ndarray | None:
        top, left = y0 + dy - r, x0 + dx - r
        t, b = max(0, top), min(h, top + ch + 2 * r)
        le, ri = max(0, left), min(w, left + cw + 2 * r)
        ring = crop_ring[t - top:b - top, le - left:ri - left] & allowed[t:b, le:ri]
        return _lab_mean(lab[t:b, le:ri], ring)

    def best_of(offsets: list[tuple[int, int]]) -> tuple[np.ndarray, int, int, float] | None:
        best = None
        for dx, dy in offsets:
            ring_mean = ring_mean_at(dx, dy)
            dist = float(np.linalg.norm(ring_mean - lesion_ring)) \
                if ring_mean is not None and lesion_ring is not None else float("inf")
            if best is None or dist < best[2]:
                best = (dx, dy, dist)
        if best is None:
            return None
        dx, dy, dist = best
        region = np.zeros_like(fill)
        region[y0 + dy:y0 + dy + ch, x0 + dx:x0 + dx + cw] = crop
        return region, dx, dy, dist

    positions = prior_positions((cx / w, cy / h), params, rng)
    offsets = list(dict.fromkeys((round(px * w - cx), round(py * h - cy)) for px, py in positions))
    found = best_of([o for o in offsets if valid(*o)])
    if found is not None:
        return (*found, "prior")
    step = max(2, min(h, w) // 32)
    grid = [(gx - x0, gy - y0) for gy in range(0, h - ch + 1, step) for gx in range(0, w - cw + 1, step)]
    ok = [o for o in grid if valid(*o)]
    if not ok:
        return None
    pick = sorted(rng.choice(len(ok), size=min(len(ok), params.control_candidates), replace=False))
    found = best_of([ok[i] for i in pick])
    return None if found is None else (*found, "grid")


def _stats(image: np.ndarray, region: np.ndarray, fov: np.ndarray, ring_px: int) -> dict[str, float | None]:
    """CIELAB L* mean/std of ``region`` and of its ring (within ``fov``), computed in a window around it."""
    rows, cols = roi(region, ring_px + 1)
    window, sel = image[rows, cols], region[rows, cols]
    lum = cv2.cvtColor(np.ascontiguousarray(window), cv2.COLOR_RGB2LAB)[:, :, 0]
    ring = _ring(sel, ring_px, fov[rows, cols])

    def ms(m: np.ndarray) -> tuple[float | None, float | None]:
        return (float(lum[m].mean()), float(lum[m].std())) if m.any() else (None, None)

    (fm, fs), (rm, rs) = ms(sel), ms(ring)
    return {"fill_mean_l": fm, "fill_std_l": fs, "ring_mean_l": rm, "ring_std_l": rs}


def make_counterfactuals(task: ParentTask, write_dir: str | None = None) -> list[dict[str, Any]]:
    """Per-parent worker: derived images written content-addressed; returns their table rows."""
    params = CounterfactualParams.model_validate(task.params)
    ws = Path(task.workspace)
    out_dir = Path(write_dir) if write_dir else ws / OUT_DIR  # write_dir: the stage's staging copy
    base = {"parent_sample_id": task.sample_id, "dataset": task.dataset, "split": task.split,
            "mask_sha256": task.mask_sha256, "method": params.inpainter}
    nl, ns = normal_labels(task.labels, task.sources)

    def excluded(reason: str, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        row = {**base, **(extra or {}), "kind": "counterfactual_normal", "excluded": True, "exclusion_reason": reason,
               "params_json": json.dumps(task.params, sort_keys=True)}
        return [_finish(row, nl, ns)]

    try:
        with Image.open(ws / task.image_path) as im:
            image = np.asarray(im.convert("RGB"))
    except (OSError, ValueError):
        return excluded("image_unreadable")
    h, w = image.shape[:2]
    base.update(width=w, height=h)
    try:
        mask = load_mask(ws / task.mask_path, (h, w), "m")
    except MaskProblem as e:
        return excluded(e.reason.removeprefix("m_"))
    if mask.mean() > params.max_area_fraction:
        return excluded("mask_too_large")
    margin = margin_for(int(mask.sum()), params)
    fill = dilate(mask, margin)
    fill_fraction = float(fill.mean())
    if fill_fraction > params.max_area_fraction:
        return excluded("mask_too_large", {"margin_px": margin, "fill_area_fraction": fill_fraction})
    outside = dark_border(image, params.fov.dark_threshold)
    clipped = touches_border(fill) or bool((fill & outside).any())
    region = fill & ~outside
    if clipped and (params.exclude_border_lesions or not region.any()
                    or context_fraction(region, outside) < params.min_context_fraction):
        return excluded("lesion_touches_border", {"margin_px": margin, "fill_area_fraction": fill_fraction,
                                                  "fill_clipped": True})
    gt_inside = None
    if task.gt_mask_path:
        try:
            gt = load_mask(ws / task.gt_mask_path, (h, w), "gt")
            gt_inside = float((gt & fill).sum() / gt.sum())
        except MaskProblem:
            gt_inside = None  # the mask stage already routed a broken GT to review
    common = {"margin_px": margin, "gt_inside_fill": gt_inside, "fill_clipped": clipped}
    if params.require_gt_inside and gt_inside is not None and gt_inside < 1.0:
        return excluded("gt_outside_fill", {**common, "fill_area_fraction": fill_fraction})

    inpainter = build_inpainter(params.inpainter, params.inpaint_radius)
    fov = estimate_fov(image, params.fov, outside=outside)
    rng = np.random.default_rng([params.seed, int(io.sha256_bytes(task.sample_id.encode())[:12], 16)])
    control = None
    if params.make_control:
        lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
        control = place_control(region, fov, lab, params, rng)
    per_image: dict[str, Any] = {"margin_px": margin}
    reason = "no_room_for_control" if params.make_control and control is None else None

    def derive(kind: str, region: np.ndarray, out: np.ndarray, labels: dict[str, str], sources: dict[str, str],
               extra: dict[str, Any]) -> dict[str, Any]:
        changed = np.any(out != image, axis=2)
        img_path, img_sha = io.store_content_addressed(out_dir / "images", _png(out), ".png")
        fm_path, fm_sha = io.store_content_addressed(out_dir / "fill_masks", _png(region.astype(np.uint8) * 255),
                                                     ".png")
        row = {**base, **common, **extra, "kind": kind,
               "image_path": (OUT_DIR / img_path.relative_to(out_dir)).as_posix(), "image_sha256": img_sha,
               "fill_mask_path": (OUT_DIR / fm_path.relative_to(out_dir)).as_posix(), "fill_mask_sha256": fm_sha,
               "fill_area_fraction": float(region.mean()),
               "outside_identical": not bool((changed & ~region).any()),
               "changed_fraction": float(changed[region].mean()) if region.any() else 0.0,
               "params_json": json.dumps({**task.params, **per_image, **extra_params(extra)}, sort_keys=True),
               "excluded": reason is not None, "exclusion_reason": reason,
               **_stats(out, region, fov | region, params.ring_px)}
        return _finish(row, labels, sources)

    removed = inpainter.inpaint(image, region, outside)
    rows = [derive("counterfactual_normal", region, removed, nl, ns, {})]
    if control is not None:
        ctrl_region, dx, dy, dist, placement = control
        per_image["control_placement"] = placement
        cextra = {"control_offset_x": dx, "control_offset_y": dy,
                  "control_match_distance": dist if math.isfinite(dist) else None}
        filled_ctrl = inpainter.inpaint(image, ctrl_region, outside)
        rows.append(derive("control", ctrl_region, filled_ctrl, task.labels, task.sources, cextra))
        if params.make_both:
            both = fill_region = region | ctrl_region
            if dilate(region, 2 * params.inpaint_radius + 2)[ctrl_region].any():
                both_image = inpainter.inpaint(image, fill_region, outside)
            else:  # too far apart to see each other: the union's fill is the two fills side by side
                both_image = removed.copy()
                both_image[ctrl_region] = filled_ctrl[ctrl_region]
            rows.append(derive("both", both, both_image, nl, ns, cextra))
    return rows


def extra_params(extra: dict[str, Any]) -> dict[str, Any]:
    """Per-image placement facts recorded in ``params_json`` (offsets only; distances are QC)."""
    return {k: v for k, v in extra.items() if k in ("control_offset_x", "control_offset_y")}


def _finish(row: dict[str, Any], labels: dict[str, str], sources: dict[str, str]) -> dict[str, Any]:
    for level in taxonomy.LEVELS:
        row[level], row[f"{level}_source"] = labels[level], sources[level]
    row["answer"] = answer_format.render_answer(labels)
    row["sample_id"] = "c" + io.sha256_bytes(
        f"{row['parent_sample_id']}|{row['kind']}|{row.get('image_sha256') or ''}".encode())[:16]
    return row


def build_tasks(workspace: Path, masks: list[dict[str, Any]], annotations: dict[str, dict[str, Any]],
                params: CounterfactualParams) -> list[ParentTask]:
    """One task per accepted mask whose parent is annotated (nothing from other samples)."""
    dump = params.model_dump(mode="json")
    tasks = []
    for m in sorted((m for m in masks if m["status"] == "accepted" and m.get("mask_path")),
                    key=lambda r: r["sample_id"]):
        ann = annotations[m["sample_id"]]
        tasks.append(ParentTask(
            workspace=str(workspace), sample_id=m["sample_id"], dataset=ann["dataset"], split=ann["split"],
            image_path=ann["image_path"], mask_path=m["mask_path"], mask_sha256=m["mask_sha256"],
            gt_mask_path=ann.get("mask_path"),
            labels={lv: ann[lv] for lv in taxonomy.LEVELS},
            sources={lv: ann[f"{lv}_source"] for lv in taxonomy.LEVELS}, params=dump))
    return tasks


def run_stage(workspace: Path, params: PipelineParams, item: str | None) -> None:
    """DVC stage ``counterfactual``: see the module docstring."""
    del item
    ws = Path(workspace)
    # Work on a staging copy that replaces data/counterfactual as a whole at the end: readers (and a
    # killed run) never see a half-filled output, while reused images stay hard links.
    with io.staged_update(ws / OUT_DIR) as out_dir:
        _run_in(ws, params.counterfactual, out_dir)


def _run_in(ws: Path, cp: CounterfactualParams, out_dir: Path) -> None:
    """The counterfactual stage, writing into ``out_dir`` (a staging copy of ``data/counterfactual``)."""
    masks = tables.read_rows(ws / MASKS_PATH, "masks")
    annotations = {a["sample_id"]: a for a in tables.read_rows(ws / ANNOTATIONS_PATH, "annotations")}
    missing = sorted(m["sample_id"] for m in masks if m["sample_id"] not in annotations)
    if missing:
        raise ValueError(f"masks.parquet has {len(missing)} samples absent from annotations.parquet, "
                         f"e.g. {missing[:3]}: rerun the mask stage")
    tasks = build_tasks(ws, masks, annotations, cp)
    salt = reuse.stage_salt(STAGE, tasks[0].params if tasks else {})
    old_keys, old_rows = reuse.previous(out_dir, TABLE_FILE, "counterfactuals", "parent_sample_id")
    keys = {t.sample_id: reuse.sample_key(salt, t.identity()) for t in tasks}
    kept: list[dict[str, Any]] = []
    todo: list[ParentTask] = []
    for t in tasks:
        prev = old_rows.get(t.sample_id)
        if prev and old_keys.get(t.sample_id) == keys[t.sample_id] \
                and reuse.files_present(ws, prev, ("image_path", "fill_mask_path")):
            kept += prev
        else:
            todo.append(t)
    fresh = [r for rs in map_items(functools.partial(make_counterfactuals, write_dir=str(out_dir)), todo,
                                   desc="counterfactual") for r in rs]
    rows = sorted(kept + fresh, key=lambda r: (r["parent_sample_id"], KINDS.index(r["kind"])))
    keep = {io.staged_path(ws, out_dir, OUT_DIR, r[k]) for r in rows for k in ("image_path", "fill_mask_path")
            if r.get(k)}
    for sub in ("images", "fill_masks"):
        io.prune_unreferenced(out_dir / sub, keep, ws)
    tables.write_rows(rows, out_dir / TABLE_FILE, COUNTERFACTUALS, "counterfactuals")
    reuse.write_keys(out_dir, keys)
    # Per-split copies: training stages depend on their split only (paths are content-addressed,
    # so a split's table changes exactly when its images do).
    for split in tables.SPLITS:
        tables.write_rows([r for r in rows if r["split"] == split], out_dir / f"split_{split}.parquet",
                          COUNTERFACTUALS, "counterfactuals")
    parents_out = {r["parent_sample_id"] for r in rows}
    summary = {
        "masks_in": len(masks),
        "accepted_masks": len(tasks),
        "skipped_not_accepted": Counter(m["status"] for m in masks if m["status"] != "accepted"),
        "parents_out": len(parents_out),
        "rows": len(rows),
        "by_kind": Counter(r["kind"] for r in rows),
        "usable_by_kind": Counter(r["kind"] for r in rows if not r["excluded"]),
        "excluded_parents_by_reason": Counter(r["exclusion_reason"] for r in rows
                                              if r["excluded"] and r["kind"] == "counterfactual_normal"),
        "outside_identical_all": all(r["outside_identical"] for r in rows if r.get("image_path")),
        "coverage": coverage(rows),
        accounting.KEY: _parent_accounting(tasks, rows),
    }
    if summary["parents_out"] != summary["accepted_masks"]:
        raise AssertionError(f"counterfactual stage lost parents: {summary}")
    io.atomic_write_json(out_dir / "summary.json", {k: dict(sorted(v.items())) if isinstance(v, Counter) else v
                                                     for k, v in summary.items()})
    write_provenance(out_dir, STAGE, ws, [MASKS_PATH.as_posix(), ANNOTATIONS_PATH.as_posix()],
                     cp.model_dump(mode="json"))
    counts = reuse.record_counts(ws, STAGE, computed=len(todo), reused=len(tasks) - len(todo))
    log.info("counterfactual: %s; %s", summary, counts)
