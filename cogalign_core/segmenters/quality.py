"""Mask quality figures: Dice, IoU, area fraction, components, border contact, boxes and centroids.

All masks are ``bool`` arrays of shape ``(H, W)`` in the stored image's pixel frame (origin top-left,
x to the right). Boxes are ``(xmin, ymin, xmax, ymax)`` with inclusive corners.
"""

from __future__ import annotations

import cv2
import numpy as np

Box = tuple[int, int, int, int]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient 2|A∩B| / (|A|+|B|) of two same-shape bool masks; 1.0 when both are empty."""
    _same_shape(pred, truth)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two same-shape bool masks; 1.0 when both are empty."""
    _same_shape(pred, truth)
    union = int(np.logical_or(pred, truth).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, truth).sum()) / union


def area_fraction(mask: np.ndarray) -> float:
    """Fraction of the frame the mask covers, in [0, 1]."""
    return float(mask.sum()) / float(mask.size) if mask.size else 0.0


def component_count(mask: np.ndarray) -> int:
    """Number of 8-connected foreground components."""
    if not mask.any():
        return 0
    n, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return int(n - 1)


def touches_border(mask: np.ndarray) -> bool:
    """True when any foreground pixel lies on the outermost row or column of the frame."""
    return bool(mask[0, :].any() or mask[-1, :].any() or mask[:, 0].any() or mask[:, -1].any())


def box_of(mask: np.ndarray) -> Box | None:
    """Inclusive bounding box of all foreground pixels, or ``None`` for an empty mask."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def component_boxes(mask: np.ndarray, min_area: int = 16) -> list[Box]:
    """Inclusive boxes of the 8-connected components with at least ``min_area`` pixels, sorted."""
    if not mask.any():
        return []
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    boxes = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area >= min_area:
            boxes.append((x, y, x + w - 1, y + h - 1))
    return sorted(boxes)


def centroid(mask: np.ndarray) -> tuple[float, float] | None:
    """Foreground centroid ``(x, y)`` in pixels, or ``None`` for an empty mask."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return float(xs.mean()), float(ys.mean())


def box_coverage(mask: np.ndarray, boxes: list[Box]) -> float:
    """Fraction of the union of ``boxes`` covered by ``mask`` (1.0 when there are no boxes)."""
    if not boxes:
        return 1.0
    region = np.zeros(mask.shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        region[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = True
    total = int(region.sum())
    return float(np.logical_and(mask, region).sum()) / total if total else 1.0


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
