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
    """Bool ``(H, W)``: burned-in text and overlay graphics in the outer band of the frame.

    Green-dominant pixels are graphics (mucosa is red/pink). Bright, unsaturated pixels are text only
    when they form a line of glyphs (after a horizontal closing: at least ``text_min_glyphs`` separate
    components, a block at least twice as wide as tall and at most ``text_max_line_height_fraction``
    of the frame tall): specular highlights are just as bright and grey but come as isolated blobs,
    and taking them for overlays left no room for controls on shiny mucosa.
    """
    h, w = image.shape[:2]
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    sat, val = hsv[:, :, 1], hsv[:, :, 2]
    r, g, b = (image[:, :, i].astype(np.int16) for i in range(3))
    band = np.zeros((h, w), dtype=bool)
    bx, by = round(w * params.overlay_band_fraction), round(h * params.overlay_band_fraction)
    band[:, :bx] = band[:, w - bx:] = True
    band[:by, :] = band[h - by:, :] = True
    text = ((val >= params.overlay_min_value) & (sat <= params.overlay_max_saturation) & band).astype(np.uint8)
    green = ((g > 90) & (g - np.maximum(r, b) > 40) & band).astype(np.uint8)
    # Close horizontally so the characters of a burned-in text line merge into one block.
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (15, 5))
    lines = _text_lines(text, cv2.morphologyEx(text, cv2.MORPH_CLOSE, kernel), params, h)
    graphics = cv2.morphologyEx(green, cv2.MORPH_CLOSE, kernel) > 0
    return (lines | graphics) & band


def _text_lines(text: np.ndarray, closed: np.ndarray, params: FovParams, height: int) -> np.ndarray:
    """Blocks of ``closed`` that look like a line of text: enough glyphs of ``text``, flat and wide."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(closed, connectivity=8)
    if n <= 1:
        return np.zeros(closed.shape, dtype=bool)
    n_glyphs, glyph_labels = cv2.connectedComponents(text, connectivity=8)
    ys, xs = np.nonzero(text)
    # Each glyph belongs to the closed block under any of its pixels: take its first pixel.
    first = np.full(n_glyphs, -1, dtype=np.int64)
    gl = glyph_labels[ys, xs]
    order = np.argsort(gl, kind="stable")
    uniq, idx = np.unique(gl[order], return_index=True)
    first[uniq] = order[idx]
    block_of_glyph = labels[ys[first[1:]], xs[first[1:]]] if n_glyphs > 1 else np.zeros(0, np.int32)
    glyphs = np.bincount(block_of_glyph, minlength=n)
    bw, bh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    is_line = (glyphs >= params.text_min_glyphs) & (bw >= 2 * bh) \
        & (bh <= max(3.0, params.text_max_line_height_fraction * height))
    is_line[0] = False
    return is_line[labels]


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
