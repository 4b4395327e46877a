"""The ``ingest_batch`` worker: decode, validate and store one image and its mask (never raises).

Runs in a process pool (:func:`cogalign_core.executor.map_items`); see :mod:`cogalign_core.imaging` for
the decoding rules and stored forms.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cogalign_core import imaging
from cogalign_core.ingest_plan import ItemTask
from cogalign_core.io import sha256_bytes


@dataclass(frozen=True)
class DecodeSettings:
    """Per-run settings shipped to workers. ``out_dir`` is the batch output (temp) folder."""

    out_dir: str
    max_pixels: int
    min_side: int
    mask_threshold: int



_MADE: set[str] = set()  # fan-out folders this process has created (the batch folder is new per run)


def _store(out_dir: str, sub: str, data: bytes, suffix: str) -> tuple[str, str]:
    """Write ``data`` content-addressed as ``out_dir/sub/<h2>/<sha><suffix>``; return (relative path, sha256).

    The whole batch folder is an ``atomic_dir``, so a partial file can never be published and a
    plain exclusive create suffices (a concurrent writer of the same digest writes the same bytes).
    Plain ``os`` calls: this runs once per file and pathlib/mkdir overhead rivals the decode.
    """
    digest = sha256_bytes(data)
    rel = f"{sub}/{digest[:2]}/{digest}{suffix}"
    path = os.path.join(out_dir, rel)
    folder = os.path.dirname(path)
    if folder not in _MADE:  # one mkdir per fan-out folder and process, not a failed open per file
        os.makedirs(folder, exist_ok=True)
        _MADE.add(folder)
    try:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:  # a folder of an earlier run's path: make it again
            os.makedirs(folder, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
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
            mask = imaging.decode_mask(task.mask_file, size, settings.mask_threshold, settings.max_pixels,
                                       image_orientation=img.orientation)
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
