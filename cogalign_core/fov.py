"""Endoscope field of view: where real mucosa is visible (not black border, overlays or burned-in text).

Endoscopy frames show the lens's circular/octagonal image on a black background; processors burn
patient/date text and scope-position overlays into the corners. A matched control must sit on
mucosa, so :func:`estimate_fov` removes (1) the dark region connected to the image edge, (2) bright
unsaturated (white/grey text) or green-dominant (overlay graphics) pixels in the outer band of the
frame, then keeps the largest remaining component, fills its holes and erodes a safety margin.
"""

from __future__ import annotations

import cv2
import numpy as np

from cogalign_core.config.counterfactual import FovParams


def dark_border(image: np.ndarray, dark_threshold: int) -> np.ndarray:
    """Bool ``(H, W)``: pixels darker than ``dark_threshold`` (max over RGB) connected to the image edge."""
    dark = (image.max(axis=2) < dark_threshold).astype(np.uint8)
    n, labels = cv2.connectedComponents(dark, connectivity=8)
    if n <= 1:
        return np.zeros(dark.shape, dtype=bool)
    edge_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    edge_labels = edge_labels[edge_labels > 0]
    return np.isin(labels, edge_labels)


def overlay_pixels(image: np.ndarray, params: FovParams) -> np.ndarray:
    """Bool ``(H, W)``: text/overlay-like pixels in the outer band of the frame."""
    h, w = image.shape[:2]
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    sat, val = hsv[:, :, 1], hsv[:, :, 2]
    r, g, b = (image[:, :, i].astype(np.int16) for i in range(3))
    text = (val >= params.overlay_min_value) & (sat <= params.overlay_max_saturation)
    green = (g > 90) & (g - np.maximum(r, b) > 40)  # mucosa is red/pink; green means graphics
    band = np.zeros((h, w), dtype=bool)
    bx, by = round(w * params.overlay_band_fraction), round(h * params.overlay_band_fraction)
    band[:, :bx] = band[:, w - bx:] = True
    band[:by, :] = band[h - by:, :] = True
    overlay = ((text | green) & band).astype(np.uint8)
    # Close horizontally so the characters of a burned-in text line merge into one excluded block.
    overlay = cv2.morphologyEx(overlay, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (15, 5)))
    return (overlay > 0) & band


def estimate_fov(image: np.ndarray, params: FovParams | None = None, outside: np.ndarray | None = None
                 ) -> np.ndarray:
    """Bool ``(H, W)`` field-of-view mask of an RGB ``(H, W, 3)`` uint8 frame (True = usable mucosa).

    ``outside`` is :func:`dark_border` of the frame when the caller already has it.
    """
    params = params or FovParams()
    h, w = image.shape[:2]
    if outside is None:
        outside = dark_border(image, params.dark_threshold)
    overlay = overlay_pixels(image, params)
    if params.overlay_dilate_px > 0 and overlay.any():
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * params.overlay_dilate_px + 1,) * 2)
        overlay = cv2.dilate(overlay.astype(np.uint8), k) > 0
    inside = (~(outside | overlay)).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(inside, connectivity=4)
    if n <= 1:
        return np.zeros((h, w), dtype=bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    fov = labels == largest
    fov = _fill_holes(fov) & ~overlay  # holes = dark lumen or highlights inside the lens: still in view
    if params.margin_px > 0:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * params.margin_px + 1,) * 2)
        fov = cv2.erode(fov.astype(np.uint8), k, borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0
    return fov


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions of ``mask`` not connected to the frame edge."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = mask.astype(np.uint8)
    flood = padded.copy()
    ff_mask = np.zeros((h + 4, w + 4), dtype=np.uint8)
    cv2.floodFill(flood, ff_mask, (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return mask | holes
